"""Serving function cost: per-message handler time and cold start.

    python benchmarks/function_bench.py   # prints JSON

handler: decode + validate + featurize + predict one message, publish excluded (a
no-op publisher), against a bare ``model.predict`` of the same ride as a prebuilt frame.
cold start: a functions-framework process with RUN_ID, from process start until it
answers HTTP, against the naive ``import mlflow; mlflow.pyfunc.load_model(...)`` in a
fresh process, both loading the same model from the bucket (gcp-storage-emulator).
Targets (issue 4): handler <= 2x bare predict; cold start <= 0.5x naive.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from devstack.processes import free_port, function_server
from devstack.stack import ARTIFACT_ROOT, BUCKET, PROJECT, Stack

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # as the function runs (see devstack/stack.py)


RIDES = 300
COLD_STARTS = 3


def handler_vs_predict(model_uri: str) -> dict:
    from devstack.traffic import real_rides
    from serving_function.model_store import load_model
    from serving_function.prediction import RideDurationService

    class NoPublish:
        def publish(self, topic: str, data: bytes, **attributes: str) -> None:
            return None

    loaded = load_model(model_uri)
    service = RideDurationService(loaded.model, loaded.contract, NoPublish(), "pull", "dead", loaded.run_id)
    rides = [ride for ride, _ in real_rides(RIDES, seed=3)]
    messages = [base64.b64encode(json.dumps({**r, "ride_id": f"b{i}"}).encode()).decode() for i, r in enumerate(rides)]
    frames = [loaded.contract.features.rides_frame([loaded.contract.ride.Ride.model_validate(r)]) for r in rides]

    def timed(fn, items) -> list[float]:
        times = []
        for item in items:
            started = time.perf_counter()
            fn(item)
            times.append((time.perf_counter() - started) * 1000)
        return times

    for frame in frames[:20]:  # warm-up
        loaded.model.predict(frame)
    bare = timed(loaded.model.predict, frames)
    with contextlib.redirect_stdout(io.StringIO()):  # the handler's JSON log lines
        handler = timed(lambda m: service.handle(m, "bench"), messages)
    return {
        "messages": RIDES,
        "bare_predict_ms_median": round(statistics.median(bare), 3),
        "handler_ms_median": round(statistics.median(handler), 3),
        "handler_ms_p99": round(sorted(handler)[int(0.99 * len(handler))], 3),
        "ratio": round(statistics.median(handler) / statistics.median(bare), 2),
    }


def cold_starts(stack: Stack, run_id: str, model_uri: str) -> dict:
    ours, naive = [], []
    env = {**stack.env(), "RUN_ID": run_id, "MODEL_BUCKET": f"gs://{BUCKET}", "MODEL_PREFIX": "mlflow", "OMP_NUM_THREADS": "1"}
    naive_code = f"import mlflow; mlflow.pyfunc.load_model({model_uri!r})"
    for i in range(COLD_STARTS):
        server = function_server(stack.log_dir, "predict_duration", "event", env, port=free_port(), name=f"cold-start-{i}")
        started = time.perf_counter()
        with server:
            ours.append(time.perf_counter() - started)
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-c", naive_code],
            env={**os.environ, **env, "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "true"},
            check=True,
        )
        naive.append(time.perf_counter() - started)
    return {
        "runs": COLD_STARTS,
        "function_process_to_ready_s_median": round(statistics.median(ours), 2),
        "naive_mlflow_load_s_median": round(statistics.median(naive), 2),
        "ratio": round(statistics.median(ours) / statistics.median(naive), 2),
    }


def main() -> None:
    from training.settings import Settings
    from training.train import TrainConfig, train

    with tempfile.TemporaryDirectory(prefix="function-bench-") as tmp:
        stack = Stack(Path(tmp))
        try:
            stack.start_emulators()
            os.environ.update(stack.env())
            result = train(
                TrainConfig(trials=1, register=False),
                Settings(f"sqlite:///{tmp}/mlflow.db", "bench", ARTIFACT_ROOT, "bench", str(REPO / "data")),
            )
            from serving_function.model_store import find_model_uri

            model_uri = find_model_uri(BUCKET, result.run_id, "mlflow")
            handler = handler_vs_predict(model_uri)
            cold = cold_starts(stack, result.run_id, model_uri)
        finally:
            stack.stop_all()
    print(
        json.dumps(
            {
                "project": PROJECT,
                "model_uri": model_uri,
                "handler": handler,
                "cold_start": cold,
                "targets": {
                    "handler_within_2x_bare_predict": handler["ratio"] <= 2,
                    "cold_start_within_half_of_naive": cold["ratio"] <= 0.5,
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
