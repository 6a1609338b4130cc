"""The reference pages made from the code, and the check that they still are.

    python -m devstack.reference --write    # docs/reference/configuration.md and docs/reference/make-targets.md
    python -m devstack.reference --check    # exit 1, naming each page the code no longer makes

configuration.md: every environment variable each deployable reads, with its default and its meaning. A deployable
reads its configuration in one place, the ``from_env`` classmethods of its settings module, each building a
dataclass. They are read here as source, never run: a variable's default is the expression the code falls back
to, shown as a person reads it (a constant or a dataclass default evaluated; a chain of variables as "derived:
..."), and its meaning is the comment beside or above the dataclass field it sets (a comment above a field also
covers the uncommented fields right below it). A variable whose field has no comment fails the generation.

``env_reads`` finds every read of the environment in the deployables' code (``os.environ.get``, ``os.getenv``,
``os.environ[...]``, ``in os.environ``, an alias such as ``env = os.environ.get``, a helper that reads the
variable its first argument names), in ``ride_contract/``, and in ``prefect.yaml`` and ``MLproject``;
``undocumented`` names those that neither a table nor PLATFORM_VARIABLES explains (tests/test_reference_docs.py).
Writes (``os.environ[...] = ``, ``setdefault``) set a library's variable and are no reads.

make-targets.md: every Make target with its ``##`` description, the list ``make help`` prints.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import io
import re
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
    settings: str  # the module whose from_env classmethods read its configuration
    runs_as: str  # what runs it, for the section's first line
    templates: tuple[str, ...] = ()  # files beside the code whose $VARIABLE references are its reads too

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
    ),
    Deployable("Backend", "backend", "backend/settings.py", "the riders' API and page, on Cloud Run"),
    Deployable(
        "Flows",
        "flows",
        "flows/settings.py",
        "the Prefect flows (`flows/serve.py`, `prefect.yaml`) and their Cloud Run jobs (`python -m flows.job`)",
        templates=("prefect.yaml",),
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
        self.helpers: dict[str, bool] = {}  # call() consults it: empty while the helpers themselves are found
        self.helpers = self._helpers()
        self.comments = _comments(source)

    def call(self, node: ast.AST) -> _Call | None:
        """The read ``node`` is, if it is one."""
        if isinstance(node, ast.Call) and node.args:
            func = node.func
            if _is_getter(func) or (isinstance(func, ast.Name) and func.id in self.aliases):
                return _Call(node.args[0], node.args[1] if len(node.args) > 1 else None, False)
            if isinstance(func, ast.Name) and func.id in self.helpers:
                return _Call(node.args[0], None, self.helpers[func.id])
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

    def _helpers(self) -> dict[str, bool]:
        """Module functions that read the variable their first parameter names (``_required(name)``): whether an
        unset one stops them (a ``raise`` under ``if not <what was read>``)."""
        found = {}
        for function in self.tree.body:
            if not (isinstance(function, ast.FunctionDef) and function.args.args):
                continue
            parameter = function.args.args[0].arg
            reads = [
                node
                for node in ast.walk(function)
                if (call := self.call(node)) and isinstance(call.name, ast.Name) and call.name.id == parameter
            ]
            if reads:
                found[function.name] = bool(_required_locals(function) & _assigned_from(function, reads))
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
    found: list[Read] = []

    def visit(node: ast.AST, scope: str, cls: ast.ClassDef | None, helper_parameter: str | None, local: dict) -> None:
        call = module.call(node)
        if call is not None:
            name = call.name
            if isinstance(name, ast.Name) and name.id != helper_parameter:
                name = local.get(name.id, name)  # name = f"PREFIX{...}"; os.environ.get(name)
            if isinstance(name, ast.Constant) and isinstance(name.value, str):
                found.append(Read(name.value, module.path, scope))
            elif (names := _field_names_read(name, cls)) is not None:
                found.extend(Read(each, module.path, scope) for each in names)
            elif not (isinstance(name, ast.Name) and name.id == helper_parameter):  # a helper's: read where it is called
                found.append(Read(None, module.path, scope))
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
    """Every read in the deployables' code and templates, and in the code they share."""
    paths = [
        path for folder in (*(d.package for d in DEPLOYABLES), *SHARED_CODE) for path in sorted((REPO / folder).rglob("*.py"))
    ]
    paths += [REPO / template for d in DEPLOYABLES for template in d.templates]
    return [read for path in paths for read in env_reads(str(path.relative_to(REPO)), path.read_text())]


def deployable_of(path: str) -> Deployable | None:
    """The deployable whose code or template ``path`` is (None: code they share)."""
    return next((d for d in DEPLOYABLES if path in d.templates or path.startswith(f"{d.package}/")), None)


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


def _called_readers(method: ast.FunctionDef, classes: dict[str, ast.ClassDef]) -> list[str]:
    return [
        node.func.value.id
        for node in ast.walk(method)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "from_env"
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id in classes
    ]


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


# --- the configuration page --------------------------------------------------------------------------------------
def deployable_readers(deployable: Deployable) -> list[Reader]:
    source = (REPO / deployable.settings).read_text()
    return readers(deployable.settings, source, vars(importlib.import_module(deployable.settings_module)))


def deployable_templates(deployable: Deployable) -> dict[str, dict[str, str]]:
    return {template: template_variables(template, (REPO / template).read_text()) for template in deployable.templates}


def imported_readers(deployable: Deployable) -> dict[str, list[str]]:
    """Other deployables' settings modules this one's code imports: module -> the files importing it."""
    modules = {d.settings_module for d in DEPLOYABLES if d is not deployable}
    found: dict[str, list[str]] = {}
    for path in sorted((REPO / deployable.package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in modules:
                found.setdefault(node.module, [])
                if (relative := str(path.relative_to(REPO))) not in found[node.module]:
                    found[node.module].append(relative)
    return found


def own_variables() -> dict[str, set[str]]:
    """Per deployable's package: the variables its own tables list (its readers' and its templates')."""
    return {
        d.package: {v.name for r in deployable_readers(d) for v in r.variables}.union(*deployable_templates(d).values())
        for d in DEPLOYABLES
    }


def documented_variables(own: dict[str, set[str]]) -> dict[str, set[str]]:
    """Per deployable's package: its own variables and those of the readers its code imports."""
    by_module = {d.settings_module: d.package for d in DEPLOYABLES}
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
    classes = ", ".join(f"`{r.cls}.from_env`" for r in tables)
    lines = [f"## {deployable.title}", "", f"Read by {classes} in `{deployable.settings}`: {deployable.runs_as}."]
    for module, importers in imported_readers(deployable).items():
        title = next(d.title for d in DEPLOYABLES if d.settings_module == module)
        files = ", ".join(f"`{path}`" for path in importers)
        lines[-1] += f" Its code also reads the variables of {title} (`{module}`, imported by {files})."
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
    """(variable, where, the section listing it) for each read outside the readers' from_env methods: the reading
    deployable's own section first, else the first that lists it."""
    reader_methods = {(d.settings, f"{r.cls}.from_env") for d in DEPLOYABLES for r in deployable_readers(d)}
    rows = {}
    for read in deployable_reads():
        if (read.path, read.function) in reader_methods or read.name is None:
            continue
        reading = deployable_of(read.path)
        candidates = [d for d in DEPLOYABLES if d is reading] + [d for d in DEPLOYABLES if d is not reading]
        listing = next((d.title for d in candidates if read.name in own[d.package]), None)
        section = "Set by a platform" if read.name in PLATFORM_VARIABLES else listing or "none"
        where = f"`{read.path}`" + (f" (`{read.function}`)" if read.function else "")
        rows[(read.name, where)] = (f"`{read.name}`", where, section)
    return sorted(rows.values(), key=lambda row: (row[1], row[0]))


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
        "its settings module. A default is what an unset variable gives (`<repository>`: this repository's folder);",
        '"required": the deployable does not start without it. A meaning is the comment beside the setting in the',
        "code. Variables only a client library reads (MLflow's, Google Cloud's) are theirs to document.",
    ]
    for deployable in DEPLOYABLES:
        lines += ["", *_deployable_section(deployable)]
    lines += [
        "",
        "## Set by a platform",
        "",
        "Variables the code reads that a platform or a tool sets, not the operator.",
        "",
        *_table(
            ("variable", "set by, and why the code reads it"), ((f"`{n}`", _prose(why)) for n, why in PLATFORM_VARIABLES.items())
        ),
        "",
        "## Read outside the readers",
        "",
        "Every other place the deployables' code (and `ride_contract/`, `prefect.yaml`, `MLproject`) reads the",
        "environment, and the table above that lists the variable.",
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


def make_targets_page() -> str:
    rows = ((f"`make {target}`", description) for target, description in make_targets(MAKEFILE.read_text()))
    lines = [
        "# Make targets",
        "",
        f"Generated from the `##` descriptions in the `Makefile` by `{WRITE_COMMAND}`; `make help` prints the",
        "same list, and so does a bare `make`.",
        "",
        *_table(("target", "what it does"), rows),
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
