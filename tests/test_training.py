"""Training on the real TLC months: quality, what the MLflow run holds, the registry, PostgreSQL, `mlflow run`."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from conftest import DATA, REPO

from training import registry
from training.models import pip_requirements
from training.settings import Settings
from training.train import TrainConfig, train


def settings_for(tmp_path, tracking_uri: str | None = None) -> Settings:
    return Settings(
        tracking_uri=tracking_uri or f"sqlite:///{tmp_path / 'mlflow.db'}",
        experiment_name="ride-duration",
        artifact_root=str(tmp_path / "artifacts"),
        model_name="ride-duration",
        data_base=str(DATA),
    )


def test_default_model_beats_the_quality_bar_on_real_data(tmp_path):
    # Jan 2021 -> Feb (val) and Mar (test), all rows, default hyperparameters.
    result = train(TrainConfig(trials=1, register=False), settings_for(tmp_path))
    assert result.metrics["val_rmse"] <= 5.4
    assert result.metrics["test_rmse"] <= 5.4
    # The baseline and the coarse estimator are clearly worse: the model earns its place.
    assert result.metrics["baseline_val_rmse"] > result.metrics["val_rmse"] + 1.5
    assert result.metrics["coarse_val_rmse"] > result.metrics["val_rmse"] + 1.5
    # The rider's range: 80 % nominal, calibrated on February, holds 78-82 % of March's rides as served.
    assert 0.78 <= result.metrics["test_interval_coverage"] <= 0.82
    assert result.metrics["test_interval_raw_coverage"] < 0.75  # the quantile models alone under-cover
    assert 5.0 <= result.metrics["test_interval_median_width"] <= 12.0
    assert 0.78 <= result.metrics["val_interval_coverage"] <= 0.82  # calibrated on it: the margin's own target


def test_run_logs_params_metrics_lineage_plots_and_a_self_contained_model(local_model):
    from mlflow import MlflowClient

    result, settings = local_model
    client = MlflowClient(settings.tracking_uri)
    run = client.get_run(result.run_id)
    assert run.data.params["train_months"] == "2021-01" and run.data.params["model_family"] == "hgb"
    for metric in (
        *("val_rmse", "val_mae", "val_r2", "test_rmse", "test_mae", "test_r2", "baseline_val_rmse", "coarse_test_rmse"),
        *("val_interval_coverage", "val_interval_median_width", "test_interval_coverage", "test_interval_median_width"),
        "interval_margin_minutes",
    ):
        assert metric in run.data.metrics, metric
    sources = {i.dataset.name: json.loads(i.dataset.source)["uri"] for i in run.inputs.dataset_inputs}
    assert sources == {s: str(DATA / f"green_tripdata_2021-0{n}.parquet") for s, n in (("train", 1), ("val", 2), ("test", 3))}
    artifacts = {a.path for a in client.list_artifacts(result.run_id, "plots")} | {
        a.path for a in client.list_artifacts(result.run_id)
    }
    assert {"plots/val_predictions.png", "plots/test_predictions.png", "coarse_model.json"} <= artifacts

    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{result.run_id}'")
    assert {c.info.run_name for c in children} == {"linear-default", "hgb-default"}

    model_dir = Path(client.get_logged_model(result.model_uri.rpartition("/")[2]).artifact_location)
    assert {"MLmodel", "model.pkl", "requirements.txt", "input_example.json"} <= {p.name for p in model_dir.iterdir()}
    # The model ships the ride contract, and nothing else of the project.
    assert [p.name for p in (model_dir / "code").iterdir()] == ["ride_contract"]
    shipped = sorted(p.name for p in (model_dir / "code" / "ride_contract").iterdir())
    assert shipped == [
        "__init__.py",
        "coarse.py",
        "features.py",
        "outcome.py",
        "quality.py",
        "result.py",
        "ride.py",
        "serving_form.py",
        "sklearn_features.py",
        "zones.py",
    ]
    # Its serving form sits in the same folder, listed by the sklearn flavor, checked against the pipeline.
    assert (model_dir / "extra_files" / "serving_form.npz").is_file()
    assert run.data.metrics["serving_form_max_abs_diff_minutes"] < 1e-6
    # Exactly the pinned runtime packages (MLflow adds itself for its own loaders), nothing inferred.
    from importlib.metadata import version

    assert (model_dir / "requirements.txt").read_text().split() == [f"mlflow=={version('mlflow')}", *pip_requirements()]
    mlmodel = (model_dir / "MLmodel").read_text()
    assert '"name": "PULocationID"' in mlmodel and f"run_id: {result.run_id}" in mlmodel
    assert "path: extra_files/serving_form.npz" in mlmodel
    # The range travels with it: both quantile forms and what calibrated them.
    for name in ("interval.json", "serving_form_low.npz", "serving_form_high.npz"):
        assert f"path: extra_files/{name}" in mlmodel, name
    described = json.loads((model_dir / "extra_files" / "interval.json").read_text())
    assert described["quantiles"] == [0.1, 0.9] and described["calibrated_on"] == ["2021-02"]
    assert described["margin_minutes"] == pytest.approx(run.data.metrics["interval_margin_minutes"])


def test_hyperparameter_search_logs_each_trial_as_a_nested_run(tmp_path):
    from mlflow import MlflowClient

    settings = settings_for(tmp_path)
    result = train(TrainConfig(trials=3, sample=5_000, register=False), settings)
    client = MlflowClient(settings.tracking_uri)
    children = client.search_runs(
        [client.get_run(result.run_id).info.experiment_id], f"tags.mlflow.parentRunId = '{result.run_id}'"
    )
    trials = sorted(c.info.run_name for c in children if c.info.run_name.startswith("hgb-trial"))
    assert trials == ["hgb-trial-0", "hgb-trial-1", "hgb-trial-2"]
    best = min(c.data.metrics["val_rmse"] for c in children if c.info.run_name.startswith("hgb"))
    assert result.metrics["val_rmse"] == pytest.approx(best)


def test_registry_promotes_by_alias_and_resolves_to_the_bucket_location(tmp_path):
    settings = settings_for(tmp_path)
    first = train(TrainConfig(trials=1, sample=5_000), settings)
    second = train(TrainConfig(trials=1, sample=5_000), settings)
    assert (first.version, second.version) == ("1", "2")
    assert registry.current_version(registry.PRODUCTION, settings) is None

    assert registry.promote(first.version, settings) is None
    assert registry.promote(second.version, settings) == "1"
    assert registry.current_version(registry.PREVIOUS, settings) == "1"
    resolved = registry.resolve(registry.PRODUCTION, settings)
    assert (resolved.version, resolved.run_id) == ("2", second.run_id)
    assert resolved.artifact_uri.startswith(str(tmp_path / "artifacts")) and resolved.artifact_uri.endswith("/artifacts")
    assert os.path.isfile(os.path.join(resolved.artifact_uri, "MLmodel"))

    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException):
        registry.promote("99", settings)


def _run(args: list[str], tracking_uri: str, timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        args,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},
            "MLFLOW_TRACKING_URI": tracking_uri,
            "MLFLOW_DISABLE_TELEMETRY": "true",
            # One OpenMP thread: on the shared cores a fit's spinning threads made a 4 s search take 140 s (see conftest).
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            "PATH": f"{REPO / '.venv/bin'}:{os.environ['PATH']}",
            **env,
        },
    )


def test_registry_cli_prints_the_production_run_id(local_model):
    result, settings = local_model
    registry.promote(result.version, settings)
    completed = _run([sys.executable, "-m", "training.registry", "resolve", "--field", "run_id"], settings.tracking_uri)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == result.run_id
    unknown = _run([sys.executable, "-m", "training.registry", "promote", "--version", "42"], settings.tracking_uri)
    assert unknown.returncode == 2 and unknown.stderr.startswith("error:")


def _empty_store(tmp_path: Path) -> str:
    """A tracking URI on an empty sqlite store in tmp_path, made here so its Default experiment keeps its
    artifacts in tmp_path/mlruns (an empty store made by `mlflow run` would use the repository's ./mlruns)."""
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    subprocess.run(
        [sys.executable, "-c", f"import mlflow; mlflow.MlflowClient({tracking_uri!r}).search_experiments()"],
        cwd=tmp_path,
        check=True,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
    )
    return tracking_uri


def _training_summary(stdout: str) -> dict:
    """The JSON `python -m training.train` prints last, after whatever `mlflow run` printed before it."""
    return json.loads(stdout[stdout.rindex('{\n  "run_id"') :])


def readme_commands() -> list[str]:
    return re.findall(r"^(mlflow run .*?)\s*$", (REPO / "README.md").read_text(), re.M)


def test_a_bare_mlflow_run_trains_on_several_months_and_registers_in_the_run_it_was_given(tmp_path):
    """`mlflow run .` in the project's venv, no --experiment-name, an empty store. Training logs
    into the run and experiment `mlflow run` made, and registers the model from there."""
    from mlflow import MlflowClient

    tracking_uri = _empty_store(tmp_path)
    # MLflow quotes each parameter, so both months arrive as one argument; TRAIN_SAMPLE keeps the run short.
    params = ["-P", "trials=1", "-P", "train_month=2021-01 2021-02", "-P", "val_month=2021-03", "-P", "test_month=2021-03"]
    assert "mlflow run . --env-manager local" in readme_commands()
    completed = _run(["mlflow", "run", ".", "--env-manager", "local", *params], tracking_uri, TRAIN_SAMPLE="20000")
    assert completed.returncode == 0, completed.stderr[-3000:]
    summary = _training_summary(completed.stdout)
    assert summary["version"] == "1" and summary["metrics"]["val_rmse"] <= 6.0
    client = MlflowClient(tracking_uri)
    run = client.get_run(summary["run_id"])
    assert run.info.experiment_id == "0" and run.info.status == "FINISHED"  # the run `mlflow run` created
    assert [e.name for e in client.search_experiments()] == ["Default"]  # no second experiment on the side
    assert client.get_model_version("ride-duration", "1").run_id == summary["run_id"]
    assert run.data.params["train_months"] == "2021-01,2021-02" and run.data.params["train_rows"] == "20000"
    [train_input] = [i for i in run.inputs.dataset_inputs if i.dataset.name == "train"]
    assert "green_tripdata_2021-01" in train_input.dataset.source and "green_tripdata_2021-02" in train_input.dataset.source


@pytest.mark.integration  # uv installs python_env.yaml's pins from PyPI (its cache makes a rebuild quick)
@pytest.mark.timeout(900)
def test_mlflow_run_with_no_parameters_builds_the_declared_environment_trains_and_registers(tmp_path):
    """The first thing a user runs, as the README shows it: MLflow builds python_env.yaml's environment
    (with uv: the virtualenv manager needs pyenv to build Python) and runs MLproject's defaults in it.
    Only TRAIN_SAMPLE, from the environment, keeps it short; MLproject's parameters and training's
    own must agree, or MLflow refuses the second value of a parameter."""
    from mlflow import MlflowClient

    command = "mlflow run . --env-manager uv"
    assert command in readme_commands()
    tracking_uri = _empty_store(tmp_path)
    # An environment root of the test's own: built here from python_env.yaml as it is now, never an earlier build.
    env_root = tmp_path / "envs"
    try:
        completed = _run(command.split(), tracking_uri, timeout=840, TRAIN_SAMPLE="3000", MLFLOW_ENV_ROOT=str(env_root))
    finally:
        shutil.rmtree(env_root, ignore_errors=True)  # a full environment: not kept among pytest's temp folders
    assert completed.returncode == 0, completed.stderr[-3000:]
    summary = _training_summary(completed.stdout)
    client = MlflowClient(tracking_uri)
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.project.env"] == "uv"
    params = run.data.params
    assert params["train_month"] == "2021-01" and params["trials"] == "3"  # MLproject's defaults, logged by `mlflow run`
    assert params["train_months"] == "2021-01" and params["sample"] == "3000" and params["train_rows"] == "3000"
    assert {"val_rmse", "test_rmse", "test_interval_coverage", "serving_form_max_abs_diff_minutes"} <= set(run.data.metrics)
    assert summary["version"] == "1" and client.get_model_version("ride-duration", "1").run_id == run.info.run_id
    assert client.get_logged_model(summary["model_uri"].removeprefix("models:/")).source_run_id == run.info.run_id


def test_the_sample_comes_from_the_environment_unless_the_command_line_gives_one(monkeypatch):
    from training import train as train_module

    seen = []
    monkeypatch.setattr(
        train_module, "train", lambda config, settings: seen.append(config.sample) or train_module.TrainResult("r", "m", {}, {})
    )
    monkeypatch.setenv("TRAIN_SAMPLE", "3000")
    assert train_module.main(["--trials", "1"]) == 0
    assert train_module.main(["--trials", "1", "--sample", "0"]) == 0  # 0: every row, whatever the environment says
    monkeypatch.setenv("TRAIN_SAMPLE", "")
    assert train_module.main(["--trials", "1"]) == 0
    assert seen == [3000, 0, None]


@pytest.mark.parametrize(
    "argv",
    [
        ["--train-month", "2021-01", "2021-02"],
        ["--train-month", "2021-01 2021-02"],
        ["--train-month", "2021-01,2021-02"],
        ["--train-month", " 2021-01, 2021-02 "],
    ],
)
def test_several_months_in_one_argument_or_many(argv):
    from training.train import _parse_args

    assert _parse_args(argv).train_month == ["2021-01", "2021-02"]
    assert _parse_args([]).train_month == ["2021-01"]


def test_data_base_is_passed_to_training_not_written_to_the_environment(monkeypatch):
    from training import train as train_module

    seen = {}

    def record_settings(config, settings):
        seen["settings"] = settings
        return train_module.TrainResult("run", "models:/m-1", {}, {})

    monkeypatch.delenv("TRIP_DATA_BASE", raising=False)
    monkeypatch.setattr(train_module, "train", record_settings)
    assert train_module.main(["--data-base", "gs://bucket/tlc", "--trials", "1"]) == 0
    assert seen["settings"].data_base == "gs://bucket/tlc"
    assert "TRIP_DATA_BASE" not in os.environ


@pytest.mark.integration
def test_postgresql_backend_store(tmp_path):
    """PostgreSQL as the tracking and registry store, as Cloud SQL would be in production."""
    import psycopg

    database = f"mlflow_test_{uuid.uuid4().hex[:8]}"
    admin = psycopg.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres", autocommit=True)
    admin.execute(f'CREATE DATABASE "{database}"')
    try:
        settings = settings_for(tmp_path, f"postgresql://postgres@127.0.0.1:5432/{database}")
        result = train(TrainConfig(trials=1, sample=5_000), settings)
        registry.promote(result.version, settings)
        assert registry.resolve("production", settings).run_id == result.run_id
        with psycopg.connect(host="127.0.0.1", port=5432, user="postgres", dbname=database) as rows:
            aliases = rows.execute("SELECT name, alias, version FROM registered_model_aliases").fetchall()
        assert aliases == [("ride-duration", "production", 1)]
    finally:
        # MLflow keeps pooled connections open; end them so the database can be dropped.
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()", (database,)
        )
        admin.execute(f'DROP DATABASE "{database}"')
        admin.close()


def test_progress_bars_are_drawn_on_a_terminal_and_never_into_logs(tmp_path):
    import io

    from rich.console import Console

    from data.progress import progress_bar

    terminal = Console(file=io.StringIO(), force_terminal=True, width=80)
    with progress_bar(terminal) as progress:
        progress.add_task("hgb trials", total=2, completed=2)
    assert "hgb trials" in terminal.file.getvalue() and "2/2" in terminal.file.getvalue()

    # A real search (two trials) with stderr going to a pipe, as in CI or a log file: no bar.
    completed = _run(
        [sys.executable, "-m", "training.train", "--trials", "2", "--sample", "3000", "--no-register"],
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        MLFLOW_ARTIFACT_ROOT=str(tmp_path / "artifacts"),
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "trials" not in completed.stderr and "━" not in completed.stderr


def test_an_experiment_created_meanwhile_by_another_process_is_used_not_an_error(tmp_path, monkeypatch):
    """Flows start several tasks at once: one may create the experiment between another's look-up and
    its create (RESOURCE_ALREADY_EXISTS), which must not fail the run."""
    import mlflow

    from training.settings import configure_mlflow

    settings = settings_for(tmp_path)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    mlflow.set_tracking_uri(settings.tracking_uri)
    existing = mlflow.create_experiment(settings.experiment_name)
    looked_up = mlflow.get_experiment_by_name
    calls = []

    def not_there_yet(name):  # the first look-up ran before the other process created it
        calls.append(name)
        return None if len(calls) == 1 else looked_up(name)

    monkeypatch.setattr(mlflow, "get_experiment_by_name", not_there_yet)
    assert configure_mlflow(settings) == existing
