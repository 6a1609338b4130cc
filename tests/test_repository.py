"""Repository hygiene: no credentials anywhere in the tree, and every pinned runtime matches the lock."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

# What a leaked credential looks like. Patterns are assembled so this file does not match itself.
BEGIN = "-----BEGIN"
SECRET_PATTERNS = {
    "private key": re.compile(BEGIN + r" (?:RSA |EC |DSA |OPENSSH |ENCRYPTED )?PRIVATE KEY-----"),
    "service account key": re.compile(r'"type"\s*:\s*"service_' + r'account"[\s\S]{0,2000}"private_key'),
    "AWS access key": re.compile(r"\bAKIA[0-9A-Z]{16}\b"),
    "Google API key": re.compile(r"\bAIza[0-9A-Za-z_\-]{35}\b"),
}
FORBIDDEN_NAMES = re.compile(r"(^|/)(\.env(\..*)?|.*\.pem|.*\.p12|.*credentials.*\.json|.*-key\.json)$")


def repository_files() -> list[str]:
    """Tracked files plus untracked ones git does not ignore: what a commit could contain."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
    )
    return [line for line in listed.stdout.splitlines() if (REPO / line).is_file()]


def leaks(name: str, text: str) -> list[str]:
    found = [f"{name}: {label}" for label, pattern in SECRET_PATTERNS.items() if pattern.search(text)]
    if FORBIDDEN_NAMES.search(name):
        found.append(f"{name}: credential-like file name")
    return found


def test_the_scanner_catches_what_it_should():
    key = BEGIN + " RSA PRIVATE KEY-----\nMIIE...\n"
    account = '{"type": "service_' + 'account", "project_id": "p", "private_key_id": "abc", "private_key": "x"}'
    assert leaks("deploy/key.txt", key) == ["deploy/key.txt: private key"]
    assert leaks("sa.json", account) == ["sa.json: service account key"]
    assert leaks("config/.env", "A=1") == ["config/.env: credential-like file name"]
    assert leaks("my-sa-key.json", "{}") == ["my-sa-key.json: credential-like file name"]
    assert leaks("training/train.py", "print('hello')") == []


def test_no_credentials_in_the_tree():
    files = repository_files()
    assert len(files) > 30
    found = []
    for name in files:
        try:
            text = (REPO / name).read_text(errors="ignore")
        except OSError:
            continue
        found += leaks(name, text)
    assert found == []


def _lock() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if "==" in line and not line.startswith((" ", "#")):
            name, version = line.split("==")
            pins[name.split("[")[0].lower()] = version.strip()
    return pins


@pytest.mark.parametrize(
    "path",
    [
        "serving_function/requirements.txt",
        "backend/requirements.txt",
        "tracking_server/requirements.txt",
        "rollout/requirements.txt",
        "python_env.yaml",
        "conda.yaml",
    ],
)
def test_runtime_pins_match_the_lock(path):
    lock = _lock()
    pins = _pins(path)
    assert pins
    for name, version in pins.items():
        assert lock[name.lower()] == version, f"{path}: {name}=={version}, lock has {lock.get(name.lower())}"


def _pins(path: str) -> dict[str, str]:
    return dict(re.findall(r"([A-Za-z0-9_.\-]+)==([0-9][^\s]*)", (REPO / path).read_text()))


def test_conda_yaml_declares_the_training_environment_python_env_yaml_does():
    assert _pins("conda.yaml") == _pins("python_env.yaml")


# What `mlflow run .` runs: training/ and the project's packages it imports (the project folder is its working directory).
TRAINING_PACKAGES = ("training", "data", "ride_contract")


@pytest.mark.parametrize("path", ["python_env.yaml", "conda.yaml"])
def test_the_training_environment_declares_every_library_training_imports(path):
    """A library training imports (at any depth, lazily too) that the environment file does not pull in
    fails `mlflow run .` in the environment MLproject declares, though it passes in the project's venv."""
    from importlib.metadata import packages_distributions

    from packaging.utils import canonicalize_name

    imported = {name.split(".")[0] for package in TRAINING_PACKAGES for name in imported_modules(package)}
    libraries = imported - set(sys.stdlib_module_names) - set(TRAINING_PACKAGES) - {"__future__"}
    assert {"sklearn", "mlflow", "optuna", "rich"} <= libraries  # the walk finds lazy imports too
    declared = _installed_closure(list(_pins(path)))
    providers = packages_distributions()
    missing = sorted(lib for lib in libraries if not {canonicalize_name(d) for d in providers.get(lib, [])} & declared)
    assert missing == [], f"{path} does not pull in what training imports: {missing}"


def _installed_closure(names: list[str]) -> set[str]:
    """The packages ``names`` pull in, as installed here (markers evaluated, extras not taken)."""
    from importlib.metadata import PackageNotFoundError, requires

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen: set[str] = set()
    todo = [canonicalize_name(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requirements = requires(name) or []
        except PackageNotFoundError:
            continue
        for text in requirements:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(requirement.name))
    return seen


def test_the_function_installs_neither_scikit_learn_scipy_nor_pandas():
    pinned = re.findall(r"^([A-Za-z0-9_.\-]+)==", (REPO / "serving_function/requirements.txt").read_text(), re.M)
    closure = _installed_closure(pinned)
    assert {"numpy", "pydantic", "google-cloud-storage", "grpcio"} <= closure  # the walk does find dependencies
    assert not closure & {"scikit-learn", "scipy", "pandas", "pyarrow", "cloudpickle", "mlflow"}


def _imported_modules(folder: str) -> set[str]:
    """Every module the code under ``folder`` imports (at any depth, lazily too) from outside the standard library
    and this repository, as the most precise module name that is a file (``google.cloud`` is no file; its
    ``pubsub_v1`` is)."""
    import ast
    import importlib.util
    import sys

    local = {path.name for path in REPO.iterdir() if path.is_dir()}
    found: set[str] = set()
    for path in (REPO / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                spec = importlib.util.find_spec(node.module)
                names = [node.module] if spec and spec.origin else [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            found |= {name for name in names if name.split(".")[0] not in local | set(sys.stdlib_module_names)}
    return found


def test_the_rollout_image_installs_every_package_its_code_imports():
    """The image installs rollout/requirements.txt only: a package its code imports and the file does not
    install fails in production, in a thread if imported there (issue 31: the analysis readers' Pub/Sub)."""
    import importlib.util
    from importlib.metadata import distribution

    pinned = re.findall(r"^([A-Za-z0-9_.\-]+)==", (REPO / "rollout/requirements.txt").read_text(), re.M)
    installed = set()
    for name in _installed_closure(pinned):
        dist = distribution(name)
        installed |= {Path(dist.locate_file(file)).resolve() for file in dist.files or []}
    modules = _imported_modules("rollout")
    assert "flask" in modules and "google.oauth2.id_token" in modules  # the walk does find imports
    missing = {name for name in modules if Path(importlib.util.find_spec(name).origin).resolve() not in installed}
    assert not missing, f"imported by rollout/, not installed by rollout/requirements.txt: {sorted(missing)}"


def test_one_python_version_for_training_the_function_and_the_backend():
    from operations.deploy import PYTHON_VERSION

    version = PYTHON_VERSION
    assert re.search(rf'^python: "{re.escape(version)}"$', (REPO / "python_env.yaml").read_text(), re.M)
    assert f"- python={version}\n" in (REPO / "conda.yaml").read_text()
    for dockerfile in ("backend/Dockerfile", "tracking_server/Dockerfile", "rollout/Dockerfile", "flows/Dockerfile"):
        assert f"FROM python:{version}-slim\n" in (REPO / dockerfile).read_text(), dockerfile
    # The function's image on Google Cloud: Google's buildpacks on the same Python.
    assert f"--env=GOOGLE_PYTHON_VERSION={version}.x\n" in (REPO / "operations/cloudbuild-function.yaml").read_text()
    assert f'requires-python = ">={version}"' in (REPO / "pyproject.toml").read_text()


def test_no_file_claims_the_conda_env_manager():
    # MLflow refuses `mlflow run --env-manager conda` for a project that declares python_env.
    assert "python_env:" in (REPO / "MLproject").read_text()
    pages = sorted(str(page.relative_to(REPO)) for page in (REPO / "docs").rglob("*.md"))
    assert "docs/training.md" in pages  # where `mlflow run` and conda are described
    for name in ("README.md", "conda.yaml", "MLproject", *pages):
        text = (REPO / name).read_text()
        claims = [line for line in text.splitlines() if "--env-manager conda" in line and "not supported" not in line]
        assert all("refuses" in line for line in claims), (name, claims)


@pytest.mark.parametrize(
    "dockerfile", ["backend/Dockerfile", "tracking_server/Dockerfile", "rollout/Dockerfile", "flows/Dockerfile"]
)
def test_every_file_an_image_copies_is_in_the_build_context(dockerfile):
    # .dockerignore excludes everything ("**") but what it re-includes with "!".
    included = [line[1:].rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines() if line.startswith("!")]
    copies = [
        source for line in re.findall(r"^COPY\s+(.+)$", (REPO / dockerfile).read_text(), re.M) for source in line.split()[:-1]
    ]
    assert copies
    for source in copies:
        assert any(source.rstrip("/") == kept or source.startswith(kept + "/") for kept in included), source


def imported_modules(package: str) -> set[str]:
    """Every module a package's code imports by absolute name, at any depth of a module (lazy imports too)."""
    names: set[str] = set()
    for path in (REPO / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
    return names


def test_the_deployables_imports_have_no_circle_and_none_reaches_into_the_local_stack():
    """Each top-level folder is one deployable: the imports between them (at any depth of a module)
    form no circle, and no deployable imports devstack/, which runs them all on one machine."""
    packages = {"backend", "data", "devstack", "flows", "operations", "ride_contract", "rollout", "serving_function", "training"}
    graph = {package: {name.split(".")[0] for name in imported_modules(package)} & packages - {package} for package in packages}
    assert not {name for name, uses in graph.items() if "devstack" in uses} - {"devstack"}, graph

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})) for nxt in graph[start])

    assert [name for name in packages if reaches(name, name, {name})] == [], graph
