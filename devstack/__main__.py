"""The local stack's commands.

python -m devstack demo       # start everything, train, serve, stream real rides, promote; leaves the stack up
python -m devstack redeploy   # deploy what the `production` alias says now, if the function serves anything else
python -m devstack rollback   # production <- previous in the stack's registry; the rollout service follows
python -m devstack status     # what runs where, what is dead, registry vs deployed vs answering, riders served on time (exit 1 if not)
python -m devstack restart SERVICE   # stop (the whole process group) and start again: same port, same data
python -m devstack watch      # a live view: rides/s, latency, pending rides, dead letters, models (Ctrl-C stops)
python -m devstack env        # export lines of the stack's client environment: eval "$(python -m devstack env)"
python -m devstack down       # stop every process the stack started, by PID
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from functools import partial
from pathlib import Path

import requests
from rich.console import Console
from rich.table import Table

from devstack.processes import ServiceError, pid_alive
from devstack.stack import DEFAULT_STACK_DIR, OUTCOME_TIME_COMPRESSION, OUTCOMES_URI, Stack

# The UIs' usual addresses when free (bookmarks keep working); other free ports when not.
MLFLOW_PORT, PREFECT_PORT = 5000, 4200
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


def _show(outcomes, summary: dict, title: str, rows: int = 12) -> None:
    table = Table(title=title)
    for column in ("ride_id", "pickup", "PU->DO", "miles", "coarse", "final", "range", "actual", "model"):
        table.add_column(column, justify="right")
    for o in outcomes[:rows]:
        table.add_row(
            (o.ride_id or "-")[:12],
            o.ride["datetime"][5:16],
            f"{o.ride['PULocationID']}->{o.ride['DOLocationID']}",
            f"{o.ride['trip_distance']:.1f}",
            f"{o.duration_coarse:.1f}" if o.duration_coarse is not None else "-",
            f"{o.duration_final:.1f}" if o.duration_final is not None else o.error or "-",
            f"{o.duration_low:.1f}-{o.duration_high:.1f}" if o.duration_low is not None else "-",
            f"{o.actual:.1f}",
            f"v{o.model_version}" if o.model_version else "-",
        )
    console.print(table)
    console.print_json(json.dumps(summary))


# The sink files completed rides every 5 s (Stack.start_outcome_sink): a window's rides are all filed 6 s after it ends.
DEMO_WINDOW_SETTLE_MINUTES = 0.1


def _live_quality(stack: Stack, pairs: list[tuple[str, str]], reporter) -> None:
    """The backends' live figures (shared by the replicas), then the flows on what the outcomes topic filed:
    live quality per version, and each (champion, challenger) pair on the rides both answered."""
    from devstack.watch import quality_table
    from flows.challenger_flow import challenger_flow
    from flows.live_quality_flow import live_quality_flow

    with console.status("the last rides of the demo end (their outcomes come back as they do)"):
        reporter.close()
    readiness = requests.get(f"{stack.backend_urls[0]}/readyz", timeout=10).json()
    console.print(quality_table(readiness.get("live_quality")))
    completed = (readiness["live_quality"]["models"].get("coarse") or {}).get("rides", 0)  # every completed ride has one
    deadline, filed = time.monotonic() + 30, 0
    while time.monotonic() < deadline:  # the sink files an object every few seconds, as Pub/Sub every few minutes
        filed = requests.get(f"{stack.urls['outcome-sink']}/healthz", timeout=10).json()["rides"]
        if filed >= completed:
            break
        time.sleep(1)
    summary = live_quality_flow(OUTCOMES_URI, hours=1)
    console.print(
        f"{filed} completed rides filed under {OUTCOMES_URI}; the live-quality flow read {summary['completed_rides']} and "
        f"logged {summary['points_logged']} points of the windows closed so far into the versions' runs (live_rmse beside "
        f"test_rmse; {summary['windows_still_open']} window(s) still open, logged by a later run); "
        f"production v{summary['production']}: {summary['degraded'] or 'within its bounds'}"
    )
    verdicts = {}
    for champion, challenger in pairs:  # the rides both versions answered, in shadow or during a bake
        verdicts[f"v{challenger} vs v{champion}"] = challenger_flow(champion, challenger, OUTCOMES_URI, hours=1)["verdict"]
        console.print(f"champion v{champion} vs challenger v{challenger}: {verdicts[f'v{challenger} vs v{champion}']}")
    (stack.dir / "live-figures.json").write_text(
        json.dumps({"live_quality": readiness["live_quality"], "flow": summary, "comparisons": verdicts}, indent=1)
    )


def _run_metrics(stack: Stack, run_id: str) -> dict[str, float]:
    from mlflow import MlflowClient

    return MlflowClient(stack.urls["mlflow"]).get_run(run_id).data.metrics


def demo(args: argparse.Namespace) -> int:
    # Here, not at the top: pandas and MLflow take seconds to import, and `status` must answer in a few.
    from devstack.rollouts import production_version, promote_under_traffic, version_tags
    from devstack.traffic import OutcomeReporter, real_rides, stream, summarize

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
            stack.start_mlflow(args.mlflow_backend_store, preferred_port=MLFLOW_PORT)
            stack.ensure_topology()
        if not args.no_prefect_server:
            with console.status("starting the Prefect server (about 30 s)"):
                stack.start_prefect(preferred_port=PREFECT_PORT)
        stack.apply_env()  # this process is a client of the stack too (the registry, the comparison flow)
        # Rides end OUTCOME_TIME_COMPRESSION times sooner here than in the city: so do the live-quality windows
        # (an hour of rides in 30 s), each logged once it has closed and its rides are filed.
        os.environ["LIVE_WINDOW_MINUTES"] = f"{60 / OUTCOME_TIME_COMPRESSION:g}"
        os.environ["LIVE_WINDOW_SETTLE_MINUTES"] = f"{DEMO_WINDOW_SETTLE_MINUTES:g}"
        # Each ride's real duration goes back when the ride ends (time-compressed), while the demo goes on.
        reporter = OutcomeReporter(OUTCOME_TIME_COMPRESSION)
        redis_url = _start_redis(stack)
        replicas = 2 if redis_url else 1
        with console.status(f"starting {replicas} backend replica(s) and the rollout service"):
            stack.start_backends(replicas, redis_url)
            stack.start_rollout("production=function,challenger=challenger")
            stack.start_outcome_sink()
        console.print(f"backend: {replicas} replica(s), results in {'Redis ' + redis_url if redis_url else 'memory'}")
        console.print(f"rollout service {stack.urls['rollout']}: MLflow calls it (signed webhook) whenever an alias moves")

        console.rule("1. Prefect training flow on Jan/Feb/Mar 2021; the rollout service deploys what it promotes")
        first = stack.run_training_flow("--trials", "1")
        console.print(f"v{first['version']} -> {first['alias']}: {first['reason']}")
        with console.status(f"waiting for the rollout of v{first['version']}"):
            entry = stack.wait_rolled_out("production", first["version"])
        console.print(f"function serves v{first['version']}: {entry['history'][-1]['message']}")

        console.rule(f"2. {args.rides} real March 2021 rides through POST /predict")
        rides = real_rides(args.rides)
        started = time.perf_counter()
        outcomes = stream(stack.backend_urls, rides, report_outcomes=reporter)
        _show(outcomes, summarize(outcomes, time.perf_counter() - started), "coarse now, final through the stream (minutes)")
        console.print(
            f"each ride's real duration goes back (with its outcome token) when the ride ends: its POST plus its TLC "
            f"duration, {OUTCOME_TIME_COMPRESSION}x sooner here (a 12-minute ride's {12 * 60 / OUTCOME_TIME_COMPRESSION:g} s after)"
        )

        console.rule("3. v2, trained on more months, promoted as the UI does: pre-flight, shadow, switch, bake")
        second = stack.run_training("--train-month", "2021-01", "2022-01", "2022-02", "--trials", "1")
        v1_metrics = _run_metrics(stack, first["run_id"])
        console.print(
            f"v{second['version']} is trained on Jan 2021 + Jan and Feb 2022, v{first['version']} on Jan 2021 only: "
            f"validation (Feb 2021) RMSE {second['metrics']['val_rmse']:.3f} against {v1_metrics['val_rmse']:.3f}, "
            f"test (Mar 2021) RMSE {second['metrics']['test_rmse']:.3f} against {v1_metrics['test_rmse']:.3f}"
        )
        outcomes, better = promote_under_traffic(stack, second["version"], report_outcomes=reporter)
        _show(outcomes[-20:], better, f"alias production -> v{second['version']} (REST, as the UI), riders kept coming", rows=5)

        console.rule("4. A broken version (trained on shuffled durations) promoted the same way: the guard blocks it")
        broken = stack.run_training("--shuffle-targets", "--trials", "1")
        console.print(
            f"v{broken['version']}: the durations of its training rides were shuffled among them; it loads and "
            f"passes pre-flight (test RMSE {broken['metrics']['test_rmse']:.3f})"
        )
        outcomes, blocked = promote_under_traffic(stack, broken["version"], report_outcomes=reporter)
        blocked["alias_back_on"] = production_version(stack)
        tags = version_tags(stack, broken["version"])
        blocked["version_page_tags"] = {
            k: tags[k][:300] for k in ("rollout_status", "rollout_phase", "rollout_reason") if k in tags
        }
        _show(outcomes[-20:], blocked, f"alias production -> v{broken['version']}: blocked", rows=5)

        console.rule(
            f"5. Rollback to v{first['version']} (known good: pre-flight, no shadow), then forward to v{second['version']}"
        )
        _, back = promote_under_traffic(stack, first["version"])
        _, forward = promote_under_traffic(stack, second["version"])
        figures = {
            "better_version": better,
            "broken_version": blocked,
            "rollback": {k: back[k] for k in ("outcome", "seconds_from_alias_set_to_riders_on_it", "lost", "message")},
            "forward_again": {k: forward[k] for k in ("outcome", "seconds_from_alias_set_to_riders_on_it", "lost", "message")},
        }
        (stack.dir / "rollout-figures.json").write_text(json.dumps(figures, indent=1))
        console.print_json(json.dumps(figures))

        console.rule("6. Live quality: every model judged on the rides whose real duration came back")
        _live_quality(stack, [(first["version"], second["version"]), (second["version"], broken["version"])], reporter)

        console.rule("the stack is up")
        console.print(
            f"MLflow UI:   {stack.urls['mlflow']}"
            + ("" if stack.ports["mlflow"] == MLFLOW_PORT else f" ({MLFLOW_PORT} was taken)")
        )
        if "prefect" in stack.urls:
            taken = "" if stack.ports["prefect"] == PREFECT_PORT else f" ({PREFECT_PORT} was taken)"
            console.print(f"Prefect UI:  {stack.urls['prefect']}{taken}")
        for url in stack.backend_urls:
            requests.get(f"{url}/", timeout=10).raise_for_status()  # served, not just started: it answers with the page
            console.print(f"backend:     {url}  (POST /predict, GET /rides/<id>, /readyz)")
        console.print(f"rollout:     {stack.urls['rollout']}/status")
        console.print(f"[bold]rider page:[/bold]  {stack.backend_urls[0]}/  (open it in a browser; every replica serves it)")
        from training.settings import Settings

        versions = f"{stack.urls['mlflow']}/#/models/{Settings.from_env().model_name}/versions"
        console.print(f"[bold]how v{second['version']} got to riders:[/bold] {versions}/{second['version']}")
        console.print(f"[bold]why v{broken['version']} did not:[/bold]   {versions}/{broken['version']}")
        console.print(f"logs:        {stack.log_dir}")
        console.print(
            "next: move the production alias in the MLflow UI and the function follows; `make status` compares; "
            "`make rollback`; `make down` stops everything."
        )
        console.print(
            '[bold]point a shell at this stack:[/bold] eval "$(make env)"; then make train, make promote VERSION=N, '
            "make flow, make monitor and mlflow run . --env-manager local use its MLflow server, not the repository's "
            "mlflow.db (after make down: a new shell)"
        )
        return 0
    except BaseException:
        console.print("[red]demo failed or interrupted: stopping what it started[/red]")
        for line in stack.stop_all():
            console.print(f"stopped {line}")
        raise


def _sync_report(stack: Stack, answers: dict, served: dict | None) -> dict:
    """Registry vs deployed per alias (computed here: it holds whether the rollout service runs or not),
    and ``served``, the model behind a backend's latest result (its /readyz ``model_served``).
    ``answers``: what the registry and the rollout service answered (health.side_by_side)."""
    from devstack.health import NoAnswer
    from devstack.rollout_target import DEPLOYMENT_OF_ALIAS, LocalFunctionTarget
    from rollout.__main__ import judge
    from rollout.reconcile import Deployment, Rollout

    def resolve(alias: str) -> Deployment | None:
        found = answers.get(f"registry:{alias}", NoAnswer("no MLflow server in this stack"))
        if isinstance(found, NoAnswer):
            raise ServiceError(f"the registry did not say: {found}")
        return Deployment(str(found["version"]), found["run_id"], found.get("source", "")) if found else None

    aliases = {
        alias: Rollout(alias, resolve, LocalFunctionTarget(stack.dir, key)).status() for alias, key in DEPLOYMENT_OF_ALIAS.items()
    }
    if (aliases["challenger"]["registry"] or aliases["challenger"]["serving"]) is None:
        aliases.pop("challenger")  # no challenger anywhere: nothing to compare
    service = answers.get("rollout:status")
    if isinstance(service, dict):  # its phase under way, its failures, its history of rollouts
        for alias, entry in aliases.items():
            for key in ("phase", "guarded", "state", "last_error", "history"):
                entry[key] = service["aliases"].get(alias, {}).get(key)
            if entry["phase"]:  # a rollout under way is not a mismatch yet
                entry["in_sync"] = False
    report = judge({"aliases": aliases}, served)
    if service is None:
        report["warning"] = "the rollout service is not running: alias moves are not followed until `make redeploy`"
    elif isinstance(service, NoAnswer):
        report["warning"] = f"the rollout service did not answer its /status ({service}): alias moves may not be followed"
    return report


def redeploy(args: argparse.Namespace) -> int:
    """Reconcile now, through the rollout path: deploy what the registry's production alias says, if it differs."""
    from devstack.rollout_target import local_rollouts

    stack = Stack.load(args.stack_dir)
    console.print(local_rollouts(stack, ("production",))["production"].reconcile())
    return 0


def rollback(args: argparse.Namespace) -> int:
    """production <- previous in the registry; the rollout service rolls the function back (the same path)."""
    from training import registry
    from training.settings import Settings

    stack = Stack.load(args.stack_dir)
    stack.apply_env()
    try:
        version = registry.rollback(Settings.from_env())
    except LookupError as exc:
        console.print(f"[red]error:[/red] {exc.args[0]}")
        return 2
    console.print(f"production is v{version} again in the registry; the rollout service follows")
    if "rollout" not in stack.urls:
        return redeploy(args)
    entry = stack.wait_rolled_out("production", version)
    console.print(f"function serves v{version}: {entry['history'][-1]['message']}")
    return 0


def restart(args: argparse.Namespace) -> int:
    stack = Stack.load(args.stack_dir)
    stack.restart(args.service)
    console.print(f"{args.service} restarted (pid {stack.pids[args.service]}, {stack.urls[args.service]})")
    return 0


def shell_exports(env: dict[str, str]) -> str:
    """``export NAME=value`` lines a shell can eval, each value quoted as the shell needs."""
    return "".join(f"export {name}={shlex.quote(value)}\n" for name, value in env.items())


def env(args: argparse.Namespace) -> int:
    """The running stack's client environment (Stack.env: its MLflow server, emulators and Prefect server) as
    export lines, so that `eval "$(make env)"` points later commands at the stack. Only the exports go to
    stdout; without a running stack, a message on stderr and exit 1 (an eval of nothing changes nothing)."""
    try:
        stack = Stack.load(args.stack_dir)
    except ServiceError as exc:
        print(f"{exc}: no environment to print", file=sys.stderr)
        return 1
    if not any(pid_alive(pid) for pid in stack.pids.values()):
        print(f"the stack in {stack.dir} is recorded, but none of its processes runs: `make down`, `make demo`", file=sys.stderr)
        return 1
    sys.stdout.write(shell_exports(stack.env()))
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


def _status_checks(stack: Stack) -> dict:
    """Every question `status` asks, to be asked side by side: each service's process and address, each
    backend's /readyz (how riders are served, the model behind its latest result), the registry's aliases,
    the rollout service's /status."""
    from devstack.health import json_of, registry_alias, service_state
    from devstack.processes import pid_alive
    from devstack.rollout_target import DEPLOYMENT_OF_ALIAS
    from training.settings import Settings

    checks = {
        f"service:{key}": partial(service_state, pid, stack.specs.get(key, {}).get("ready")) for key, pid in stack.pids.items()
    }
    for url in stack.backend_urls:  # /readyz says 503 with its reasons when degraded: its body counts either way
        checks[f"readyz:{url}"] = partial(json_of, f"{url}/readyz", any_status=True)
    if "mlflow" in stack.urls:
        model_name = Settings.from_env().model_name
        for alias in DEPLOYMENT_OF_ALIAS:
            checks[f"registry:{alias}"] = partial(registry_alias, stack.urls["mlflow"], model_name, alias)
    if "rollout" in stack.urls and pid_alive(stack.pids.get("rollout", -1)):
        checks["rollout:status"] = partial(json_of, f"{stack.urls['rollout']}/status", headers=stack.rollout_operator_headers())
    return checks


def _readiness(stack: Stack, answers: dict) -> dict[str, dict]:
    """Each backend replica's /readyz as answered, or why it did not answer."""
    from devstack.health import NoAnswer

    return {
        url: {"status": "down", "degraded": [f"no /readyz answer: {body}"]} if isinstance(body, NoAnswer) else body
        for url, body in ((url, answers[f"readyz:{url}"]) for url in stack.backend_urls)
    }


def status(args: argparse.Namespace) -> int:
    from devstack.health import side_by_side

    stack = Stack.load(args.stack_dir)
    answers = side_by_side(_status_checks(stack))
    readiness = _readiness(stack, answers)
    report = {
        "services": {key: str(answers[f"service:{key}"]) for key in stack.pids},  # a NoAnswer as its reason
        "urls": stack.urls,
        "pids": stack.pids,
        "models": {key: model for key, model in stack.models.items() if model},  # a retired deployment serves none
        "sync": _sync_report(stack, answers, next(iter(readiness.values()), {}).get("model_served")),
        "riders": {
            url: {"status": body.get("status", "down"), "degraded": body.get("degraded", [])} for url, body in readiness.items()
        },
        # Shared by the replicas: any one's figures are all of them.
        "live_quality": next((body["live_quality"] for body in readiness.values() if body.get("live_quality")), None),
    }
    console.print_json(json.dumps(report))
    from devstack.watch import describe_phase, quality_table

    if report["live_quality"] and report["live_quality"]["models"]:
        console.print(quality_table(report["live_quality"]))
    sync = report["sync"]
    if "warning" in sync:
        console.print(f"[yellow]warning:[/yellow] {sync['warning']}")
    phases = [line for alias, entry in sync["aliases"].items() if (line := describe_phase(alias, entry))]
    for line in phases:
        console.print(f"[cyan]{line}[/cyan]")
    if not sync["in_sync"] and not any(line.startswith("ROLLING") for line in phases):
        console.print(f"[red]MISMATCH:[/red] {sync.get('mismatch')}")
    unhealthy = {url: entry for url, entry in report["riders"].items() if entry["status"] != "ok"}
    for url, entry in unhealthy.items():
        console.print(f"[yellow]{entry['status'].upper()}:[/yellow] {url}: {'; '.join(entry['degraded']) or 'not ready'}")
    stuck = {key: state for key, state in report["services"].items() if state != "running"}
    for key, state in stuck.items():
        console.print(f"[red]{key}:[/red] {state}")
    return 0 if sync["in_sync"] and not unhealthy and not stuck else 1


def watch(args: argparse.Namespace) -> int:
    from devstack.watch import watch as live_view

    stack = Stack.load(args.stack_dir)
    live_view(stack, console, args.seconds)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devstack", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stack-dir", type=Path, default=DEFAULT_STACK_DIR)
    sub = parser.add_subparsers(dest="command", required=True)
    demo_cmd = sub.add_parser("demo")
    demo_cmd.add_argument("--rides", type=int, default=300)
    demo_cmd.add_argument(
        "--mlflow-backend-store",
        help="e.g. sqlite:///mlflow.db (default: a PostgreSQL database of the stack's own, as on Cloud SQL)",
    )
    demo_cmd.add_argument("--no-prefect-server", action="store_true", help="run flows on an ephemeral Prefect server")
    sub.add_parser("redeploy")
    sub.add_parser("rollback")
    restart_cmd = sub.add_parser(
        "restart", help="restart one service: pubsub, storage, redis, mlflow, prefect, function, backend-N"
    )
    restart_cmd.add_argument("service")
    sub.add_parser("down")
    sub.add_parser("env", help="export lines of the running stack's client environment, for eval")
    sub.add_parser("status")
    watch_cmd = sub.add_parser("watch", help="a live view of the stream: rides/s, latency, pending, dead letters, models")
    watch_cmd.add_argument("--seconds", type=float, help="stop after this long (default: until Ctrl-C)")
    args = parser.parse_args(argv)
    try:
        commands = {"demo": demo, "redeploy": redeploy, "rollback": rollback, "restart": restart, "down": down, "env": env}
        return {**commands, "status": status, "watch": watch}[args.command](args)
    except ServiceError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
