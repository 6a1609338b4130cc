"""The backend's result listener in a process of its own, for the emulator reproduction in devstack.faults.

    python -m devstack.pull_probe MODE SUBSCRIPTION

It runs ``backend.stream.ResultListener`` in MODE (streaming or unary) on the subscription
and prints one JSON line per result it stores: the ride_id and when it was stored.
"""

from __future__ import annotations

import json
import sys
import threading
import time

from backend.results import Completion
from backend.settings import BackendSettings
from backend.stream import ResultListener


class PrintingStore:
    """Stores nothing: says which result arrived when."""

    def complete(self, ride_id: str, result: dict, status: str = "done") -> Completion:
        print(json.dumps({"ride_id": ride_id, "at": time.time()}), flush=True)
        return Completion.STORED


def main() -> None:
    mode, subscription = sys.argv[1], sys.argv[2]
    ResultListener(BackendSettings.from_env().project_id, subscription, PrintingStore(), mode).start()
    threading.Event().wait()


if __name__ == "__main__":
    main()
