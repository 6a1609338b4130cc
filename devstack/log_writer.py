"""Run a service with its output in a size-capped log: the file and a few predecessors, never more.

    python devstack/log_writer.py --log LOG --max-bytes N --backups K -- ARGV...

The launcher forks a writer, points its own stdout and stderr at the writer's pipe, then execs ARGV:
the service keeps the launcher's PID and process group (Service.stop and SIGSTOP reach it as before),
and the writer, a child in the same group, goes down with it. The writer ignores SIGINT and SIGTERM
so that a service's last words while it stops are kept; it ends when nobody holds the pipe any more
(SIGKILL, the last of stop_pid's signals, ends it too).

Standard library only: it runs under whatever Python starts the stack, before the service exists.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from logging.handlers import RotatingFileHandler


def rotating_handler(log: str, max_bytes: int, backups: int) -> RotatingFileHandler:
    """Writes each line as it came (no prefix: the service formats its own), moving the file to LOG.1
    (LOG.1 to LOG.2 ...) before it would pass ``max_bytes``; LOG.<backups+1> is never kept."""
    handler = RotatingFileHandler(log, maxBytes=max_bytes, backupCount=backups, encoding="utf-8", errors="replace")
    handler.terminator = ""  # lines keep their own newline
    handler.setFormatter(logging.Formatter("%(message)s"))
    return handler


def copy_lines(source, handler: RotatingFileHandler) -> None:
    """Every line of ``source`` (bytes) into ``handler`` until end of file, each flushed at once (log_tail reads it live)."""
    for line in iter(source.readline, b""):
        handler.emit(logging.makeLogRecord({"msg": line.decode("utf-8", errors="replace"), "args": None}))


def write_log(read_fd: int, log: str, max_bytes: int, backups: int) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    handler = rotating_handler(log, max_bytes, backups)
    with os.fdopen(read_fd, "rb", buffering=0) as source:
        copy_lines(source, handler)
    handler.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log", required=True)
    parser.add_argument("--max-bytes", type=int, required=True)
    parser.add_argument("--backups", type=int, required=True)
    parser.add_argument("argv", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    read_fd, write_fd = os.pipe()
    if os.fork() == 0:  # the writer
        os.close(write_fd)
        write_log(read_fd, args.log, args.max_bytes, args.backups)
        os._exit(0)
    os.close(read_fd)
    os.dup2(write_fd, sys.stdout.fileno())
    os.dup2(write_fd, sys.stderr.fileno())
    os.close(write_fd)
    os.execvp(argv[0], argv)  # noqa: S606 - the service's own argv, as Popen had it; a missing binary's error goes to the log, through the writer


if __name__ == "__main__":
    main()
