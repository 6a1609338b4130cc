"""Training on the real TLC months: quality, what the MLflow run holds, the registry, PostgreSQL, `mlflow run`."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest
from conftest import DATA

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
    # A second version of the same logged model: the registry's moves are the subject here, not training.
    second = registry.register(first.model_uri, first.run_id, settings)
    assert (first.version, str(second.version)) == ("1", "2")
    assert registry.current_version(registry.PRODUCTION, settings) is None

    assert registry.promote(first.version, settings) is None
    assert registry.promote(str(second.version), settings) == "1"
    assert registry.current_version(registry.PREVIOUS, settings) == "1"
    resolved = registry.resolve(registry.PRODUCTION, settings)
    assert (resolved.version, resolved.run_id) == ("2", second.run_id)
    assert resolved.artifact_uri.startswith(str(tmp_path / "artifacts")) and resolved.artifact_uri.endswith("/artifacts")
    assert os.path.isfile(os.path.join(resolved.artifact_uri, "MLmodel"))

    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException):
        registry.promote("99", settings)


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
    """PostgreSQL as the tracking and registry store, as Cloud SQL would be in production (a database of the
    test's own, from the stack's template: MLflow's current schema, migrated once per version)."""
    import psycopg

    from devstack.stack import create_database, drop_database

    database = f"mlflow_test_{uuid.uuid4().hex[:8]}"
    try:
        settings = settings_for(tmp_path, create_database(database))
        result = train(TrainConfig(trials=1, sample=5_000), settings)
        registry.promote(result.version, settings)
        assert registry.resolve("production", settings).run_id == result.run_id
        with psycopg.connect(host="127.0.0.1", port=5432, user="postgres", dbname=database) as rows:
            aliases = rows.execute("SELECT name, alias, version FROM registered_model_aliases").fetchall()
        assert aliases == [("ride-duration", "production", 1)]
    finally:
        drop_database(database)  # WITH (FORCE): MLflow's pooled connections end with it


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
