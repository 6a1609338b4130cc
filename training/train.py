"""Train a ride-duration model on TLC months, log everything to MLflow, register it.

    python -m training.train --train-month 2021-01 --val-month 2021-02 --test-month 2021-03

The run logs params, RMSE/MAE/R2 on validation and test, the data it read,
plots, the coarse estimator the backend answers with, and the model (feature
step included) with signature, input example, pinned requirements and its
serving form (what the Cloud Function scores with, checked against the pipeline), and the
rider's range (10th/90th percentile models conformalized on the validation month, their
coverage and median width on validation and test). A LinearRegression baseline and each
hyperparameter trial are nested runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import mean_absolute_error, r2_score, root_mean_squared_error
from sklearn.pipeline import Pipeline

import ride_contract
from data import TLC_DOWNLOAD_BASE, TripDataError, load_trips, month_uri
from data.progress import progress_bar
from ride_contract.features import FEATURE_COLUMNS
from ride_contract.result import served_minutes, served_range
from ride_contract.ride import RIDE_COLUMNS, InvalidRide, parse_ride
from ride_contract.serving_form import FILE_NAME as SERVING_FORM_FILE
from ride_contract.serving_form import REFERENCE_FILE, ServingForm
from training import coarse, interval, serving_form
from training.models import DEFAULT_PARAMS, MODEL_FAMILIES, build_pipeline, pip_requirements, suggest_params
from training.settings import Settings, configure_mlflow

log = logging.getLogger("training")
MODEL_ARTIFACT_NAME = "model"
TARGET = "duration"


@dataclass
class TrainConfig:
    train_months: list[str] = field(default_factory=lambda: ["2021-01"])
    val_months: list[str] = field(default_factory=lambda: ["2021-02"])
    test_months: list[str] = field(default_factory=lambda: ["2021-03"])
    family: str = "hgb"
    trials: int = 3
    register: bool = True
    sample: int | None = None  # rows per split, for quick runs; None = all
    # Deliberately broken, for the guarded rollout's demo and tests: the training rides' durations are
    # permuted among them (features keep their rows), so the model learns nothing true of a ride. It
    # loads, answers within bounds and passes pre-flight (its reference answers are its own); only the
    # shadow analysis on live rides can tell.
    shuffle_targets: bool = False


@dataclass
class TrainResult:
    run_id: str
    model_uri: str
    metrics: dict[str, float]
    params: dict[str, Any]
    version: str | None = None
    fit_seconds: float = 0.0


def load_split(months: list[str], settings: Settings, sample: int | None = None) -> tuple[pd.DataFrame, list[str]]:
    uris = [month_uri(m, settings.data_base) for m in months]
    frame = load_trips(uris)
    if sample and len(frame) > sample:
        frame = frame.sample(sample, random_state=0).reset_index(drop=True)
    return frame, uris


def score(model: Any, frame: pd.DataFrame) -> dict[str, float]:
    """The model's metrics on the answers riders get: predictions clipped into the duration bounds."""
    predicted = served_minutes(model.predict(frame[RIDE_COLUMNS]))
    actual = frame[TARGET].to_numpy()
    return {
        "rmse": float(root_mean_squared_error(actual, predicted)),
        "mae": float(mean_absolute_error(actual, predicted)),
        "r2": float(r2_score(actual, predicted)),
    }


def fit(family: str, params: dict[str, Any], train: pd.DataFrame) -> Pipeline:
    return build_pipeline(family, params).fit(train[RIDE_COLUMNS], train[TARGET])


def _log_metrics(prefix: str, metrics: dict[str, float]) -> None:
    import mlflow

    mlflow.log_metrics({f"{prefix}_{k}": v for k, v in metrics.items()})


def search(family: str, trials: int, train: pd.DataFrame, val: pd.DataFrame) -> tuple[Pipeline, dict[str, Any], float]:
    """Best pipeline by validation RMSE; every candidate is a nested MLflow run."""
    import mlflow

    def run_candidate(name: str, fam: str, params: dict[str, Any]) -> tuple[Pipeline, float]:
        with mlflow.start_run(run_name=name, nested=True):
            mlflow.log_params({"model_family": fam, **params})
            start = time.perf_counter()
            model = fit(fam, params, train)
            mlflow.log_metric("fit_seconds", time.perf_counter() - start)
            metrics = score(model, val)
            _log_metrics("val", metrics)
            log.info("%s: val RMSE %.3f", name, metrics["rmse"])
            return model, metrics["rmse"]

    if family != "hgb" or trials <= 1:
        params = dict(DEFAULT_PARAMS[family])
        model, rmse = run_candidate(f"{family}-default", family, params)
        return model, params, rmse

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=0))
    study.enqueue_trial(DEFAULT_PARAMS[family])  # the search can only improve on the defaults
    best: dict[str, Any] = {"rmse": float("inf")}

    def objective(trial: optuna.Trial) -> float:
        params = suggest_params(trial, family)
        model, rmse = run_candidate(f"{family}-trial-{trial.number}", family, params)
        if rmse < best["rmse"]:
            best.update(rmse=rmse, model=model, params=params)
        return rmse

    with progress_bar() as progress:  # on a terminal only: logs and CI output stay clean
        trial_bar = progress.add_task(f"{family} trials", total=trials)
        for _ in range(trials):
            study.optimize(objective, n_trials=1)
            progress.update(trial_bar, advance=1, description=f"{family} trials (best val RMSE {best['rmse']:.3f})")
    return best["model"], best["params"], best["rmse"]


def _log_plots(model: Pipeline, frame: pd.DataFrame, split: str, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow

    predicted = served_minutes(model.predict(frame[RIDE_COLUMNS]))
    actual = frame[TARGET].to_numpy()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    left.hexbin(actual, predicted, gridsize=60, bins="log", cmap="viridis")
    left.plot([0, 60], [0, 60], color="red", linewidth=1)
    left.set(xlabel="actual duration (min)", ylabel="predicted (min)", title=f"Predicted vs actual ({split})")
    residuals = actual - predicted
    right.hist(residuals, bins=120, range=(-40, 40), color="steelblue")
    right.set(
        xlabel="actual - predicted (min)", ylabel="rides", title=f"Residuals ({split}), RMSE {np.sqrt(np.mean(residuals**2)):.2f}"
    )
    fig.tight_layout()
    path = out_dir / f"{split}_predictions.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    mlflow.log_artifact(str(path), artifact_path="plots")


# The ride contract travels inside every model (MLflow code_paths): the serving function
# validates, featurizes and answers with exactly the code the model was trained with.
CONTRACT_DIR = Path(ride_contract.__file__).resolve().parent


REFERENCE_RIDES = 200


def write_reference_rides(model: Pipeline, ride_range: interval.FittedInterval, test: pd.DataFrame, out_dir: Path) -> Path:
    """Real test rides a rider can send, with the pipeline's answers and ranges as served: what a rollout's
    pre-flight checks the version against, through the serving function's own loader and scorer."""
    rows = test[RIDE_COLUMNS].sample(min(len(test), REFERENCE_RIDES * 2), random_state=0).to_dict("records")
    rides = []
    for row in rows:
        ride = {**row, "datetime": row["datetime"].isoformat(sep=" "), "trip_distance": float(row["trip_distance"])}
        try:
            parse_ride(ride)
        except InvalidRide:
            continue
        rides.append({k: v.item() if hasattr(v, "item") else v for k, v in ride.items()})
        if len(rides) == REFERENCE_RIDES:
            break
    frame = pd.DataFrame(rides, columns=RIDE_COLUMNS)
    predicted = model.predict(frame)
    low, high = served_range(predicted, *ride_range.bounds(frame))
    path = out_dir / REFERENCE_FILE
    served = {"served_minutes": served_minutes(predicted).tolist(), "served_low": low.tolist(), "served_high": high.tolist()}
    path.write_text(json.dumps({"rides": rides, **served}))
    return path


def log_model(model: Pipeline, example: pd.DataFrame, files: list[Path], metadata: dict[str, Any]) -> str:
    """Log the pipeline with its serving form and reference rides to the active run; returns its models:/ URI.

    Both go into the same model folder (the sklearn flavor's extra_files), so a registered
    version is still one folder, and mlflow.pyfunc.load_model still works."""
    import mlflow
    from mlflow.models import infer_signature

    example = example[RIDE_COLUMNS].head(5).reset_index(drop=True)
    info = mlflow.sklearn.log_model(
        model,
        name=MODEL_ARTIFACT_NAME,
        signature=infer_signature(example, model.predict(example)),
        input_example=example,
        pip_requirements=pip_requirements(),
        code_paths=[str(CONTRACT_DIR)],
        serialization_format=mlflow.sklearn.SERIALIZATION_FORMAT_CLOUDPICKLE,
        extra_files=[str(path) for path in files],
        metadata=metadata,
    )
    return info.model_uri


def write_serving_form(model: Pipeline, frames: dict[str, pd.DataFrame], out_dir: Path) -> tuple[Path, float]:
    """The model's serving form, checked against the pipeline on the validation and test rides."""
    path = serving_form.write(model, out_dir / SERVING_FORM_FILE)
    rides = pd.concat([frames["val"], frames["test"]], ignore_index=True)
    return path, serving_form.check_parity(model, ServingForm.load(path), rides)


@dataclass
class Splits:
    """The train/val/test frames and the files each came from (for lineage)."""

    frames: dict[str, pd.DataFrame]
    uris: dict[str, list[str]]


def load_splits(config: TrainConfig, settings: Settings) -> Splits:
    splits = Splits({}, {})
    for name, months in (("train", config.train_months), ("val", config.val_months), ("test", config.test_months)):
        splits.frames[name], splits.uris[name] = load_split(months, settings, config.sample)
        log.info("%s: %s rows from %s", name, f"{len(splits.frames[name]):,}", ", ".join(splits.uris[name]))
    if config.shuffle_targets:
        train_frame = splits.frames["train"]
        train_frame[TARGET] = np.random.default_rng(0).permutation(train_frame[TARGET].to_numpy())
        log.warning("training on SHUFFLED durations: this model is broken on purpose")
    return splits


def fit_and_log(config: TrainConfig, splits: Splits, settings: Settings) -> TrainResult:
    """One MLflow run: baseline and search as nested runs, metrics, plots, coarse estimator, the model."""
    import mlflow

    configure_mlflow(settings)
    frames = splits.frames
    with (
        mlflow.start_run(run_name=f"{config.family}-{'+'.join(config.train_months)}") as run,
        tempfile.TemporaryDirectory() as tmp,
    ):
        mlflow.log_params(
            {
                "model_family": config.family,
                "trials": config.trials,
                "train_months": ",".join(config.train_months),
                "val_months": ",".join(config.val_months),
                "test_months": ",".join(config.test_months),
                "sample": config.sample or "all",
                **({"shuffle_targets": True} if config.shuffle_targets else {}),
                **{f"{n}_rows": len(f) for n, f in frames.items()},
            }
        )
        for name, frame in frames.items():
            mlflow.log_input(mlflow.data.from_pandas(frame, source=",".join(splits.uris[name]), name=name), context=name)

        baseline, _, _ = search("linear", 1, frames["train"], frames["val"]) if config.family != "linear" else (None, None, None)
        start = time.perf_counter()
        model, params, _ = search(config.family, config.trials, frames["train"], frames["val"])
        search_seconds = time.perf_counter() - start
        mlflow.log_params({f"best_{k}": v for k, v in params.items()})

        metrics = {"search_seconds": search_seconds}
        for split in ("val", "test"):
            metrics.update({f"{split}_{k}": v for k, v in score(model, frames[split]).items()})
            if baseline is not None:
                metrics[f"baseline_{split}_rmse"] = score(baseline, frames[split])["rmse"]
            _log_plots(model, frames[split], split, Path(tmp))

        # The backend's instant estimate, fitted on the same training rows.
        coarse_model = coarse.fit(frames["train"], trained_on=",".join(config.train_months))
        coarse_path = Path(tmp) / coarse.ARTIFACT_FILE
        coarse_path.write_text(json.dumps(coarse_model.to_dict(), indent=1))
        mlflow.log_artifact(str(coarse_path))
        for split in ("val", "test"):
            metrics[f"coarse_{split}_rmse"] = coarse.rmse(coarse_model, frames[split])

        # The rider's range: quantile models on the same training rows, calibrated on the validation month.
        ride_range = interval.fit(frames["train"], frames["val"], TARGET)
        metrics["interval_margin_minutes"] = ride_range.margin_minutes
        for split in ("val", "test"):
            metrics.update({f"{split}_{k}": v for k, v in interval.metrics(model, ride_range, frames[split], TARGET).items()})
        log.info(
            "range: %.1f %% of test rides within it (nominal %.0f %%), median width %.1f min",
            100 * metrics["test_interval_coverage"],
            100 * interval.NOMINAL_COVERAGE,
            metrics["test_interval_median_width"],
        )
        mlflow.log_metrics(metrics)

        form_path, form_difference = write_serving_form(model, frames, Path(tmp))
        mlflow.log_metric("serving_form_max_abs_diff_minutes", form_difference)
        range_files = interval.write(ride_range, frames["test"], config.val_months, Path(tmp))
        model_uri = log_model(
            model,
            frames["train"],
            [form_path, write_reference_rides(model, ride_range, frames["test"], Path(tmp)), *range_files],
            metadata={"train_months": config.train_months, "feature_columns": FEATURE_COLUMNS},
        )
        return TrainResult(run.info.run_id, model_uri, metrics, params, fit_seconds=search_seconds)


def train(config: TrainConfig, settings: Settings | None = None) -> TrainResult:
    """Load, train, log and (unless told not to) register: the whole job."""
    from training import registry

    settings = settings or Settings.from_env()
    result = fit_and_log(config, load_splits(config, settings), settings)
    if config.register:
        result.version = str(registry.register(result.model_uri, result.run_id, settings).version)
    return result


def months(value: str) -> list[str]:
    """One or more YYYY-MM in one argument, separated by commas or spaces.

    ``mlflow run -P train_month="2021-01 2021-02"`` passes both months as one quoted argument."""
    found = [m for m in re.split(r"[,\s]+", value.strip()) if m]
    if not found:
        raise argparse.ArgumentTypeError("expected one or more months like 2021-01")
    return found


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    month_help = "YYYY-MM; several as separate arguments or in one, separated by commas or spaces"
    parser.add_argument("--train-month", type=months, nargs="+", default=[["2021-01"]], help=month_help)
    parser.add_argument("--val-month", type=months, nargs="+", default=[["2021-02"]], help=month_help)
    parser.add_argument("--test-month", type=months, nargs="+", default=[["2021-03"]], help=month_help)
    parser.add_argument("--model-family", choices=MODEL_FAMILIES, default="hgb")
    parser.add_argument("--trials", type=int, default=TrainConfig.trials, help="hyperparameter trials (1 = defaults only)")
    parser.add_argument(
        "--sample", type=int, default=None, help="rows per split (quick runs); 0 = all; default: TRAIN_SAMPLE, else all"
    )
    parser.add_argument(
        "--data-base", default=None, help='folder, gs:// prefix or URL with the TLC files; "tlc": the public download'
    )
    parser.add_argument("--no-register", action="store_true", help="log the model but do not register it")
    parser.add_argument(
        "--shuffle-targets", action="store_true", help="train a deliberately broken model (the rollout guard's demo)"
    )
    args = parser.parse_args(argv)
    for name in ("train_month", "val_month", "test_month"):
        setattr(args, name, [month for group in getattr(args, name) for month in group])
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = _parse_args(argv)
    settings = Settings.from_env()
    if args.data_base:
        settings = replace(settings, data_base=TLC_DOWNLOAD_BASE if args.data_base == "tlc" else args.data_base)
    config = TrainConfig(
        args.train_month,
        args.val_month,
        args.test_month,
        args.model_family,
        args.trials,
        not args.no_register,
        settings.train_sample if args.sample is None else args.sample,
        args.shuffle_targets,
    )
    try:
        result = train(config, settings)
    except TripDataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(asdict(result), indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
