"""`python -m operations.gcp up --dry-run`: the whole ordered plan, checked against Terraform's own dependencies.

Nothing here reaches Google Cloud. The plan is what `up` would run on an empty project; the checker
below reads both Terraform roots (python-hcl2) and walks the plan in order: a state bucket is created
before an init names it, a root is initialised before it is applied, every {root.output} a command uses
belongs to a root applied before it and names resources of that root, every variable root 2 needs
without a default is given, each image it is given was built before, and the training job it executes is
a Cloud Run job of root 2. A plan with two steps swapped is refused.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import hcl2
import pytest
from conftest import REPO

from operations import gcp
from operations.gcp import Action

SPLIT_ROOTS = (REPO / gcp.BOOTSTRAP).is_dir()
needs_split_roots = pytest.mark.skipif(
    not SPLIT_ROOTS, reason="infra/bootstrap (issue 32's root 1, docs/deploy-gcp-infra.md) is not in this tree yet"
)
REFERENCE = re.compile(r"(?<![\w.])((?:google|random|time|archive|null)_[a-z0-9_]+)\.([A-Za-z0-9_-]+)")
LOCAL = re.compile(r"\blocal\.([A-Za-z0-9_]+)")


def _unquote(name: str) -> str:
    return name.strip('"')


@dataclass
class Root:
    """One Terraform root as python-hcl2 reads it: its resources, variables, locals and outputs."""

    path: Path
    resources: set[str] = field(default_factory=set)
    required: set[str] = field(default_factory=set)  # variables without a default
    variables: set[str] = field(default_factory=set)
    locals: dict[str, object] = field(default_factory=dict)
    outputs: dict[str, object] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> Root:
        root = cls(path)
        for file in sorted(path.glob("*.tf")):
            with file.open() as handle:
                parsed = hcl2.load(handle)
            for block in parsed.get("resource", []):
                for kind, named in block.items():
                    root.resources |= {f"{_unquote(kind)}.{_unquote(name)}" for name in named}
            for block in parsed.get("variable", []):
                for name, body in block.items():
                    root.variables.add(_unquote(name))
                    if "default" not in body:
                        root.required.add(_unquote(name))
            for block in parsed.get("locals", []):
                root.locals.update(block)
            for block in parsed.get("output", []):
                root.outputs.update({_unquote(name): body["value"] for name, body in block.items()})
        return root

    def references(self, expression: object, seen: frozenset[str] = frozenset()) -> set[str]:
        """The resources an expression reaches, through locals too."""
        text = str(expression)
        found = {f"{kind}.{name}" for kind, name in REFERENCE.findall(text)} & self.resources
        for local in set(LOCAL.findall(text)) - seen:
            found |= self.references(self.locals.get(local, ""), seen | {local})
        return found

    def output(self, name: str, key: str | None) -> object:
        value = self.outputs[name]
        if key is not None and isinstance(value, dict):
            return value[key]
        return value


def roots() -> dict[str, Root]:
    return {name: Root.load(REPO / path) for name, path in gcp.ROOTS.items()}


def violations(plan: list[Action], roots: dict[str, Root]) -> list[str]:
    """Every place where the plan needs something no earlier (or this) step made; [] for a plan that holds."""
    by_path = {str(root.path.relative_to(REPO)): name for name, root in roots.items()}
    created: set[tuple[str, str]] = set()
    buckets: set[str] = set()
    inited: set[str] = set()
    applied: set[str] = set()
    images: set[str] = set()
    found: list[str] = []
    for number, action in enumerate(plan, 1):
        where = f"#{number} {action.text()[:120]}"
        text = " ".join(action.argv)
        for root_name, output, key in gcp.PLACEHOLDER.findall(text):
            root = roots[root_name]
            if root_name not in applied:
                found.append(f"{where}: uses {root_name}.{output} before {root_name} is applied")
                continue
            if output not in root.outputs:
                found.append(f"{where}: {root_name} has no output {output}")
                continue
            needed = root.references(root.output(output, key or None))
            if not needed:
                found.append(f"{where}: {root_name}.{output}{'.' + key if key else ''} names no resource of {root_name}")
            found += [
                f"{where}: needs {address}, not created yet" for address in sorted(needed) if (root_name, address) not in created
            ]
        argv = list(action.argv)
        if argv[:4] == ["gcloud", "storage", "buckets", "create"]:
            buckets.add(argv[4].removeprefix("gs://"))
        if argv[:3] == ["gcloud", "builds", "submit"]:
            [substitutions] = [a for a in argv if a.startswith("--substitutions=")]
            values = dict(pair.split("=", 1) for pair in substitutions.removeprefix("--substitutions=").split(","))
            source = values.get("_DOCKERFILE") or values.get("_SOURCE", "")  # a Dockerfile, or a function's folder
            if not (REPO / source).is_file() and not (REPO / source / "main.py").is_file():
                found.append(f"{where}: no {source}")
            images.add(values["_IMAGE"])
        if argv[:3] == ["gcloud", "run", "jobs"] and argv[3] == "execute":
            job = gcp.PLACEHOLDER.fullmatch(argv[4])
            root = roots[job.group(1)] if job else None
            named = root.references(root.output(job.group(2), job.group(3))) if root and job.group(2) in root.outputs else set()
            if not any(address.startswith("google_cloud_run_v2_job.") for address in named):
                found.append(f"{where}: {argv[4]} is not a Cloud Run job of a root")
        if argv[0] == "terraform":
            root_name = by_path[argv[1].removeprefix("-chdir=")]
            command = argv[2]
            if command == "init":
                [bucket] = [a.split("=", 2)[2] for a in argv if a.startswith("-backend-config=bucket=")]
                if bucket not in buckets:
                    found.append(f"{where}: the state bucket {bucket} does not exist yet")
                inited.add(root_name)
            elif root_name not in inited:
                found.append(f"{where}: {root_name} is not initialised")
            if command == "apply":
                found += _apply_violations(where, argv, roots[root_name], images)
                created |= {(root_name, address) for address in roots[root_name].resources}
                applied.add(root_name)
    return found


def _apply_violations(where: str, argv: list[str], root: Root, images: set[str]) -> list[str]:
    given = dict(a.removeprefix("-var=").split("=", 1) for a in argv if a.startswith("-var="))
    found = [f"{where}: -target in up's apply" for a in argv if a.startswith("-target")]
    found += [f"{where}: needs variable {name}" for name in sorted(root.required - set(given))]
    found += [f"{where}: gives undeclared variable {name}" for name in sorted(set(given) - root.variables)]
    found += [
        f"{where}: {name}={value} was not built before"
        for name, value in given.items()
        if name.endswith("_image") and value not in images
    ]
    return found


@pytest.fixture(scope="module")
def up_plan() -> list[Action]:
    return gcp.plan("up", "ridestream-test", "europe-west1", "prod")


@needs_split_roots
def test_the_plan_of_up_holds_against_both_roots(up_plan):
    parsed = roots()
    assert violations(up_plan, parsed) == []
    # The checker had something to check: both roots, the images, the training job and the smoke ride.
    assert {"google_artifact_registry_repository", "google_cloud_run_v2_job"} <= {
        address.split(".")[0] for root in parsed.values() for address in root.resources
    }
    assert parsed["system"].required >= {f"{name}_image" for name in gcp.IMAGES} | {"build_service_account"}


@needs_split_roots
@pytest.mark.parametrize(
    ("first", "second", "reason"),
    [
        ("terraform -chdir=infra/bootstrap apply", "gcloud builds submit", "bootstrap.artifact_registry before bootstrap"),
        ("gcloud storage buckets create", "terraform -chdir=infra/bootstrap init", "state bucket"),
        ("terraform -chdir=infra apply", "gcloud run jobs execute", "system.jobs before system"),
        ("gcloud builds submit", "terraform -chdir=infra apply", "was not built before"),
    ],
)
def test_a_plan_with_two_steps_swapped_is_refused(up_plan, first, second, reason):
    """Moving the later action to just before the earlier one breaks what Terraform's references require."""
    texts = [" ".join(a.argv) for a in up_plan]
    early = next(i for i, t in enumerate(texts) if t.startswith(first))
    late = max(i for i, t in enumerate(texts) if t.startswith(second))
    assert early < late
    swapped = [*up_plan[:early], up_plan[late], *up_plan[early:late], *up_plan[late + 1 :]]
    refused = violations(swapped, roots())
    assert any(reason.split()[-1] in problem for problem in refused), refused


def test_up_applies_each_root_once_without_target_and_builds_every_image(up_plan):
    applies = [a.argv for a in up_plan if a.argv[0] == "terraform" and a.argv[2] == "apply"]
    assert [argv[1] for argv in applies] == ["-chdir=infra/bootstrap", "-chdir=infra"]
    assert not any(arg.startswith("-target") for argv in applies for arg in argv)
    built = [a for a in up_plan if a.argv[:3] == ("gcloud", "builds", "submit")]
    assert [a for argv in (b.argv for b in built) for a in argv if a.startswith("--substitutions=")] == [
        f"--substitutions={'_DOCKERFILE' if source.endswith('Dockerfile') else '_SOURCE'}={source},"
        f"_IMAGE={{bootstrap.artifact_registry}}/{name}:{gcp.image_tag()}"
        for name, source in gcp.IMAGES.items()
    ]
    # Every build runs as the dedicated build account, never the Compute Engine default.
    assert all(
        "--service-account=projects/ridestream-test/serviceAccounts/{bootstrap.build_service_account}" in b.argv for b in built
    )
    steps = list(dict.fromkeys(a.step for a in up_plan))
    assert steps == ["prerequisites", "bootstrap", "images", "system", "first model", "smoke test", "status"]


def test_without_split_roots_the_checker_still_refuses_an_unknown_root_output(up_plan):
    """The checker's own teeth on this tree's system root alone: an output root 2 does not have is named."""
    system = Root.load(REPO / gcp.SYSTEM)
    fake_bootstrap = Root(REPO / gcp.BOOTSTRAP)  # an empty root 1: it creates and outputs nothing
    refused = violations(up_plan, {"bootstrap": fake_bootstrap, "system": system})
    assert any("bootstrap has no output artifact_registry" in problem for problem in refused), refused


def test_the_dry_run_prints_the_plan_and_calls_nothing(tmp_path):
    """gcloud and terraform on PATH are recorders here: a dry run must not call either, nor git's index."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("gcloud", "terraform", "docker"):
        (bin_dir / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> {tmp_path}/called\nexit 1\n')
        (bin_dir / tool).chmod(0o755)
    env = os.environ | {"PATH": f"{bin_dir}:{os.environ['PATH']}"}
    done = subprocess.run(
        [sys.executable, "-m", "operations.gcp", "up", "--project=ridestream-test", "--dry-run"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "called").exists()
    printed = [line.strip()[2:] for line in done.stdout.splitlines() if line.strip()[:2] in ("$ ", "? ")]
    expected = [action.text() for action in gcp.plan("up", "ridestream-test")]
    assert printed == expected and len(expected) > 30


def test_down_lifts_deletion_protection_by_name_then_destroys_root_2_root_1_and_the_bucket_last():
    plan = gcp.plan("down", "ridestream-test")
    changes = [" ".join(a.argv) for a in plan if a.changes and a.argv[0] in ("terraform", "gcloud")]
    lift = next(i for i, t in enumerate(changes) if "-var=deletion_protection=false -target=" in t)
    order = [
        next(i for i, t in enumerate(changes) if t.startswith("terraform -chdir=infra destroy")),
        next(i for i, t in enumerate(changes) if t.startswith("terraform -chdir=infra/bootstrap destroy")),
        next(
            i
            for i, t in enumerate(changes)
            if t == "gcloud storage rm --recursive --all-versions gs://ridestream-test-ridestream-tfstate"
        ),
    ]
    assert [lift, *order] == sorted([lift, *order]) and order[-1] == len(changes) - 1
    assert "-target={system.deletion_protected}" in changes[lift]  # exactly the addresses root 2 names


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["up", "--project=My_Project"], "is not a project id"),
        (["up", "--project=ridestream-test", "--env=Production-1"], "lower-case letters and digits"),
    ],
)
def test_bad_names_are_refused_before_anything_runs(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        gcp.main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err
