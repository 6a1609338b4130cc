"""Training from the command line, as a user runs it: `mlflow run .` (MLproject's declared environment and the
project's venv), the registry CLI, and progress bars only on a terminal. Apart from tests/test_training.py so
that the two files run on two test workers (each `mlflow run` takes a minute)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from training import registry


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


def documented_commands() -> list[str]:
    """The `mlflow run` commands docs/training.md shows (the README's quickstart points there)."""
    return re.findall(r"^(mlflow run .*?)\s*$", (REPO / "docs/training.md").read_text(), re.M)


def test_a_bare_mlflow_run_trains_on_several_months_and_registers_in_the_run_it_was_given(tmp_path):
    """`mlflow run .` in the project's venv, no --experiment-name, an empty store. Training logs
    into the run and experiment `mlflow run` made, and registers the model from there."""
    from mlflow import MlflowClient

    tracking_uri = _empty_store(tmp_path)
    # The several-months command exactly as docs/training.md shows it (the shell's quoting: both months arrive as
    # one argument); trials=1 and TRAIN_SAMPLE keep the run short.
    command = 'mlflow run . --env-manager local -P train_month="2021-01 2021-02" -P val_month=2021-03 -P test_month=2022-01'
    assert command in documented_commands()
    completed = _run([*shlex.split(command), "-P", "trials=1"], tracking_uri, TRAIN_SAMPLE="20000")
    assert completed.returncode == 0, completed.stderr[-3000:]
    summary = _training_summary(completed.stdout)
    assert summary["version"] == "1" and summary["metrics"]["val_rmse"] <= 6.0
    client = MlflowClient(tracking_uri)
    run = client.get_run(summary["run_id"])
    assert run.info.experiment_id == "0" and run.info.status == "FINISHED"  # the run `mlflow run` created
    assert [e.name for e in client.search_experiments()] == ["Default"]  # no second experiment on the side
    assert client.get_model_version("ride-duration", "1").run_id == summary["run_id"]
    assert run.data.params["train_months"] == "2021-01,2021-02" and run.data.params["train_rows"] == "20000"
    assert run.data.params["val_months"] == "2021-03" and run.data.params["test_months"] == "2022-01"
    [train_input] = [i for i in run.inputs.dataset_inputs if i.dataset.name == "train"]
    assert "green_tripdata_2021-01" in train_input.dataset.source and "green_tripdata_2021-02" in train_input.dataset.source


@pytest.mark.integration  # uv installs python_env.yaml's pins from PyPI (its cache makes a rebuild quick)
@pytest.mark.timeout(900)
def test_mlflow_run_with_no_parameters_builds_the_declared_environment_trains_and_registers(tmp_path):
    """The first thing a user runs, as docs/training.md shows it: MLflow builds python_env.yaml's environment
    (with uv: the virtualenv manager needs pyenv to build Python) and runs MLproject's defaults in it.
    Only TRAIN_SAMPLE, from the environment, keeps it short; MLproject's parameters and training's
    own must agree, or MLflow refuses the second value of a parameter."""
    from mlflow import MlflowClient

    command = "mlflow run . --env-manager uv"
    assert command in documented_commands()
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
