"""Serving function cost: per-ride handler time, cold start and memory, each against its baseline in the same run.

    python benchmarks/function_bench.py   # prints JSON

The model is the default training (January 2021, all rows), logged to the emulated bucket.
- handler: decode + validate + featurize + score one message with its range (three serving
  forms), publish excluded (a no-op publisher), against the logged sklearn pipeline's ``predict``
  of the same ride as a prebuilt one-row DataFrame (the pipeline's cost alone, no decoding or
  validation); and the same handler without the range, for what the range costs per ride.
- cold start: a functions-framework process with RUN_ID, from process start until it answers
  HTTP, against the naive ``import mlflow; mlflow.pyfunc.load_model(...)`` in a fresh process.
- memory: PSS of the function's process tree once ready (functions-framework and its worker).
The same three for benchmarks/pipeline_function, the function as it was before serving forms
(the logged pipeline, unpickled), show what the serving form changed.
Targets (issue 13): handler <= 0.15x pipeline predict; cold start <= 0.35x naive;
memory <= half of the pipeline function's.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from devstack.processes import free_port, function_server
from devstack.stack import ARTIFACT_ROOT, BUCKET, PROJECT, Stack
from devstack.usage import memory_mb

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # as the function runs (see devstack/stack.py)
log = logging.getLogger("function_bench")

RIDES = 1000
COLD_STARTS = 3
PIPELINE_FUNCTION = REPO / "benchmarks/pipeline_function/main.py"


def _timed_ms(fn, items) -> list[float]:
    times = []
    for item in items:
        started = time.perf_counter()
        fn(item)
        times.append((time.perf_counter() - started) * 1000)
    return times


def handler_vs_pipeline(model_uri: str, pipeline) -> dict:
    from devstack.traffic import real_rides
    from ride_contract.sklearn_features import rides_frame
    from serving_function.model_store import load_model
    from serving_function.prediction import RideDurationService

    class NoPublish:
        def publish(self, topic: str, data: bytes, **attributes: str) -> None:
            return None

    loaded = load_model(model_uri)
    rides = [ride for ride, _ in real_rides(RIDES, seed=3)]
    messages = [base64.b64encode(json.dumps({**r, "ride_id": f"b{i}"}).encode()).decode() for i, r in enumerate(rides)]
    frames = [rides_frame([loaded.contract.ride.Ride.model_validate(r)]) for r in rides]

    def handle_all(model, interval=None) -> list[float]:
        service = RideDurationService(model, loaded.contract, NoPublish(), "pull", "dead", loaded.run_id, interval=interval)
        with contextlib.redirect_stdout(io.StringIO()):  # the handler's JSON log lines
            _timed_ms(lambda m: service.handle(m, "warm-up"), messages[:20])
            return _timed_ms(lambda m: service.handle(m, "bench"), messages)

    for frame in frames[:20]:  # warm-up
        pipeline.predict(frame)
    bare = statistics.median(_timed_ms(pipeline.predict, frames))
    handler = handle_all(loaded.model, loaded.interval)
    without_range = handle_all(loaded.model)
    from pipeline_function.pipeline_model import PipelineModel  # the function before serving forms

    old_handler = handle_all(PipelineModel(pipeline))
    return {
        "messages": RIDES,
        "pipeline_predict_ms_median": round(bare, 3),
        "handler_ms_median": round(statistics.median(handler), 3),
        "handler_ms_p99": round(sorted(handler)[int(0.99 * len(handler))], 3),
        "ratio": round(statistics.median(handler) / bare, 3),
        "handler_without_range_ms_median": round(statistics.median(without_range), 3),
        "range_ms_per_ride": round(statistics.median(handler) - statistics.median(without_range), 3),
        "pipeline_function_handler_ms_median": round(statistics.median(old_handler), 3),
    }


def _start_measured(stack: Stack, env: dict, name: str, source: Path | None = None) -> tuple[float, dict]:
    """Process start to ready in seconds, and memory once ready, of one function server."""
    kwargs = {"source": source} if source else {}
    server = function_server(stack.log_dir, "predict_duration", "event", env, port=free_port(), name=name, **kwargs)
    started = time.perf_counter()
    with server:
        ready = time.perf_counter() - started
        return ready, memory_mb(server.pid)


def cold_starts_and_memory(stack: Stack, run_id: str, model_uri: str) -> dict:
    env = {**stack.env(), "RUN_ID": run_id, "MODEL_BUCKET": f"gs://{BUCKET}", "MODEL_PREFIX": "mlflow", "OMP_NUM_THREADS": "1"}
    naive_code = f"import mlflow; mlflow.pyfunc.load_model({model_uri!r})"
    ours, old, naive, our_memory, old_memory = [], [], [], [], []
    for i in range(COLD_STARTS):
        seconds, memory = _start_measured(stack, env, f"cold-start-{i}")
        ours.append(seconds)
        our_memory.append(memory)
        seconds, memory = _start_measured(stack, env, f"pipeline-function-{i}", PIPELINE_FUNCTION)
        old.append(seconds)
        old_memory.append(memory)
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-c", naive_code],
            env={**os.environ, **env, "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "true"},
            check=True,
        )
        naive.append(time.perf_counter() - started)
        log.info("cold start %d: function %.2f s, pipeline function %.2f s, naive %.2f s", i, ours[-1], old[-1], naive[-1])

    def median_memory(samples: list[dict]) -> dict:
        return {key: statistics.median(s[key] for s in samples) for key in samples[0]}

    memory, old_mem = median_memory(our_memory), median_memory(old_memory)
    return {
        "cold_start": {
            "runs": COLD_STARTS,
            "function_process_to_ready_s_median": round(statistics.median(ours), 2),
            "naive_mlflow_load_s_median": round(statistics.median(naive), 2),
            "ratio": round(statistics.median(ours) / statistics.median(naive), 2),
            "pipeline_function_process_to_ready_s_median": round(statistics.median(old), 2),
        },
        "memory": {
            "function": memory,
            "pipeline_function": old_mem,
            "ratio_pss": round(memory["pss_mb"] / old_mem["pss_mb"], 2),
        },
    }


def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    import mlflow

    from serving_function.model_store import find_model_uri
    from training.settings import Settings
    from training.train import TrainConfig, train

    with tempfile.TemporaryDirectory(prefix="function-bench-") as tmp:
        stack = Stack(Path(tmp))
        try:
            stack.start_emulators()
            os.environ.update(stack.env())
            settings = Settings(f"sqlite:///{tmp}/mlflow.db", "bench", ARTIFACT_ROOT, "bench", str(REPO / "data"))
            with contextlib.redirect_stdout(sys.stderr):
                result = train(TrainConfig(trials=1, register=False), settings)
            mlflow.set_tracking_uri(settings.tracking_uri)
            os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "true"  # our own model, for the reference pipeline
            pipeline = mlflow.sklearn.load_model(result.model_uri)
            model_uri = find_model_uri(BUCKET, result.run_id, "mlflow")
            handler = handler_vs_pipeline(model_uri, pipeline)
            starts = cold_starts_and_memory(stack, result.run_id, model_uri)
        finally:
            stack.stop_all()
    cold, memory = starts["cold_start"], starts["memory"]
    print(
        json.dumps(
            {
                "project": PROJECT,
                "model_uri": model_uri,
                "handler": {**handler, "target_ratio": 0.15, "met": handler["ratio"] <= 0.15},
                "cold_start": {**cold, "target_ratio": 0.35, "met": cold["ratio"] <= 0.35},
                "memory": {**memory, "target_ratio_pss": 0.5, "met": memory["ratio_pss"] <= 0.5},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
