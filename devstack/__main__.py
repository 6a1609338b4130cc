"""The local stack's commands.

python -m devstack demo       # start everything, train, serve, stream real rides, redeploy; leaves the stack up
python -m devstack redeploy   # restart the function with the RUN_ID of the `production` alias
python -m devstack rollback   # production <- previous in the stack's registry, then redeploy
python -m devstack status     # what runs where, and what is dead
python -m devstack restart SERVICE   # stop (the whole process group) and start again: same port, same data
python -m devstack down       # stop every process the stack started, by PID
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from devstack.processes import ServiceError, answers_http, pid_alive
from devstack.stack import DEFAULT_STACK_DIR, Stack
from devstack.traffic import real_rides, stream, summarize

# Wide enough for the ride table even when output goes to a file or CI log (rich assumes 80 there).
console = Console(width=max(110, shutil.get_terminal_size((110, 24)).columns))


def _start_redis(stack: Stack) -> str:
    """The stack's own Redis (with AOF, so a restart keeps the results) for the backend replicas;
    without redis-server on the machine, one replica keeps its results in memory."""
    try:
        return stack.start_redis()
    except ServiceError as exc:
        console.print(f"[yellow]{exc}: one backend replica, results in memory[/yellow]")
        return ""


def _resolve_production(stack: Stack):
    from training import registry
    from training.settings import Settings

    stack.apply_env()
    return registry.resolve(registry.PRODUCTION, Settings.from_env())


def _show(outcomes, summary: dict, title: str, rows: int = 12) -> None:
    table = Table(title=title)
    for column in ("ride_id", "pickup", "PU->DO", "miles", "coarse", "final", "actual", "model"):
        table.add_column(column, justify="right")
    for o in outcomes[:rows]:
        table.add_row(
            (o.ride_id or "-")[:12],
            o.ride["datetime"][5:16],
            f"{o.ride['PULocationID']}->{o.ride['DOLocationID']}",
            f"{o.ride['trip_distance']:.1f}",
            f"{o.duration_coarse:.1f}" if o.duration_coarse is not None else "-",
            f"{o.duration_final:.1f}" if o.duration_final is not None else o.error or "-",
            f"{o.actual:.1f}",
            f"v{o.model_version}" if o.model_version else "-",
        )
    console.print(table)
    console.print_json(json.dumps(summary))


def demo(args: argparse.Namespace) -> int:
    stack = Stack(args.stack_dir)
    if stack.state_path.exists():
        console.print(f"[red]a stack is already running ({stack.state_path}); `make down` first[/red]")
        return 2
    # The emulators keep nothing between runs: an earlier demo's MLflow store would point at
    # models that no longer exist in the bucket, so every demo starts from an empty stack folder.
    shutil.rmtree(stack.dir, ignore_errors=True)
    try:
        with console.status("starting the Pub/Sub emulator, gcp-storage-emulator and the MLflow server"):
            stack.start_emulators()
            stack.start_mlflow(args.mlflow_backend_store)
            stack.ensure_topology()
        if not args.no_prefect_server:
            with console.status("starting the Prefect server (about 30 s)"):
                stack.start_prefect()
        console.rule("1. Prefect training flow on Jan/Feb/Mar 2021")
        first = stack.run_training_flow("--trials", "1")
        console.print(f"v{first['version']} -> {first['alias']}: {first['reason']}")

        production = _resolve_production(stack)
        redis_url = _start_redis(stack)
        replicas = 2 if redis_url else 1
        with console.status(f"starting the function (RUN_ID {production.run_id}) and {replicas} backend replica(s)"):
            stack.start_function(production.run_id, production.version)
            stack.start_backends(replicas, redis_url)
        console.print(f"function serves v{production.version} (RUN_ID {production.run_id}) from {production.artifact_uri}")
        console.print(f"backend: {replicas} replica(s), results in {'Redis ' + redis_url if redis_url else 'memory'}")

        console.rule(f"2. {args.rides} real March 2021 rides through POST /predict")
        rides = real_rides(args.rides)
        started = time.perf_counter()
        outcomes = stream(stack.backend_urls, rides)
        _show(outcomes, summarize(outcomes, time.perf_counter() - started), "coarse now, final through the stream (minutes)")

        console.rule("3. Lifecycle: train again, promote, redeploy")
        second = stack.run_training_flow("--trials", "3", "--sample", "40000")
        console.print(f"v{second['version']} -> {second['alias']}: {second['reason']}")
        if not second["promoted"]:
            # What an operator does in the MLflow UI (Models -> ride-duration -> alias production).
            from training import registry

            registry.promote(second["version"])
            console.print(f"promoted v{second['version']} by hand, as an operator does in the MLflow UI (alias production)")
        production = _resolve_production(stack)
        with console.status(f"redeploying the function with RUN_ID {production.run_id}"):
            stack.redeploy_function(production.run_id, production.version)
        outcomes = stream(stack.backend_urls, real_rides(40, seed=1))
        _show(outcomes, summarize(outcomes), f"after redeploy: rides answered by v{production.version}", rows=5)

        console.rule("the stack is up")
        console.print(f"MLflow UI:   {stack.urls['mlflow']}")
        if "prefect" in stack.urls:
            console.print(f"Prefect UI:  {stack.urls['prefect']}")
        for url in stack.backend_urls:
            console.print(f"backend:     {url}  (POST /predict, GET /rides/<id>, /readyz)")
        console.print(f"logs:        {stack.log_dir}")
        console.print("next: promote another version in the MLflow UI, then `make redeploy`; `make down` stops everything.")
        return 0
    except BaseException:
        console.print("[red]demo failed or interrupted: stopping what it started[/red]")
        for line in stack.stop_all():
            console.print(f"stopped {line}")
        raise


def redeploy(args: argparse.Namespace) -> int:
    stack = Stack.load(args.stack_dir)
    production = _resolve_production(stack)
    answering = "function" in stack.urls and answers_http(stack.urls["function"])()
    if stack.model.get("run_id") == production.run_id and answering:
        console.print(f"the function already serves v{production.version} (RUN_ID {production.run_id})")
        return 0
    if not answering:
        console.print("[yellow]the function is not answering: starting it again[/yellow]")
    stack.redeploy_function(production.run_id, production.version)
    console.print(f"function restarted with v{production.version} (RUN_ID {production.run_id})")
    return 0


def rollback(args: argparse.Namespace) -> int:
    from training import registry
    from training.settings import Settings

    stack = Stack.load(args.stack_dir)
    stack.apply_env()
    try:
        version = registry.rollback(Settings.from_env())
    except LookupError as exc:
        console.print(f"[red]error:[/red] {exc.args[0]}")
        return 2
    console.print(f"production is v{version} again")
    return redeploy(args)


def restart(args: argparse.Namespace) -> int:
    stack = Stack.load(args.stack_dir)
    stack.restart(args.service)
    console.print(f"{args.service} restarted (pid {stack.pids[args.service]}, {stack.urls[args.service]})")
    return 0


def down(args: argparse.Namespace) -> int:
    try:
        stack = Stack.load(args.stack_dir)
    except ServiceError as exc:
        console.print(str(exc))
        return 0
    for line in stack.stop_all():
        console.print(f"stopped {line}")
    return 0


def status(args: argparse.Namespace) -> int:
    stack = Stack.load(args.stack_dir)
    alive = {key: "running" if pid_alive(pid) else "DEAD" for key, pid in stack.pids.items()}
    console.print_json(json.dumps({"services": alive, "urls": stack.urls, "pids": stack.pids, "model": stack.model}))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devstack", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stack-dir", type=Path, default=DEFAULT_STACK_DIR)
    sub = parser.add_subparsers(dest="command", required=True)
    demo_cmd = sub.add_parser("demo")
    demo_cmd.add_argument("--rides", type=int, default=300)
    demo_cmd.add_argument("--mlflow-backend-store", help="e.g. postgresql://postgres@127.0.0.1:5432/mlflow (default: sqlite)")
    demo_cmd.add_argument("--no-prefect-server", action="store_true", help="run flows on an ephemeral Prefect server")
    sub.add_parser("redeploy")
    sub.add_parser("rollback")
    restart_cmd = sub.add_parser(
        "restart", help="restart one service: pubsub, storage, redis, mlflow, prefect, function, backend-N"
    )
    restart_cmd.add_argument("service")
    sub.add_parser("down")
    sub.add_parser("status")
    args = parser.parse_args(argv)
    try:
        return {"demo": demo, "redeploy": redeploy, "rollback": rollback, "restart": restart, "down": down, "status": status}[
            args.command
        ](args)
    except ServiceError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
