"""The reference pages made from the code, and the check that they still are.

    python -m devstack.reference --write    # docs/reference/configuration.md and docs/reference/make-targets.md
    python -m devstack.reference --check    # exit 1, naming each page the code no longer makes

configuration.md: every environment variable each deployable reads, with its default and its meaning. A deployable
reads its configuration in one place, the ``from_env`` classmethods of its settings module, each building a
dataclass. They are read here as source, never run: a variable's default is the expression the code falls back
to, shown as a person reads it (a constant or a dataclass default evaluated; a chain of variables as "derived:
..."), and its meaning is the comment beside or above the dataclass field it sets (a comment above a field also
covers the uncommented fields right below it). A variable whose field has no comment fails the generation.
Two deployables have no settings module: the control plane (operations/) reads each variable where it uses it,
a row per variable whose meaning is the comment at a read of it (none fails); the tracking server is its image,
whose Dockerfile's command reads its variables, explained by IMAGE_VARIABLES (a difference fails).

``env_reads`` finds every read of the environment in the deployables' code (``os.environ.get``, ``os.getenv``,
``os.environ[...]``, ``in os.environ``, an alias such as ``env = os.environ.get``, a helper that reads the
variable its first argument names), in ``ride_contract/``, in ``prefect.yaml`` and ``MLproject``, and in the
images' Dockerfiles (``$NAME``, ``${NAME}``); ``undocumented`` names those that neither a table nor
PLATFORM_VARIABLES explains (tests/test_reference_docs.py). Writes (``os.environ[...] = ``, ``setdefault``) set a
library's variable and are no reads.

make-targets.md: every Make target with its ``##`` description, the list ``make help`` prints, and every variable
a user passes to make: each ``NAME ?= default`` line with the comment above it, and COMMAND_LINE_VARIABLES for
those the Makefile uses but never assigns.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import io
import re
import shlex
import sys
import tokenize
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIGURATION_PAGE = REPO / "docs/reference/configuration.md"
MAKE_TARGETS_PAGE = REPO / "docs/reference/make-targets.md"
WRITE_COMMAND = "python -m devstack.reference --write"


@dataclass(frozen=True)
class Deployable:
    title: str
    package: str  # the folder of its code
    # The module whose from_env classmethods read its configuration. "": none; the code reads each variable where
    # it uses it (a row per variable, its meaning the comment at the read), or only its image does (IMAGE_VARIABLES).
    settings: str
    runs_as: str  # what runs it, for the section's first line
    templates: tuple[str, ...] = ()  # files beside the code whose $VARIABLE references are its reads too
    image: str = ""  # its Dockerfile: the $VARIABLEs its instructions name (the CMD's) are its reads too

    @property
    def settings_module(self) -> str:
        return self.settings.removesuffix(".py").replace("/", ".")


DEPLOYABLES = (
    Deployable(
        "Training",
        "training",
        "training/settings.py",
        "`python -m training.train`, `mlflow run .`, and every flow (which train, score and read the registry)",
        templates=("MLproject",),
    ),
    Deployable(
        "Serving function",
        "serving_function",
        "serving_function/function_config.py",
        "the Cloud Run function that answers each ride from the stream (locally, the stack's function processes)",
    ),
    Deployable(
        "Rollout service",
        "rollout",
        "rollout/settings.py",
        "the controller that deploys what the registry's aliases name, guarded by the shadow analysis and the bake",
        image="rollout/Dockerfile",
    ),
    Deployable("Backend", "backend", "backend/settings.py", "the riders' API and page, on Cloud Run", image="backend/Dockerfile"),
    Deployable(
        "Flows",
        "flows",
        "flows/settings.py",
        "the Prefect flows (`flows/serve.py`, `prefect.yaml`) and their Cloud Run jobs (`python -m flows.job`)",
        templates=("prefect.yaml",),
        image="flows/Dockerfile",
    ),
    Deployable(
        "Tracking server",
        "tracking_server",
        "",
        "the MLflow tracking server on Cloud Run (`mlflow server`: the registry and the runs), configured by "
        "`infra/main.tf`; MLflow reads variables of its own too (`MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY`, set there)",
        image="tracking_server/Dockerfile",
    ),
    Deployable(
        "Control plane",
        "operations",
        "",
        "`python -m operations.gcp` and `python -m operations.deploy`, on an operator's machine or in CI. "
        "`operations.deploy deploy` (the function's first deployment) builds its gcloud commands from these; its "
        "other actions, and `operations.gcp`, find the deployed system by Terraform's outputs instead",
    ),
)
SHARED_CODE = ("ride_contract",)  # imported by every deployable: what it reads must be documented somewhere
# Variables a platform or a tool sets, which the deployables' code reads too. Each must still be read somewhere
# (tests/test_reference_docs.py): the list says why the code reads them, not what the platform does with them.
PLATFORM_VARIABLES = {
    "K_SERVICE": "Cloud Run sets it to the service's name: the serving function's name in its dead letters "
    "when `DEPLOYMENT_NAME` is not set",
    "MLFLOW_RUN_ID": "`mlflow run` sets it to the run it started: training logs into that run and its experiment",
    "PUBSUB_EMULATOR_HOST": "the local stack and the tests set it to the Pub/Sub emulator's address (the client "
    "library reads it too): on the emulator the backend pulls results with unary Pull calls (`RESULT_PULL`'s default)",
    "PORT": "Cloud Run sets it to the port a container must listen on (the images reading it set `8080` in their "
    "`ENV`, for a run elsewhere): their commands bind to it (gunicorn's `--bind`, `mlflow server --port`)",
}
# What an image's Dockerfile reads, for a deployable with no settings module of its own (its Dockerfile is left as
# it is: a change to it rebuilds the deployables' environments): variable -> its meaning. tests/test_reference_docs.py
# fails when the Dockerfile's $VARIABLEs are not exactly these keys. A default is the value the Dockerfile's `ENV`
# gives; with none, the command has no fallback: required.
IMAGE_VARIABLES = {
    "tracking_server/Dockerfile": {
        "PORT": "the port `mlflow server` listens on: Cloud Run's (see Set by a platform)",
        "DB_PASSWORD": "the password of the `mlflow` user of the Cloud SQL PostgreSQL database, the backend store: "
        "`infra/main.tf` passes it from Secret Manager (`ridestream-<env>-mlflow-db-password`)",
        "CLOUD_SQL_INSTANCE": "the Cloud SQL instance's connection name (`project:region:instance`): the database's "
        "socket is `/cloudsql/<it>`, which Cloud Run mounts (`infra/main.tf`)",
        "ARTIFACT_ROOT": "where a new experiment stores its artifacts, `gs://<models bucket>/mlflow` (`infra/main.tf`): "
        "clients write there themselves (`--no-serve-artifacts`)",
    },
}


class GenerationError(RuntimeError):
    """The code says something this generator cannot put in a table: what and where, so it can be fixed."""


# --- finding reads of the environment ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Read:
    """One read of an environment variable, in a file and a function (no line: the page would churn)."""

    name: str | None  # None: a name computed in a way this module cannot follow
    path: str
    function: str = ""


@dataclass(frozen=True)
class _Helper:
    required: bool  # an unset variable stops it
    default: tuple[int, str] | None  # the position and name of the parameter its read falls back to


def _argument(call: ast.Call, parameter: tuple[int, str]) -> ast.expr | None:
    """What a call passes for a parameter, by position or by keyword (None: nothing)."""
    position, name = parameter
    if len(call.args) > position:
        return call.args[position]
    return next((keyword.value for keyword in call.keywords if keyword.arg == name), None)


@dataclass(frozen=True)
class _Call:
    name: ast.expr  # the variable's name, as written
    default: ast.expr | None  # what an unset variable gives, as written; None: nothing (empty)
    required: bool  # an unset variable stops the reader


def _is_environ(node: ast.AST) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "environ" and isinstance(node.value, ast.Name)) or (
        isinstance(node, ast.Name) and node.id == "environ"
    )


def _is_getter(node: ast.AST) -> bool:
    """os.environ.get or os.getenv (or getenv, imported from os)."""
    if isinstance(node, ast.Attribute):
        return (node.attr == "get" and _is_environ(node.value)) or (node.attr == "getenv" and isinstance(node.value, ast.Name))
    return isinstance(node, ast.Name) and node.id == "getenv"


class _Module:
    """One Python file: what counts as a read in it, its comments, and (for a settings module) its values."""

    def __init__(self, path: str, source: str, namespace: dict | None = None):
        self.path, self.namespace = path, namespace or {}
        self.tree = ast.parse(source, filename=path)
        self.aliases = {
            target.id
            for node in ast.walk(self.tree)
            if isinstance(node, ast.Assign) and _is_getter(node.value)
            for target in node.targets
            if isinstance(target, ast.Name)
        }
        self.helpers: dict[str, _Helper] = {}  # call() consults it: empty while the helpers themselves are found
        self.helpers = self._helpers()
        self.comments = _comments(source)

    def call(self, node: ast.AST) -> _Call | None:
        """The read ``node`` is, if it is one."""
        if isinstance(node, ast.Call) and node.args:
            func = node.func
            if _is_getter(func) or (isinstance(func, ast.Name) and func.id in self.aliases):
                return _Call(node.args[0], node.args[1] if len(node.args) > 1 else None, False)
            if isinstance(func, ast.Name) and func.id in self.helpers:
                helper = self.helpers[func.id]
                default = _argument(node, helper.default) if helper.default is not None else None
                return _Call(node.args[0], default, helper.required and default is None)
        if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load) and _is_environ(node.value):
            return _Call(node.slice, None, True)
        if isinstance(node, ast.Compare) and isinstance(node.ops[0], ast.In | ast.NotIn) and _is_environ(node.comparators[0]):
            return _Call(node.left, None, False)
        return None

    def direct(self, node: ast.AST) -> _Call | None:
        """The read ``node`` is once the method calls on its value are set aside (``env("X", "").strip("/")``)."""
        while self.call(node) is None and isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            node = node.func.value
        return self.call(node)

    def _helpers(self) -> dict[str, _Helper]:
        """Module functions that read the variable their first parameter names (``_required(name)``): whether an
        unset one stops them (a ``raise`` under ``if not <what was read>``), and which parameter, if any, is the
        default of their read (``_env(name, default)``: ``os.environ.get(name, default)``)."""
        found = {}
        for function in self.tree.body:
            if not (isinstance(function, ast.FunctionDef) and function.args.args):
                continue
            parameters = [argument.arg for argument in function.args.args]
            calls = [
                (node, call)
                for node in ast.walk(function)
                if (call := self.call(node)) and isinstance(call.name, ast.Name) and call.name.id == parameters[0]
            ]
            if calls:
                named = {c.default.id for _, c in calls if isinstance(c.default, ast.Name) and c.default.id in parameters}
                default = (parameters.index(name), name) if len(named) == 1 and (name := named.pop()) else None
                required = bool(_required_locals(function) & _assigned_from(function, [node for node, _ in calls]))
                found[function.name] = _Helper(required, default)
        return found


def _required_locals(function: ast.FunctionDef) -> set[str]:
    """Names a function refuses to go on without: ``if not name: raise ...``."""
    return {
        node.test.operand.id
        for node in ast.walk(function)
        if isinstance(node, ast.If)
        and isinstance(node.test, ast.UnaryOp)
        and isinstance(node.test.op, ast.Not)
        and isinstance(node.test.operand, ast.Name)
        and any(isinstance(statement, ast.Raise) for statement in node.body)
    }


def _assigned_from(function: ast.FunctionDef, nodes: list[ast.AST]) -> set[str]:
    return {
        target.id
        for statement in ast.walk(function)
        if isinstance(statement, ast.Assign) and any(node in set(ast.walk(statement.value)) for node in nodes)
        for target in statement.targets
        if isinstance(target, ast.Name)
    }


def _local_values(function: ast.AST | None) -> dict[str, ast.expr]:
    """Names assigned once in a function -> what they are assigned (a name assigned twice is left out)."""
    values: dict[str, ast.expr] = {}
    seen: set[str] = set()
    for node in ast.walk(function) if function is not None else ():
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name in seen:
                values.pop(name, None)
            else:
                values[name] = node.value
            seen.add(name)
    return values


def _comments(source: str) -> dict[int, tuple[str, bool]]:
    """Line number -> (its comment's text, whether the comment is all the line holds)."""
    found = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            found[token.start[0]] = (token.string.lstrip("#").strip(), not token.line[: token.start[1]].strip())
    return found


def _field_names_read(name: ast.expr, cls: ast.ClassDef | None) -> list[str] | None:
    """``f"PREFIX{item.name.upper()}"`` in a loop over the dataclass's fields: one variable per field."""
    if cls is None or not isinstance(name, ast.JoinedStr) or len(name.values) != 2:
        return None
    prefix, formatted = name.values
    if not (isinstance(prefix, ast.Constant) and isinstance(formatted, ast.FormattedValue)):
        return None
    if ast.unparse(formatted.value).split(".", 1)[-1] != "name.upper()":
        return None
    return [prefix.value + field.upper() for field in _field_order(cls)]


def _field_order(cls: ast.ClassDef) -> list[str]:
    return [s.target.id for s in cls.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)]


def env_reads(path: str, source: str) -> list[Read]:
    """Every read of the environment in one file: a Python module, ``prefect.yaml`` (``{{ $NAME }}``) or another
    file whose commands name ``$NAME`` (``MLproject``)."""
    if path.endswith(".py"):
        return _python_reads(_Module(path, source))
    pattern = r"\{\{\s*\$(\w+)\s*\}\}" if path.endswith("prefect.yaml") else r"\$\{?([A-Za-z_]\w*)"
    lines = (line for line in source.splitlines() if not line.lstrip().startswith("#"))
    return [Read(name, path) for line in lines for name in re.findall(pattern, line)]


def _python_reads(module: _Module) -> list[Read]:
    return [read for read, _, _ in _python_calls(module)]


def _python_calls(module: _Module) -> list[tuple[Read, _Call, ast.AST]]:
    """Each read of one module with its call, as written, and the node that reads."""
    found: list[tuple[Read, _Call, ast.AST]] = []

    def visit(node: ast.AST, scope: str, cls: ast.ClassDef | None, helper_parameter: str | None, local: dict) -> None:
        call = module.call(node)
        if call is not None:
            name = call.name
            if isinstance(name, ast.Name) and name.id != helper_parameter:
                name = local.get(name.id, name)  # name = f"PREFIX{...}"; os.environ.get(name)
            if isinstance(name, ast.Constant) and isinstance(name.value, str):
                found.append((Read(name.value, module.path, scope), call, node))
            elif (names := _field_names_read(name, cls)) is not None:
                found.extend((Read(each, module.path, scope), call, node) for each in names)
            elif not (isinstance(name, ast.Name) and name.id == helper_parameter):  # a helper's: read where it is called
                found.append((Read(None, module.path, scope), call, node))
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                visit(child, child.name, child, None, {})
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                parameter = child.args.args[0].arg if child.name in module.helpers else None
                name = f"{scope}.{child.name}" if cls is not None else child.name
                visit(child, name, cls, parameter, _local_values(child))
            else:
                visit(child, scope, cls, helper_parameter, local)

    visit(module.tree, "", None, None, {})
    return found


def deployable_reads() -> list[Read]:
    """Every read in the deployables' code, templates and Dockerfiles, and in the code they share."""
    paths = [
        path for folder in (*(d.package for d in DEPLOYABLES), *SHARED_CODE) for path in sorted((REPO / folder).rglob("*.py"))
    ]
    paths += [REPO / file for d in DEPLOYABLES for file in (*d.templates, d.image) if file]
    return [read for path in paths for read in env_reads(str(path.relative_to(REPO)), path.read_text())]


def deployable_of(path: str) -> Deployable | None:
    """The deployable whose code, template or Dockerfile ``path`` is (None: code they share)."""
    return next((d for d in DEPLOYABLES if path in (*d.templates, d.image) or path.startswith(f"{d.package}/")), None)


def undocumented(reads: Iterable[Read], documented: dict[str, set[str]]) -> list[Read]:
    """The reads neither the tables nor PLATFORM_VARIABLES explain. ``documented``: per deployable's package, the
    variables its tables (and the tables of the readers its code imports) list."""
    everywhere = set().union(*documented.values())
    missing = []
    for read in reads:
        deployable = deployable_of(read.path)
        known = documented.get(deployable.package, set()) if deployable else everywhere
        if read.name is None or (read.name not in known and read.name not in PLATFORM_VARIABLES):
            missing.append(read)
    return missing


# --- the tables --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Variable:
    name: str
    default: str  # Markdown
    meaning: str  # Markdown
    read_in: str = ""  # Markdown: where the code reads it, for a deployable that reads each variable where it uses it


@dataclass(frozen=True)
class Reader:
    cls: str
    doc: str
    variables: tuple[Variable, ...]


@dataclass(frozen=True)
class _Occurrence:
    name: str
    field: str
    default: str
    note: str  # what holds only for this variable of the field ("Read when `PROJECT_ID` is empty.")


def readers(path: str, source: str, namespace: dict) -> list[Reader]:
    """The tables of one settings module: a reader per class with a ``from_env`` classmethod, each followed by the
    readers its ``from_env`` calls. ``namespace``: the module's values, for the defaults written as names."""
    module = _Module(path, source, namespace)
    classes = {node.name: node for node in module.tree.body if isinstance(node, ast.ClassDef) and _from_env(node)}
    called = {name: _called_readers(_from_env(node), classes) for name, node in classes.items()}
    nested = {name for names in called.values() for name in names}
    ordered = []
    for name in classes:
        if name not in nested:
            ordered += [name, *called[name]]
    return [_reader(module, classes[name]) for name in ordered]


def _from_env(cls: ast.ClassDef) -> ast.FunctionDef | None:
    return next((n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "from_env"), None)


def _from_env_calls(tree: ast.AST) -> list[str]:
    """The names X of every ``X.from_env()`` call under ``tree``, in order."""
    return [
        node.func.value.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "from_env"
        and isinstance(node.func.value, ast.Name)
    ]


def _called_readers(method: ast.FunctionDef, classes: dict[str, ast.ClassDef]) -> list[str]:
    return [name for name in _from_env_calls(method) if name in classes]


def _reader(module: _Module, cls: ast.ClassDef) -> Reader:
    klass = module.namespace[cls.name]
    defaults = {f.name: f.default for f in dataclasses.fields(klass) if f.default is not dataclasses.MISSING}
    occurrences = _field_occurrences(module, cls) or _keyword_occurrences(module, cls, klass)
    variable_of: dict[str, str] = {}  # field -> the first variable setting it
    rows: dict[str, _Occurrence] = {}
    for occurrence in occurrences:
        if occurrence.name not in PLATFORM_VARIABLES and occurrence.name not in rows:
            rows[occurrence.name] = occurrence
            variable_of.setdefault(occurrence.field, occurrence.name)
    meanings = _field_meanings(module, cls)
    variables = []
    for occurrence in rows.values():
        default = occurrence.default
        if default == "empty" and occurrence.field in defaults:  # empty gives the dataclass's default
            default = _shown(defaults[occurrence.field], module)
        meaning = _meaning(module, cls, occurrence, meanings, variable_of)
        variables.append(Variable(occurrence.name, default, occurrence.note + _prose(_with_variables(meaning, variable_of))))
    return Reader(cls.name, " ".join((ast.get_docstring(cls) or "").split()), tuple(variables))


def _field_occurrences(module: _Module, cls: ast.ClassDef) -> list[_Occurrence]:
    """A reader that reads one variable per field under a computed name (``ROLLOUT_<FIELD>``)."""
    defaults = {f.name: f.default for f in dataclasses.fields(module.namespace[cls.name])}
    local = _local_values(_from_env(cls))
    for node in ast.walk(_from_env(cls)):
        if (call := module.call(node)) is None:
            continue
        written = local.get(call.name.id, call.name) if isinstance(call.name, ast.Name) else call.name
        if (names := _field_names_read(written, cls)) is not None:
            return [
                _Occurrence(variable, field, _shown(defaults[field], module), "")
                for variable, field in zip(names, _field_order(cls), strict=True)
            ]
    return []


def _built(module: _Module, cls: ast.ClassDef) -> ast.Call:
    """The ``cls(...)`` call ``from_env`` returns."""
    built = next((n.value for n in ast.walk(_from_env(cls)) if isinstance(n, ast.Return)), None)
    if not (isinstance(built, ast.Call) and isinstance(built.func, ast.Name) and built.func.id == "cls"):
        raise GenerationError(f"{module.path}: {cls.name}.from_env does not return `cls(...)`")
    return built


def _keyword_occurrences(module: _Module, cls: ast.ClassDef, klass: type) -> Iterator[_Occurrence]:
    """The variables behind each keyword of ``return cls(...)`` in ``from_env``, in its order."""
    expression = _Expression(module, _from_env(cls), klass)
    for keyword in _built(module, cls).keywords:
        for name, default, note in expression.walk(keyword.value):
            yield _Occurrence(name, keyword.arg, default, note)


class _Expression:
    """Reads in one ``from_env``'s expressions, each with its default as a person would say it."""

    def __init__(self, module: _Module, method: ast.FunctionDef, klass: type):
        self.module, self.klass = module, klass
        self.locals = _local_values(method)
        self.required = _required_locals(method)

    def walk(self, node: ast.AST, fallback: str | None = None, note: str = "", required: bool = False):
        """(name, default, note) for each read in ``node``. ``fallback``: what an unset variable gives when the
        read is one operand of an ``or`` chain; ``required``: a local the method refuses to go on without."""
        call = self.module.direct(node)
        if call is not None:
            name = self._name(call)
            if call.required or required:
                default = "required"
            elif fallback is not None:
                default = fallback
            else:
                default = self.value(call.default) if call.default is not None else "empty"
            yield name, default, note
        elif isinstance(node, ast.BoolOp) and isinstance(node.op, ast.Or):
            yield from self._chain(node.values, note, required)
        elif isinstance(node, ast.IfExp):
            yield from self.walk(node.test, None, note)
            condition = self.condition(node.test)
            for branch, when in ((node.body, f" if {condition}"), (node.orelse, f" unless {condition}")):
                yield from ((name, default + when, note) for name, default, note in self.walk(branch, None, note, required))
        elif isinstance(node, ast.Name) and node.id in self.locals:
            yield from self.walk(self.locals[node.id], fallback, note, required or node.id in self.required)
        elif not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "from_env"):
            for child in ast.iter_child_nodes(node):  # a nested reader (X.from_env()) has a table of its own
                yield from self.walk(child, None, note, required)

    def _chain(self, operands: list[ast.expr], note: str, required: bool):
        """``A or B or "c"``: A's default is the rest of the chain; B is read when A is empty."""
        for index, operand in enumerate(operands):
            if self.module.direct(operand) is None:
                yield from self.walk(operand, None, note, required)
                continue
            rest = operands[index + 1 :]
            shown = [self._operand(o) for o in rest]
            fallback = ("derived: " if any(self._reads_in(o) for o in rest) else "") + ", else ".join(shown)
            before = [f"`{self._name(c)}`" for o in operands[:index] if (c := self.module.direct(o))]
            when = f"Read when {' and '.join(before)} {'is' if len(before) == 1 else 'are'} empty. " if before else ""
            yield from self.walk(operand, fallback or None, note + when, required)

    def _operand(self, node: ast.expr) -> str:
        call = self.module.direct(node)
        if call is None:
            return self.value(node)
        return f"`{self._name(call)}`" + (" (required)" if call.required else "")

    def _reads_in(self, node: ast.AST) -> bool:
        return any(self.module.call(n) is not None for n in ast.walk(node))

    def _name(self, call: _Call) -> str:
        if not (isinstance(call.name, ast.Constant) and isinstance(call.name.value, str)):
            raise GenerationError(f"{self.module.path}: a variable's name is computed: {ast.unparse(call.name)}")
        return call.name.value

    def value(self, node: ast.expr) -> str:
        """A default as a person reads it: evaluated when it is a constant expression (``str(cls.limit)``)."""
        if isinstance(node, ast.IfExp):
            return f"{self.value(node.body)} if {self.condition(node.test)}, else {self.value(node.orelse)}"
        if self._reads_in(node):
            raise GenerationError(f"{self.module.path}: cannot say what {ast.unparse(node)} gives")
        expression = compile(ast.Expression(body=node), self.module.path, "eval")
        # The repository's own settings modules, their constant expressions only: nothing from outside is evaluated.
        return _shown(eval(expression, {**self.module.namespace, "cls": self.klass}), self.module)  # noqa: S307

    def condition(self, node: ast.expr, negated: bool = False) -> str:
        """When a test holds, in words: ``model_uri or not run_id`` -> "`MODEL_URI` is set or `RUN_ID` is empty"."""
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            return self.condition(node.operand, not negated)
        if isinstance(node, ast.BoolOp):  # not (a or b) is (not a) and (not b)
            either = isinstance(node.op, ast.Or) != negated
            return (" or " if either else " and ").join(self.condition(v, negated) for v in node.values)
        if isinstance(node, ast.Name) and node.id in self.locals:
            return self.condition(self.locals[node.id], negated)
        call = self.module.direct(node)
        if call is None:
            raise GenerationError(f"{self.module.path}: cannot say when {ast.unparse(node)} holds")
        return f"`{self._name(call)}` is {'empty' if negated else 'set'}"


def _shown(value: object, module: _Module) -> str:
    """A default as Markdown: a code span, or "empty"; paths under the repository from ``<repository>``."""
    if value is None or value == "" or value == ():
        return "empty"
    if isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, float):
        text = str(int(value)) if value.is_integer() else repr(value)
    else:
        text = str(value)
    for root in {str(REPO), *_module_roots(module)}:
        text = text.replace(root, "<repository>")
    return f"`{text}`"


def _module_roots(module: _Module) -> set[str]:
    """The repository folder the settings module was imported from (another checkout, the installed copy)."""
    file = module.namespace.get("__file__")
    return {str(Path(file).resolve().parents[1])} if file else set()


def _field_meanings(module: _Module, cls: ast.ClassDef) -> dict[str, tuple[str, str]]:
    """Field -> (its comment, the field that comment belongs to): the comment beside a field and the block above
    it; a block above also covers the uncommented fields right below it (until a blank line)."""
    meanings: dict[str, tuple[str, str]] = {}
    group: tuple[str, str] | None = None
    previous_end = -1
    for statement in cls.body:
        if not (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)):
            group, previous_end = None, -1
            continue
        field = statement.target.id
        above = _block_above(module.comments, statement.lineno)
        lines = range(statement.lineno, statement.end_lineno + 1)
        beside = [module.comments[line][0] for line in lines if line in module.comments and not module.comments[line][1]]
        text = " ".join(filter(None, [above, *beside]))
        if text:
            meanings[field] = (text, field)
            group = (text, field) if above else None
        elif group is not None and statement.lineno == previous_end + 1:
            meanings[field] = group
        previous_end = statement.end_lineno
    return meanings


def _block_above(comments: dict[int, tuple[str, bool]], line: int) -> str:
    block = []
    while (comment := comments.get(line - 1)) and comment[1]:
        block.insert(0, comment[0])
        line -= 1
    return " ".join(block)


def _meaning(module: _Module, cls: ast.ClassDef, occurrence: _Occurrence, meanings: dict, variable_of: dict) -> str:
    """The field's comment; for a field covered by the comment of another, a pointer to that one's variable; else
    the comment above a module constant the reader falls back to, or a helper's docstring naming the variable."""
    if occurrence.field in meanings:
        text, owner = meanings[occurrence.field]
        if owner != occurrence.field and owner in variable_of:
            return f"See `{variable_of[owner]}`."
        return _without_own_name(text, occurrence.name)
    keyword = next((k.value for k in _built(module, cls).keywords if k.arg == occurrence.field), None)
    named = {n.id for n in ast.walk(keyword) if isinstance(n, ast.Name)} if keyword else set()
    for node in module.tree.body:
        constant = isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id in named for t in node.targets)
        if constant and (block := _block_above(module.comments, node.lineno)):
            return block
        helper = isinstance(node, ast.FunctionDef) and node.name in named
        if helper and (doc := ast.get_docstring(node) or "").startswith(occurrence.name):
            return _without_own_name(" ".join(doc.split()), occurrence.name)
    raise GenerationError(
        f"{module.path}: {cls.name}.{occurrence.field} (read from {occurrence.name}) has no comment: "
        "say what it means beside or above the field"
    )


def _without_own_name(text: str, name: str) -> str:
    """Without a leading "NAME: ": the table names the variable already."""
    return text.removeprefix(f"{name}: ")


_CONSTANT_NAME = re.compile(r"(?<![\w`$.])[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+(?![\w`])")


def _prose(text: str) -> str:
    """A comment as a table's sentence: its first letter capitalised, NAMES_LIKE_THESE as code, outside code spans."""
    parts = text.split("`")
    parts = [part if index % 2 else _CONSTANT_NAME.sub(lambda m: f"`{m[0]}`", part) for index, part in enumerate(parts)]
    text = "`".join(parts)
    return text[:1].upper() + text[1:]


def _with_variables(text: str, variable_of: dict[str, str]) -> str:
    """Field names in a comment ("at least bake_min_rides") as the variables that set them."""
    for field, name in variable_of.items():
        if "_" in field:
            text = re.sub(rf"(?<![`\w]){re.escape(field)}(?![`\w])", f"`{name}`", text)
    return text


def template_variables(path: str, source: str) -> dict[str, str]:
    """The variables a template reads -> what the comment lines of the file that name each say."""
    comments = [line.lstrip()[1:].strip() for line in source.splitlines() if line.lstrip().startswith("#")]
    meanings = {}
    for name in dict.fromkeys(read.name for read in env_reads(path, source)):
        lines = [line for line in comments if re.search(rf"\b{name}\b", line)]
        if not lines:
            raise GenerationError(f"{path}: {name} is read but no comment in the file says what it is")
        meanings[name] = _prose(_without_own_name(" ".join(lines), name))
    return meanings


def reads_where_used(folder: str, sources: dict[str, str], namespaces: dict[str, dict]) -> list[Variable]:
    """A row per variable code with no settings module reads, in the order of the reads: the default its reads
    give (one default for all of them, or it fails), and its meaning, the comments at its reads (beside the read,
    or the comment lines right above its line), each read without one taken as covered by another's (none fails).
    ``sources``: path -> source; ``namespaces``: path -> the module's values, for a default written as a name."""
    found: dict[str, dict[str, list]] = {}  # name -> its defaults, meanings and reads, one of each per read
    for path, source in sources.items():
        module = _Module(path, source, namespaces.get(path))
        for read, call, node in _python_calls(module):
            if read.name is None:
                raise GenerationError(f"{path} ({read.function}): a variable's name is computed: {ast.unparse(call.name)}")
            entry = found.setdefault(read.name, {"defaults": [], "meanings": [], "where": []})
            entry["defaults"].append(_default_at(module, call))
            entry["meanings"].append(_comment_at(module, node))
            entry["where"].append(read)
    variables = []
    for name, entry in found.items():
        defaults, where = list(dict.fromkeys(entry["defaults"])), _places(entry["where"])
        if len(defaults) > 1:
            raise GenerationError(f"{folder}: {name} is read with different defaults ({', '.join(defaults)}) in {where}")
        meanings = [_without_own_name(text, name) for text in dict.fromkeys(entry["meanings"]) if text]
        if not meanings:
            raise GenerationError(f"{where}: {name} is read with no comment: say what it means beside or above the read")
        variables.append(Variable(name, defaults[0], _prose(" ".join(meanings)), where))
    return variables


def _places(reads: Iterable[Read]) -> str:
    """Where reads are, as Markdown: each file once, with the functions reading in it."""
    functions: dict[str, list[str]] = {}
    for read in reads:
        listed = functions.setdefault(read.path, [])
        if read.function and read.function not in listed:
            listed.append(read.function)
    return ", ".join(
        f"`{path}`" + (" (" + ", ".join(f"`{f}`" for f in names) + ")" if names else "") for path, names in functions.items()
    )


def _default_at(module: _Module, call: _Call) -> str:
    """What an unset variable gives at one read: its default evaluated (a constant expression of the module)."""
    if call.default is None:
        return "required" if call.required else "empty"
    if any(module.call(node) is not None for node in ast.walk(call.default)):
        raise GenerationError(f"{module.path}: cannot say what {ast.unparse(call.default)} gives")
    expression = compile(ast.Expression(body=call.default), module.path, "eval")
    try:  # the repository's own modules, their constant expressions only: nothing from outside is evaluated
        return _shown(eval(expression, dict(module.namespace)), module)  # noqa: S307
    except NameError as exc:  # a local, or a name the module does not have
        raise GenerationError(f"{module.path}: cannot say what {ast.unparse(call.default)} gives ({exc})") from None


def _comment_at(module: _Module, node: ast.AST) -> str:
    """The comment beside a read (on its first or last line), else the comment lines right above its first line."""
    lines = dict.fromkeys((node.lineno, node.end_lineno))
    beside = [module.comments[line][0] for line in lines if line in module.comments and not module.comments[line][1]]
    return " ".join(beside) or _block_above(module.comments, node.lineno)


def image_variables(path: str, source: str, meanings: dict[str, str]) -> list[Variable]:
    """A row per variable a Dockerfile reads, in its order: the default its `ENV` gives (none: required), and its
    meaning from ``meanings`` (IMAGE_VARIABLES), which must name exactly the variables the Dockerfile reads."""
    read = list(dict.fromkeys(r.name for r in env_reads(path, source)))
    unexplained, unread = sorted(set(read) - set(meanings)), sorted(set(meanings) - set(read))
    if unexplained or unread:
        differences = [f"reads {unexplained}, which IMAGE_VARIABLES does not explain"] if unexplained else []
        differences += [f"does not read {unread}, which IMAGE_VARIABLES lists"] if unread else []
        raise GenerationError(f"{path} {' and '.join(differences)}: make IMAGE_VARIABLES[{path!r}] its variables")
    defaults = image_environment(source)
    return [Variable(name, f"`{defaults[name]}`" if name in defaults else "required", _prose(meanings[name])) for name in read]


def image_environment(source: str) -> dict[str, str]:
    """The variables a Dockerfile's ``ENV NAME=value ...`` instructions set, with their values."""
    text = source.replace("\\\n", " ")
    return {
        name: value
        for line in text.splitlines()
        if line.startswith("ENV ")
        for name, _, value in (item.partition("=") for item in shlex.split(line[4:]))
    }


# --- the configuration page --------------------------------------------------------------------------------------
def deployable_readers(deployable: Deployable) -> list[Reader]:
    if not deployable.settings:
        return []
    source = (REPO / deployable.settings).read_text()
    return readers(deployable.settings, source, vars(importlib.import_module(deployable.settings_module)))


def deployable_reads_where_used(deployable: Deployable) -> list[Variable]:
    """The rows of a deployable with no settings module whose code reads the environment (operations/)."""
    if deployable.settings:
        return []
    paths = sorted((REPO / deployable.package).rglob("*.py"))
    sources = {str(path.relative_to(REPO)): path.read_text() for path in paths}
    namespaces = {path: vars(importlib.import_module(_module_name(path))) for path in sources}
    return reads_where_used(deployable.package, sources, namespaces)


def _module_name(path: str) -> str:
    return path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")


def deployable_image(deployable: Deployable) -> list[Variable]:
    """The rows of a deployable whose Dockerfile IMAGE_VARIABLES explains (the tracking server)."""
    if deployable.image not in IMAGE_VARIABLES:
        return []
    return image_variables(deployable.image, (REPO / deployable.image).read_text(), IMAGE_VARIABLES[deployable.image])


def deployable_templates(deployable: Deployable) -> dict[str, dict[str, str]]:
    return {template: template_variables(template, (REPO / template).read_text()) for template in deployable.templates}


def imported_readers(deployable: Deployable) -> dict[str, list[tuple[str, str]]]:
    """Other deployables' settings modules this one's code reads: module -> [(file, "")] for the files importing it;
    a file that does not, but imports a module of another package that builds one of its readers
    (``Settings.from_env()``: operations/ resolves the registry's aliases through ``training.registry``), is
    (file, that module)."""
    modules = {d.settings_module for d in DEPLOYABLES if d.settings and d is not deployable}
    found: dict[str, dict[str, str]] = {}
    for path in sorted((REPO / deployable.package).rglob("*.py")):
        relative = str(path.relative_to(REPO))
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.module and node.level == 0):
                continue
            if node.module in modules:
                found.setdefault(node.module, {})[relative] = ""
                continue
            if node.module.split(".")[0] == deployable.package:  # its own modules: each file is read on its own
                continue
            # from training import registry; from training.registry import resolve
            for between in dict.fromkeys((node.module, *(f"{node.module}.{alias.name}" for alias in node.names))):
                for module in _readers_built_by(between, modules):
                    found.setdefault(module, {}).setdefault(relative, between)
    return {module: sorted(files.items()) for module, files in found.items()}


def _readers_built_by(module: str, settings_modules: set[str]) -> list[str]:
    """The settings modules whose readers a module of the repository imports and builds (``X.from_env()``)."""
    path = REPO / (module.replace(".", "/") + ".py")
    if not path.is_file():
        return []
    tree = ast.parse(path.read_text())
    built = set(_from_env_calls(tree))
    return [
        node.module
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
        and node.module in settings_modules
        and any((alias.asname or alias.name) in built for alias in node.names)
    ]


def own_variables() -> dict[str, set[str]]:
    """Per deployable's package: the variables its own tables list (its readers', its templates', those it reads
    where it uses them, its image's)."""
    return {
        d.package: {v.name for r in deployable_readers(d) for v in r.variables}.union(
            *deployable_templates(d).values(),
            (v.name for v in (*deployable_reads_where_used(d), *deployable_image(d))),
        )
        for d in DEPLOYABLES
    }


def documented_variables(own: dict[str, set[str]]) -> dict[str, set[str]]:
    """Per deployable's package: its own variables and those of the readers its code imports."""
    by_module = {d.settings_module: d.package for d in DEPLOYABLES if d.settings}
    return {d.package: own[d.package].union(*(own[by_module[m]] for m in imported_readers(d))) for d in DEPLOYABLES}


def _cell(text: str) -> str:
    """Table-safe Markdown: pipes escaped, and < outside code spans (a path like <color>_tripdata is no HTML tag)."""
    parts = text.replace("|", "\\|").split("`")
    return "`".join(part if index % 2 else part.replace("<", "&lt;") for index, part in enumerate(parts))


def _table(header: tuple[str, ...], rows: Iterable[tuple[str, ...]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    return lines + ["| " + " | ".join(_cell(cell) for cell in row) + " |" for row in rows]


def _deployable_section(deployable: Deployable) -> list[str]:
    tables = deployable_readers(deployable)
    where_used, image = deployable_reads_where_used(deployable), deployable_image(deployable)
    if tables:
        classes = ", ".join(f"`{r.cls}.from_env`" for r in tables)
        read_by = f"Read by {classes} in `{deployable.settings}`"
    elif image:
        read_by = f"Read by the command of `{deployable.image}` (the meanings: `IMAGE_VARIABLES` in `devstack/reference.py`)"
    else:
        read_by = f"Read where the code of `{deployable.package}/` uses each, with the comment at the read as its meaning"
    lines = [f"## {deployable.title}", "", f"{read_by}: {deployable.runs_as}."]
    for module, importers in imported_readers(deployable).items():
        title = next(d.title for d in DEPLOYABLES if d.settings_module == module)
        files = ", ".join(f"`{path}`" + (f" through `{between}`" if between else "") for path, between in importers)
        lines[-1] += f" Its code also reads the variables of {title} (`{module}`, imported by {files})."
    if where_used:
        rows = ((f"`{v.name}`", v.default, v.meaning, v.read_in) for v in where_used)
        lines += ["", *_table(("variable", "default", "meaning", "read in"), rows)]
    if image:
        lines += ["", *_table(("variable", "default", "meaning"), ((f"`{v.name}`", v.default, v.meaning) for v in image))]
    for reader in tables:
        if len(tables) > 1:
            lines += ["", f"### `{reader.cls}`"]
            if reader.doc:
                lines += ["", _cell(_prose(reader.doc))]
        lines += [
            "",
            *_table(("variable", "default", "meaning"), ((f"`{v.name}`", v.default, v.meaning) for v in reader.variables)),
        ]
    for template, meanings in deployable_templates(deployable).items():
        lines += ["", f"### `{template}`", ""]
        if meanings:
            lines += _table(("variable", "meaning"), ((f"`{name}`", meaning) for name, meaning in meanings.items()))
        else:
            lines.append(f"`{template}` reads no environment variable.")
    return lines


def _outside_readers(own: dict[str, set[str]]) -> list[tuple[str, str, str]]:
    """(variable, where, the section listing it) for each read outside the readers' from_env methods (and outside
    the deployables with no settings module, whose reads are the rows of their own section): the reading
    deployable's own section first, else the first that lists it."""
    reader_methods = {(d.settings, f"{r.cls}.from_env") for d in DEPLOYABLES for r in deployable_readers(d)}
    rows = {}
    for read in deployable_reads():
        if (read.path, read.function) in reader_methods or read.name is None:
            continue
        reading = deployable_of(read.path)
        if reading is not None and not reading.settings and read.name in own[reading.package]:
            continue
        reading = deployable_of(read.path)
        candidates = [d for d in DEPLOYABLES if d is reading] + [d for d in DEPLOYABLES if d is not reading]
        listing = next((d.title for d in candidates if read.name in own[d.package]), None)
        section = "Set by a platform" if read.name in PLATFORM_VARIABLES else listing or "none"
        where = f"`{read.path}`" + (f" (`{read.function}`)" if read.function else "")
        rows[(read.name, where)] = (f"`{read.name}`", where, section)
    return sorted(rows.values(), key=lambda row: (row[1], row[0]))


def _platform_rows() -> list[tuple[str, str, str]]:
    reads = deployable_reads()
    return [
        (f"`{name}`", _prose(why), _places(read for read in reads if read.name == name))
        for name, why in PLATFORM_VARIABLES.items()
    ]


def configuration_page() -> str:
    own = own_variables()
    lines = [
        "# Configuration reference",
        "",
        f"Generated from the code by `{WRITE_COMMAND}` (`devstack/reference.py`); do not edit by hand:",
        "`tests/test_reference_docs.py` fails when the code reads a variable this page does not list, or a default",
        "or meaning here is no longer the code's.",
        "",
        "Each deployable reads its configuration from the environment in one place, the `from_env` classmethods of",
        "its settings module; the control plane (`operations/`) reads each variable where it uses it, and the tracking",
        "server's image reads its own in its command. A default is what an unset variable gives (`<repository>`: this",
        'repository\'s folder); "required": the deployable does not start (or the command stops) without it. A meaning',
        "is the comment beside the setting, or the read, in the code. Variables only a client library reads (MLflow's,",
        "Google Cloud's) are theirs to document.",
    ]
    for deployable in DEPLOYABLES:
        lines += ["", *_deployable_section(deployable)]
    lines += [
        "",
        "## Set by a platform",
        "",
        "Variables the code reads that a platform or a tool sets, not the operator.",
        "",
        *_table(("variable", "set by, and why the code reads it", "read in"), _platform_rows()),
        "",
        "## Read outside the readers",
        "",
        "Every other place the deployables' code (and `ride_contract/`, `prefect.yaml`, `MLproject`, the images'",
        "Dockerfiles) reads the environment, and the table above that lists the variable.",
        "",
        *_table(("variable", "read in", "listed under"), _outside_readers(own)),
    ]
    return "\n".join(lines) + "\n"


# --- the Make targets --------------------------------------------------------------------------------------------
MAKEFILE = REPO / "Makefile"
# A rule line with its description: `name: prerequisites  ## what it does` (never `NAME := value`). `make help`'s
# awk program reads the same lines.
_DESCRIBED_TARGET = re.compile(r"^([A-Za-z0-9_-]+):(?!=)[^#]*##\s*(.*?)\s*$")


def make_targets(makefile: str) -> list[tuple[str, str]]:
    """(target, description) for every target with a ``##`` description, in the Makefile's order."""
    return [(m[1], m[2]) for line in makefile.splitlines() if (m := _DESCRIBED_TARGET.match(line))]


def phony_targets(makefile: str) -> list[str]:
    text = makefile.replace("\\\n", " ")
    return [name for line in text.splitlines() if line.startswith(".PHONY:") for name in line.split(":", 1)[1].split()]


# `NAME ?= default`: a variable the command line (or the environment) may set, its meaning the comment lines above.
_DEFAULTED = re.compile(r"^([A-Za-z_]\w*)\s*\?=\s*(.*?)\s*$")
# Any assignment: `NAME := value`, `export NAME = value`, `NAME ?= value`, `NAME += value`.
_ASSIGNED = re.compile(r"^(?:export\s+|override\s+)?([A-Za-z_]\w*)\s*(?::{1,3}|\?|\+|!)?=", re.MULTILINE)
# A reference to a variable by its bare name, $(NAME) or ${NAME} (not $$(...), the shell's, in a recipe).
_REFERENCE = re.compile(r"(?<!\$)\$[({]([A-Za-z_]\w*)[)}]")
MAKE_OWN_VARIABLES = {"MAKEFILE_LIST", "MAKECMDGOALS", "MAKEFLAGS", "MAKE", "CURDIR", "SHELL", ".DEFAULT_GOAL"}
# Variables a user passes that the Makefile uses with no `?=` line, so no comment to read: name -> (default,
# meaning). tests/test_reference_docs.py fails unless these are exactly the variables the Makefile uses and never
# assigns (command_line_variables).
COMMAND_LINE_VARIABLES = {
    "VERSION": (
        "none: `make promote` stops without it",
        "the registered model version `make promote` makes production: `make promote VERSION=N`",
    ),
    "PROJECT": (
        "none: the gcp-* targets stop without it",
        "your Google Cloud project's id, for the gcp-* targets (`--project`): `make gcp-up PROJECT=my-project`",
    ),
    "DRY_RUN": (
        "empty",
        "any value: the gcp-* targets print every command and API call they would make, in order, and make none "
        "(`--dry-run`): `make gcp-up PROJECT=my-project DRY_RUN=1`",
    ),
}


def command_line_variables(makefile: str) -> set[str]:
    """The variables the Makefile uses but never assigns (nor Make itself does): only a user's come from outside."""
    assigned = set(_ASSIGNED.findall(makefile))
    return set(_REFERENCE.findall(makefile)) - assigned - MAKE_OWN_VARIABLES


def make_variables(makefile: str) -> list[tuple[str, str, str]]:
    """(variable, default, meaning) for each variable a user passes, in the order the Makefile first names them:
    each ``NAME ?= default`` line with the comment lines right above it, and COMMAND_LINE_VARIABLES."""
    lines = makefile.splitlines()
    found: dict[str, tuple[str, str]] = {}
    for index, line in enumerate(lines):
        if match := _DEFAULTED.match(line):
            name, default = match.groups()
            above: list[str] = []
            while index > 0 and lines[index - 1].startswith("#"):
                index -= 1
                above.insert(0, lines[index].lstrip("#").strip())
            if not above:
                raise GenerationError(f"Makefile: {name} ?= {default} has no comment above it: say what it means")
            found[name] = (f"`{default}`" if default else "empty", " ".join(above))
    outside = command_line_variables(makefile)
    unlisted, unused = sorted(outside - set(COMMAND_LINE_VARIABLES)), sorted(set(COMMAND_LINE_VARIABLES) - outside)
    if unlisted or unused:
        differences = [f"uses {unlisted} with no `?=` line (give each one, with a comment above it)"] if unlisted else []
        differences += [f"does not use {unused}, or assigns them"] if unused else []
        raise GenerationError(f"the Makefile {' and '.join(differences)}: make COMMAND_LINE_VARIABLES say so")
    found.update(COMMAND_LINE_VARIABLES)
    first: dict[str, int] = {}  # name -> the line naming it first
    for number, line in enumerate(lines):
        for name in [m[1] for m in [_DEFAULTED.match(line)] if m] + _REFERENCE.findall(line):
            first.setdefault(name, number)
    return [(name, default, _prose(meaning)) for name, (default, meaning) in sorted(found.items(), key=lambda i: first[i[0]])]


def make_targets_page() -> str:
    makefile = MAKEFILE.read_text()
    targets = ((f"`make {target}`", description) for target, description in make_targets(makefile))
    variables = ((f"`{name}`", default, meaning) for name, default, meaning in make_variables(makefile))
    lines = [
        "# Make targets",
        "",
        f"Generated from the `Makefile` by `{WRITE_COMMAND}` (`devstack/reference.py`); do not edit by hand:",
        "`tests/test_reference_docs.py` fails when the `Makefile` says otherwise.",
        "",
        "## Targets",
        "",
        "Every target with a `##` description, in the `Makefile`'s order; `make help` prints the same list, and so",
        "does a bare `make`.",
        "",
        *_table(("target", "what it does"), targets),
        "",
        "## Variables",
        "",
        "What a target takes from the command line, e.g. `make gcp-up PROJECT=my-project REGION=europe-west4`: each",
        "`NAME ?= default` line of the `Makefile` with the comment above it, and the variables it uses with no default",
        f"({', '.join(f'`{name}`' for name in COMMAND_LINE_VARIABLES)}: `COMMAND_LINE_VARIABLES` in `devstack/reference.py`).",
        "A variable of the same name in the environment counts too.",
        "",
        *_table(("variable", "default", "meaning"), variables),
    ]
    return "\n".join(lines) + "\n"


PAGES = {CONFIGURATION_PAGE: configuration_page, MAKE_TARGETS_PAGE: make_targets_page}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devstack.reference", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="write the pages under docs/reference/")
    mode.add_argument("--check", action="store_true", help="exit 1 if a page is not what the code makes")
    args = parser.parse_args(argv)
    stale = []
    for page, make in PAGES.items():
        try:
            text = make()
        except GenerationError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        if args.write:
            page.parent.mkdir(parents=True, exist_ok=True)
            page.write_text(text)
            print(f"wrote {page.relative_to(REPO)}")
        elif not page.exists() or page.read_text() != text:
            stale.append(str(page.relative_to(REPO)))
    for page in stale:
        print(f"{page} is not what the code makes: run `{WRITE_COMMAND}`", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
