"""CPU time and memory of the stack's processes, read from /proc (Linux), for the benchmarks.

A service is a process tree (a wrapper script and its JVM, gunicorn and its workers), so
every figure is summed over the tree. Memory is PSS: pages shared between a gunicorn
master and its forked workers count once, split between them.
"""

from __future__ import annotations

import os
from pathlib import Path

_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants that are alive now."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                todo += [int(child) for child in (task / "children").read_text().split()]
            except OSError:
                continue
    return [p for p in found if Path(f"/proc/{p}").exists()]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time used so far by ``pid``'s tree (threads included)."""
    total = 0
    for process in process_tree(pid):
        try:
            stat = Path(f"/proc/{process}/stat").read_text()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()  # the command name may hold spaces: parse after it
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / _TICKS_PER_SECOND


def memory_mb(pid: int) -> dict[str, float]:
    """PSS of ``pid``'s tree, and the largest RSS of one process in it, in MiB."""
    pss = rss = 0
    for process in process_tree(pid):
        try:
            rollup = Path(f"/proc/{process}/smaps_rollup").read_text().splitlines()
        except OSError:
            continue
        fields = {line.split(":")[0]: int(line.split()[1]) for line in rollup[1:] if line.endswith("kB")}
        pss += fields.get("Pss", 0)
        rss = max(rss, fields.get("Rss", 0))
    return {"pss_mb": round(pss / 1024, 1), "largest_rss_mb": round(rss / 1024, 1)}
