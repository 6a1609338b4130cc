"""The access record: one JSON line per distinct (identity, service, resource, action) a deployable was seen to use.

Lines are appended as soon as a use is first seen, under a file lock, so a record survives its writer being
killed, and several writers (the recorder process, the stack handing out a secret) never duplicate a line.
"""

from __future__ import annotations

import fcntl
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True, order=True)
class Use:
    identity: str  # the deployable's identity, as infra/ names its service account ("function", "rollout", ...)
    service: str  # "storage", "pubsub", "secretmanager", "run"
    resource: str  # the local resource: "bucket:<name>", "topic:<name>", "subscription:<name>", "secret:<name>", ...
    action: str  # "read", "write", "delete", "publish", "consume", "view", "admin", "attach", "access", "deploy", ...

    def line(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def uses_in(text: str) -> set[Use]:
    """The uses in a record's text (a torn last line, from a writer killed mid-write, is skipped)."""
    found = set()
    for line in text.splitlines():
        try:
            found.add(Use(**json.loads(line)))
        except (ValueError, TypeError):
            continue
    return found


def read_record(path: str | Path) -> set[Use]:
    """Every use recorded in ``path`` (none when it does not exist yet)."""
    try:
        return uses_in(Path(path).read_text())
    except FileNotFoundError:
        return set()


def append_new_uses(path: str | Path, uses: Iterable[Use]) -> list[Use]:
    """Append the uses ``path`` does not hold yet; return them. The lock makes check-and-append one step
    across processes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as record:
        fcntl.flock(record, fcntl.LOCK_EX)
        record.seek(0)
        known = uses_in(record.read())
        new = sorted(set(uses) - known)
        if new:
            # One write per batch, newline-terminated: a line is either whole or torn at the end.
            record.write("".join(use.line() + "\n" for use in new))
            record.flush()
        return new


def record_use(record_file: str | Path, identity: str, service: str, resource: str, action: str) -> bool:
    """Record a use that is no emulator call (a revision deployed, a secret handed to a process); True if new."""
    return bool(append_new_uses(record_file, [Use(identity, service, resource, action)]))
