"""The reference pages under docs/reference/ are what the code makes, every environment variable the deployables
read is on one (their code, the control plane's, their images' Dockerfiles), and `make help` lists every target and
the targets page every variable a user passes to make (devstack/reference.py)."""

from __future__ import annotations

import re
import subprocess

import pytest
from conftest import REPO

from devstack.reference import (
    COMMAND_LINE_VARIABLES,
    DEPLOYABLES,
    IMAGE_VARIABLES,
    MAKE_TARGETS_PAGE,
    MAKEFILE,
    PAGES,
    PLATFORM_VARIABLES,
    WRITE_COMMAND,
    GenerationError,
    Read,
    command_line_variables,
    deployable_reads,
    documented_variables,
    env_reads,
    image_variables,
    make_targets,
    make_variables,
    own_variables,
    phony_targets,
    readers,
    reads_where_used,
    undocumented,
)


@pytest.mark.parametrize("page", list(PAGES), ids=lambda page: page.name)
def test_each_reference_page_is_what_the_code_makes(page):
    assert page.exists(), f"{page.relative_to(REPO)} is missing: run `{WRITE_COMMAND}`"
    assert page.read_text() == PAGES[page](), f"{page.relative_to(REPO)} is not what the code makes: run `{WRITE_COMMAND}`"


def test_every_variable_the_deployables_read_is_on_the_configuration_page():
    """Read anywhere in a deployable's code (or ride_contract/, prefect.yaml, MLproject, operations/, an image's
    Dockerfile), a variable is in the deployable's tables (or those of a reader its code imports), or set by a
    platform (PLATFORM_VARIABLES)."""
    missing = undocumented(deployable_reads(), documented_variables(own_variables()))
    assert missing == [], "read but on no table: add it to a from_env reader, or to PLATFORM_VARIABLES with a reason"


def test_the_control_plane_and_every_image_are_scanned():
    """operations/ and each Dockerfile are a deployable's: a new read there must be on the page (the test above)."""
    scanned = {read.path for read in deployable_reads()}
    assert {"operations/deploy.py", "backend/Dockerfile", "rollout/Dockerfile", "tracking_server/Dockerfile"} <= scanned
    dockerfiles = sorted(str(path.relative_to(REPO)) for path in REPO.glob("*/Dockerfile"))
    assert dockerfiles == sorted(d.image for d in DEPLOYABLES if d.image), "a Dockerfile no deployable names as its image"


@pytest.mark.parametrize("dockerfile", list(IMAGE_VARIABLES))
def test_an_image_reads_exactly_the_variables_its_table_explains(dockerfile):
    """IMAGE_VARIABLES explains the Dockerfiles left as they are (the tracking server's): its keys are exactly the
    $VARIABLEs the Dockerfile names, no more, no fewer."""
    read = {read.name for read in env_reads(dockerfile, (REPO / dockerfile).read_text())}
    assert read == set(IMAGE_VARIABLES[dockerfile]), f"{dockerfile} reads {sorted(read)}: make IMAGE_VARIABLES say so"


def test_an_images_table_and_defaults():
    dockerfile = 'ENV PORT=8080 \\\n    X=1\nCMD ["sh", "-c", "exec s --port ${PORT} --db \\"$DB\\""]\n'
    rows = image_variables("x/Dockerfile", dockerfile, {"PORT": "its port", "DB": "its database"})
    assert [(v.name, v.default, v.meaning) for v in rows] == [("PORT", "`8080`", "Its port"), ("DB", "required", "Its database")]
    with pytest.raises(GenerationError, match=r"reads \['DB'\], which IMAGE_VARIABLES does not explain:"):
        image_variables("x/Dockerfile", dockerfile, {"PORT": "its port"})
    with pytest.raises(GenerationError, match=r"does not read \['GONE'\], which IMAGE_VARIABLES lists:"):
        image_variables("x/Dockerfile", dockerfile, {"PORT": "p", "DB": "d", "GONE": "g"})
    # A new variable in a deployable's own Dockerfile is a read no table lists.
    reads = env_reads("backend/Dockerfile", 'CMD ["sh", "-c", "exec x --redis ${REDIS_URL} $SURPRISE"]\n')
    assert undocumented(reads, DOCUMENTED) == [Read("SURPRISE", "backend/Dockerfile")]


CONTROL_PLANE = """
import os

LIMIT = 20


def _env(name, default=None):
    value = os.environ.get(name, default)
    if not value:
        raise SystemExit(f"error: set {name}")
    return value


def commands():
    return [
        _env("NAME", "fn"),  # the function's name
        # At most this many.
        _env("LIMIT", str(LIMIT)),
        _env("PROJECT"),  # the project
        os.environ.get("OPTIONAL"),  # an account; empty: the default
        _env("PROJECT"),
    ]
"""


def test_a_control_plane_read_is_a_row_with_the_comment_at_it_and_one_without_fails():
    namespaces = {"ops/deploy.py": {"LIMIT": 20}}
    rows = reads_where_used("ops", {"ops/deploy.py": CONTROL_PLANE}, namespaces)
    assert [(v.name, v.default, v.meaning, v.read_in) for v in rows] == [
        ("NAME", "`fn`", "The function's name", "`ops/deploy.py` (`commands`)"),
        ("LIMIT", "`20`", "At most this many.", "`ops/deploy.py` (`commands`)"),
        ("PROJECT", "required", "The project", "`ops/deploy.py` (`commands`)"),  # one comment covers its other read
        ("OPTIONAL", "empty", "An account; empty: the default", "`ops/deploy.py` (`commands`)"),
    ]
    with pytest.raises(GenerationError, match="SURPRISE is read with no comment"):
        reads_where_used("ops", {"ops/deploy.py": CONTROL_PLANE + "\nX = os.getenv('SURPRISE')\n"}, namespaces)
    with pytest.raises(GenerationError, match="NAME is read with different defaults"):
        reads_where_used("ops", {"ops/deploy.py": CONTROL_PLANE + "\nX = _env('NAME')  # again\n"}, namespaces)


def test_every_platform_variable_is_still_read():
    read = {read.name for read in deployable_reads()}
    assert set(PLATFORM_VARIABLES) <= read, f"no longer read, take off PLATFORM_VARIABLES: {set(PLATFORM_VARIABLES) - read}"


DOCUMENTED = {"backend": {"REDIS_URL"}, "training": {"MLFLOW_TRACKING_URI"}}


@pytest.mark.parametrize(
    "source",
    [
        "import os\nX = os.environ.get('SURPRISE', '1')\n",
        "import os\nX = os.getenv('SURPRISE')\n",
        "import os\nX = os.environ['SURPRISE']\n",
        "import os\nX = 'SURPRISE' in os.environ\n",
        "import os\nenv = os.environ.get\nX = env('SURPRISE')\n",
        "from os import environ\nX = environ.get('SURPRISE')\n",
        "import os\ndef need(name):\n    return os.environ[name]\nX = need('SURPRISE')\n",
    ],
    ids=["get", "getenv", "subscript", "in", "alias", "from-os", "helper"],
)
def test_a_read_in_any_form_that_no_table_lists_is_caught(source):
    reads = env_reads("backend/app.py", source)
    assert undocumented(reads, DOCUMENTED) == [Read("SURPRISE", "backend/app.py", reads[0].function)]
    assert undocumented(env_reads("backend/app.py", source.replace("SURPRISE", "REDIS_URL")), DOCUMENTED) == []


def test_what_is_no_read_or_cannot_be_followed():
    writes = "import os\nos.environ['MLFLOW_TRACKING_TOKEN'] = 't'\nos.environ.setdefault('MLFLOW_X', '1')\n"
    assert env_reads("flows/job.py", writes) == []
    computed = "import os\ndef f(prefix):\n    return os.environ.get(prefix + 'URL')\n"
    assert undocumented(env_reads("flows/job.py", computed), DOCUMENTED) == [Read(None, "flows/job.py", "f")]
    # A variable one deployable documents is no documentation for another's read of it.
    assert undocumented(env_reads("backend/app.py", "import os\nos.getenv('MLFLOW_TRACKING_URI')\n"), DOCUMENTED) != []


def test_templates_reads_are_found():
    assert [r.name for r in env_reads("prefect.yaml", "# RIDESTREAM_HOME: here\ndirectory: '{{ $RIDESTREAM_HOME }}'\n")] == [
        "RIDESTREAM_HOME"
    ]
    assert [r.name for r in env_reads("MLproject", "# $NOT_A_READ\ncommand: python x.py --home ${HOME_DIR}\n")] == ["HOME_DIR"]


SETTINGS = """
import os
from dataclasses import dataclass

DEFAULT_LIMIT = 4 * 10


@dataclass(frozen=True)
class Settings:
    project: str  # the project
    region: str = "eu"
    # A limit; 0: none.
    limit: int = DEFAULT_LIMIT
    burst: int = 2

    @classmethod
    def from_env(cls):
        env = os.environ.get
        return cls(
            project=env("PROJECT_ID") or env("GOOGLE_CLOUD_PROJECT") or "local",
            region=env("REGION", ""),
            limit=int(env("LIMIT", str(cls.limit))),
            burst=int(env("BURST", "2")),
        )
"""


def _settings(source: str):
    namespace: dict = {"__name__": "crafted_settings"}
    exec(compile(source, "crafted_settings.py", "exec", dont_inherit=True), namespace)  # its own annotations, evaluated
    return readers("crafted/settings.py", source, namespace)


def test_a_default_is_shown_as_a_person_reads_it_and_a_field_without_a_comment_fails():
    (reader,) = _settings(SETTINGS.replace('region: str = "eu"', 'region: str = "eu"  # where it runs'))
    assert {v.name: (v.default, v.meaning) for v in reader.variables} == {
        "PROJECT_ID": ("derived: `GOOGLE_CLOUD_PROJECT`, else `local`", "The project"),
        "GOOGLE_CLOUD_PROJECT": ("`local`", "Read when `PROJECT_ID` is empty. The project"),
        "REGION": ("`eu`", "Where it runs"),  # empty gives the dataclass's default
        "LIMIT": ("`40`", "A limit; 0: none."),
        "BURST": ("`2`", "See `LIMIT`."),  # the comment above a field covers the uncommented one right below
    }
    with pytest.raises(GenerationError, match=r"Settings.region \(read from REGION\) has no comment"):
        _settings(SETTINGS)


def test_make_help_lists_every_phony_target_with_the_description_the_page_shows():
    """`make -s help` (the default goal: a bare `make` prints it) runs no setup, and lists every .PHONY target."""
    makefile = MAKEFILE.read_text()
    shown = subprocess.run(["make", "-s", "help"], cwd=REPO, capture_output=True, text=True, check=True, timeout=60)
    listed = [tuple(re.match(r"^  (\S+)\s+(.*)$", line).groups()) for line in shown.stdout.splitlines()]
    assert listed == make_targets(makefile)
    assert sorted(name for name, _ in listed) == sorted(phony_targets(makefile)), "a public target needs a ## description"
    assert re.search(r"^\.DEFAULT_GOAL := help$", makefile, re.MULTILINE)


def test_every_variable_a_user_passes_to_make_is_on_the_targets_page():
    """A `NAME ?= default` line (with its comment) or, for a variable the Makefile uses and never assigns (only a
    user's command line or environment can set it), an entry of COMMAND_LINE_VARIABLES."""
    makefile = MAKEFILE.read_text()
    assert command_line_variables(makefile) == set(COMMAND_LINE_VARIABLES), "used with no ?= line: COMMAND_LINE_VARIABLES"
    defaulted = set(re.findall(r"^(\w+) \?=", makefile, re.MULTILINE))
    assert {"PYTHON", "TEST_WORKERS", "REGION", "ENV"} <= defaulted
    page = MAKE_TARGETS_PAGE.read_text()
    assert [name for name in defaulted | set(COMMAND_LINE_VARIABLES) if f"| `{name}` |" not in page] == []


def test_make_variables_are_read_from_defaults_and_their_comments():
    makefile = "# How many.\nN ?= 3\nX := $(N) $(WHO) $$(not_make) $(MAKEFILE_LIST)\nY ?= 1\nrun:\n\techo $(X) $(Y) $(LATER)\n"
    assert command_line_variables(makefile) == {"WHO", "LATER"}
    with pytest.raises(GenerationError, match=r"Y \?= 1 has no comment above it"):
        make_variables(makefile)
    with pytest.raises(GenerationError, match=r"uses \['LATER', 'WHO'\] with no `\?=` line"):
        make_variables(makefile.replace("Y ?= 1", "# Why.\nY ?= 1"))


def test_make_targets_are_read_from_rule_lines_only():
    makefile = "X := 1  ## not a target\n.PHONY: a \\\n\tb\na: x  ## does a\nb:\n\techo ## not this\n$(V)/.stamp: a  ## no\n"
    assert make_targets(makefile) == [("a", "does a")]
    assert phony_targets(makefile) == ["a", "b"]


def test_every_benchmark_is_run_by_a_make_target():
    """`make bench` runs them all but the two with targets of their own (bench-capacity, bench-candidates)."""
    makefile = MAKEFILE.read_text()
    benchmarks = sorted(path.name for path in (REPO / "benchmarks").glob("*.py"))
    assert [name for name in benchmarks if f"benchmarks/{name}" not in makefile] == []
