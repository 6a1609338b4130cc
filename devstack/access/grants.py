"""The grants in infra/, what each role lets an identity do, where the local stack's names sit in infra/, and the
comparison of what each identity was seen doing (the access record) with what it is granted, both ways: a use no
grant allows fails, and so does a grant no use needed, unless it is one the local stack cannot exercise
(NOT_EXERCISED, each with the reason).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import hcl2

from devstack import stack as local
from devstack.access.record import Use, read_record

INFRA = Path(__file__).resolve().parent.parent.parent / "infra"

# What each role infra/ grants lets its holder do, in the record's actions (from Google's documented
# permissions of each role: https://cloud.google.com/iam/docs/understanding-roles).
ROLE_ACTIONS: dict[str, frozenset[str]] = {
    "roles/storage.objectViewer": frozenset({"read"}),  # storage.objects.get, .list
    "roles/storage.objectCreator": frozenset({"write"}),  # storage.objects.create: no overwrite, no delete
    "roles/storage.objectUser": frozenset({"read", "write", "update", "delete"}),
    "roles/storage.legacyBucketReader": frozenset({"bucket_get"}),  # storage.buckets.get
    "roles/pubsub.publisher": frozenset({"publish"}),
    "roles/pubsub.subscriber": frozenset({"consume", "attach"}),  # .subscriptions.consume, .topics.attachSubscription
    "roles/pubsub.viewer": frozenset({"view"}),
    "roles/secretmanager.secretAccessor": frozenset({"access"}),
    "roles/run.developer": frozenset({"deploy"}),  # revisions and traffic of the service it is granted on
    "roles/iam.serviceAccountUser": frozenset({"act_as"}),  # a revision deployed runs as that account
    "roles/run.invoker": frozenset({"invoke"}),
    "roles/run.viewer": frozenset({"list_revisions"}),  # run.revisions.list (and reading every Cloud Run resource)
    "roles/cloudsql.client": frozenset({"connect"}),
}
# The narrowest role that allows an action: what a report suggests for a use no grant allows.
NARROWEST_ROLE: dict[str, str] = {
    "read": "roles/storage.objectViewer",
    "write": "roles/storage.objectCreator",
    "update": "roles/storage.objectUser",
    "delete": "roles/storage.objectUser",
    "bucket_get": "roles/storage.legacyBucketReader",
    "bucket_admin": "roles/storage.admin",
    "bucket_list": "roles/storage.admin",
    "bucket_create": "roles/storage.admin",
    "publish": "roles/pubsub.publisher",
    "consume": "roles/pubsub.subscriber",
    "attach": "roles/pubsub.subscriber",
    "view": "roles/pubsub.viewer",
    "admin": "roles/pubsub.editor",
    "access": "roles/secretmanager.secretAccessor",
    "deploy": "roles/run.developer",
    "act_as": "roles/iam.serviceAccountUser",
}

# The local stack's names -> infra/'s resources ("<kind>:<Terraform name>[key]"). None: a local-only resource
# for people and tests, which no deployable may use.
_TOPICS = {"push": "push", "pull": "pull", "dead": "deadletter", "shadow": "shadow", "outcomes": "outcomes"}
_SUBSCRIPTIONS = {
    "push": "function_push",
    "pull": "backend_results",
    "dead": "deadletter_inspect",
    "dead_watch": None,
    "shadow": "function_shadow_push",
    "shadow_results": None,
    "shadow_backend": "backend_shadow_answers",
    "outcomes_sink": "outcomes_to_storage",
    "analysis_pull": 'rollout_analysis["pull"]',
    "analysis_shadow": 'rollout_analysis["shadow"]',
    "analysis_dead": 'rollout_analysis["deadletter"]',
    "analysis_outcomes": 'rollout_analysis["outcomes"]',
}
# The stack's own secrets (Stack.secrets()) and the Secret Manager secrets that hold them in infra/.
_SECRETS = {"rollout_webhook_secret": "rollout-webhook-secret", "mlflow_webhook_encryption_key": "mlflow-webhook-key"}
LOCAL_TO_INFRA: dict[str, str | None] = {
    f"bucket:{local.BUCKET}": "bucket:models",
    f"bucket:{local.OUTCOMES_BUCKET}": "bucket:outcomes",
    **{f"topic:{local.TOPICS[key]}": f"topic:{name}" for key, name in _TOPICS.items()},
    **{f"subscription:{local.SUBSCRIPTIONS[key]}": name and f"subscription:{name}" for key, name in _SUBSCRIPTIONS.items()},
    **{f"secret:{key}": f'secret:app["{name}"]' for key, name in _SECRETS.items()},
    # Production and the challenger are revisions of the function's one Cloud Run service.
    **{f"service:{key}": "run_service:predict" for key in local.FUNCTIONS},
}


@dataclass(frozen=True, order=True)
class Grant:
    identity: str  # "rollout" for google_service_account.rollout; "pubsub_agent", "var.mlflow_users", "allUsers", ...
    resource: str  # "bucket:models", "topic:pull", 'subscription:rollout_analysis["pull"]', "run_service:predict", ...
    role: str
    address: str  # the grant in infra/: "google_storage_bucket_iam_member.function_reads_models"

    @property
    def actions(self) -> frozenset[str]:
        return ROLE_ACTIONS.get(self.role, frozenset())


@dataclass(frozen=True, order=True)
class NotExercised:
    """A grant the local stack cannot exercise, and why."""

    identity: str
    resource: str
    role: str
    why: str = field(compare=False, default="")

    def covers(self, grant: Grant) -> bool:
        return (self.identity, self.resource, self.role) == (grant.identity, grant.resource, grant.role)


_LOCAL_INVOKE = "the local stack's HTTP calls carry no Google identity token"
NOT_EXERCISED: tuple[NotExercised, ...] = (
    NotExercised("pusher", "run_service:predict", "roles/run.invoker", "the emulator pushes without an OIDC token"),
    NotExercised("var.backend_invokers", "run_service:backend", "roles/run.invoker", _LOCAL_INVOKE),
    NotExercised("var.mlflow_users", "run_service:mlflow", "roles/run.invoker", _LOCAL_INVOKE),
    NotExercised("training", "run_service:mlflow", "roles/run.invoker", _LOCAL_INVOKE),
    NotExercised("rollout", "run_service:mlflow", "roles/run.invoker", _LOCAL_INVOKE),
    NotExercised(
        "backend",
        'secret:app["redis-url"]',
        "roles/secretmanager.secretAccessor",
        "the local stack hands the backend its Redis URL in the environment; the local Redis takes no AUTH string",
    ),
    NotExercised(
        "rollout",
        'secret:app["redis-url"]',
        "roles/secretmanager.secretAccessor",
        "the local stack hands the controller the Redis URL of its lease in the environment; the local Redis takes no AUTH string",
    ),
    NotExercised(
        "rollout",
        "project",
        "roles/run.viewer",
        "no Cloud Run locally: the controller lists the local functions' deployments, not revisions",
    ),
    NotExercised(
        "var.build_service_account",
        "bucket:function_source",
        "roles/storage.objectViewer",
        "no Cloud Build locally: the function runs from its folder, never built from the source zip",
    ),
    NotExercised(
        "mlflow",
        "project",
        "roles/cloudsql.client",
        "the local MLflow reaches PostgreSQL over loopback, not through the Cloud SQL connector",
    ),
    NotExercised(
        "mlflow", 'secret:app["mlflow-db-password"]', "roles/secretmanager.secretAccessor", "the local database takes no password"
    ),
    # Pub/Sub's service agent: the emulator dead-letters and delivers by itself, as nobody.
    NotExercised("pubsub_agent", "topic:deadletter", "roles/pubsub.publisher", "the emulator dead-letters as no identity"),
    NotExercised(
        "pubsub_agent", "subscription:function_push", "roles/pubsub.subscriber", "the emulator dead-letters as no identity"
    ),
    NotExercised(
        "pubsub_agent",
        "bucket:outcomes",
        "roles/storage.legacyBucketReader",
        "Pub/Sub checks the bucket when the Cloud Storage subscription is created; the local stand-in does not",
    ),
    NotExercised(
        "google_logging_project_sink.predictions",
        "bucket:prediction_logs",
        "roles/storage.objectCreator",
        "no Cloud Logging locally: the function's prediction lines go to its log file",
    ),
    # The flows as Cloud Run jobs (infra/flows.tf): locally they are started by hand or by flows.serve, as the
    # developer, and read the stack's files, not buckets.
    NotExercised(
        "training",
        "bucket:prediction_logs",
        "roles/storage.objectViewer",
        "no Cloud Logging sink locally: the monitoring flow reads the function's log file",
    ),
    *(
        NotExercised(
            "scheduler", f'run_job:flows["{job}"]', "roles/run.invoker", "no Cloud Scheduler locally: nothing starts jobs"
        )
        for job in ("training", "monitoring", "live_quality")
    ),
)


# --- infra/ ---------------------------------------------------------------------------------------------------


def clean_hcl(value):
    """python-hcl2 keeps HCL's quotes around keys and strings; drop them."""
    if isinstance(value, dict):
        return {
            clean_hcl(k): clean_hcl(v)
            for k, v in value.items()
            if k not in ("__is_block__", "__comments__", "__inline_comments__")
        }
    if isinstance(value, list):
        return [clean_hcl(v) for v in value]
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def load_resources(infra: Path = INFRA) -> dict[str, dict[str, dict]]:
    """Every resource in ``infra/*.tf``: kind -> name -> body (quotes taken off)."""
    found: dict[str, dict[str, dict]] = defaultdict(dict)
    for path in sorted(infra.glob("*.tf")):
        with open(path) as f:
            for block in clean_hcl(hcl2.load(f)).get("resource", []):
                for kind, named in block.items():
                    found[kind].update(named)
    return found


# Terraform resource kinds -> the kind of resource a grant sits on.
_KINDS = {
    "google_storage_bucket": "bucket",
    "google_pubsub_topic": "topic",
    "google_pubsub_subscription": "subscription",
    "google_secret_manager_secret": "secret",
    "google_cloudfunctions2_function": "run_service",  # its Cloud Run service (service_config[0].service)
    "google_cloud_run_v2_service": "run_service",
    "google_cloud_run_v2_job": "run_job",
    "google_service_account": "service_account",
}
_REFERENCE = re.compile(r"\b(google_\w+)\.(\w+)(\[\"[^\"]+\"\])?")
_TARGET_ARGUMENTS = ("bucket", "topic", "subscription", "secret_id", "service_account_id", "name")


def _identity(member: str, for_each: str) -> str:
    account = re.search(r"google_service_account\.(\w+)\.email", member)
    if account:
        return account[1]
    if member == "${each.value}":  # one grant per member of a variable: the variable names them
        return re.search(r"var\.\w+", for_each)[0]
    given = re.fullmatch(r"serviceAccount:\$\{(var\.\w+)\}", member)  # an account made elsewhere (infra/bootstrap)
    if given:
        return given[1]
    reference = re.fullmatch(r"\$\{(?:local\.)?([\w.]+?)(?:\.writer_identity)?\}", member)
    return reference[1] if reference else member


def _targets(body: dict, resources: dict[str, dict[str, dict]]) -> list[tuple[str, str]]:
    """The resources one grant sits on, each with the grant's own for_each key ("" for a single grant): one, or
    one per key of the resources its for_each runs over."""
    if "project" in body:
        return [("project", "")]
    target = next(body[argument] for argument in _TARGET_ARGUMENTS if argument in body)
    if target.startswith("${each.value"):
        kind, name, _ = _REFERENCE.search(body["for_each"]).groups()
        keys = [f'["{key}"]' for key in sorted(resources[kind][name]["for_each"])]
        return [(f"{_KINDS[kind]}:{name}{key}", key) for key in keys]
    kind, name, key = _REFERENCE.search(target).groups()
    return [(f"{_KINDS[kind]}:{name}{key or ''}", "")]


def parse_grants(infra: Path = INFRA) -> list[Grant]:
    """Every ``*_iam_member`` in infra/ as (identity, resource, role, address), for_each grants expanded."""
    resources = load_resources(infra)
    grants = []
    for kind, named in resources.items():
        if not kind.endswith("_iam_member"):
            continue
        for name, body in named.items():
            identity = _identity(body["member"], str(body.get("for_each", "")))
            for resource, key in _targets(body, resources):
                grants.append(Grant(identity, resource, body["role"], f"{kind}.{name}{key}"))
    return sorted(grants)


def runs_as(infra: Path = INFRA) -> dict[str, str]:
    """Cloud Run service -> the service account its revisions run as: deploying one acts as that account."""
    resources = load_resources(infra)
    accounts = {}
    for name, body in resources.get("google_cloudfunctions2_function", {}).items():
        accounts[f"run_service:{name}"] = body["service_config"][0]["service_account_email"]
    for name, body in resources.get("google_cloud_run_v2_service", {}).items():
        accounts[f"run_service:{name}"] = body["template"][0].get("service_account", "")
    return {
        service: f"service_account:{account[1]}"
        for service, email in accounts.items()
        if (account := re.search(r"google_service_account\.(\w+)\.email", email))
    }


# --- the comparison ---------------------------------------------------------------------------------------------


def in_infra(
    uses: Iterable[Use], names: dict[str, str | None] = LOCAL_TO_INFRA, accounts: dict[str, str] | None = None
) -> set[Use]:
    """The uses with infra/'s resource names (a name the table does not know stays as it is, and so matches no
    grant), and what a deploy implies: acting as the account the service runs as."""
    accounts = runs_as() if accounts is None else accounts
    translated = set()
    for use in uses:
        resource = names.get(use.resource, use.resource) or f"local-only:{use.resource}"
        translated.add(Use(use.identity, use.service, resource, use.action))
        if use.action == "deploy" and resource in accounts:
            translated.add(Use(use.identity, "iam", accounts[resource], "act_as"))
    return translated


@dataclass(frozen=True)
class Report:
    not_granted: list[tuple[Use, str | None]]  # a use (infra's names) no grant allows, and the role that would
    unused: list[Grant]  # a grant none of whose actions was used, and which the local stack can exercise
    stale: list[NotExercised]  # an entry of the not-exercised list that matches no grant any more
    narrower: list[tuple[Grant, str]]  # a grant used only in part, and a narrower role that allows what was used
    granted_uses: dict[Grant, list[Use]]  # what each grant was seen allowing

    @property
    def ok(self) -> bool:
        return not (self.not_granted or self.unused or self.stale)

    def lines(self) -> list[str]:
        found = [
            f"not granted: {u.identity} {u.action} on {u.resource} (needs {role or 'no role of infra/'})"
            for u, role in self.not_granted
        ]
        found += [f"unused grant: {g.identity} has {g.role} on {g.resource} ({g.address})" for g in self.unused]
        found += [f"stale not-exercised entry: {n.identity} {n.role} on {n.resource}" for n in self.stale]
        return found

    def notes(self) -> list[str]:
        """What passes but is worth a look: a role broader than what its holder was seen doing."""
        return [
            f"narrower would do: {g.identity} {g.role} on {g.resource} -> {role}"
            + (f" ({NARROWER_CAVEATS[role]})" if role in NARROWER_CAVEATS else "")
            for g, role in self.narrower
        ]


# What the record cannot tell about a narrower role: an upload over an existing object looks like any other
# write here, and objectCreator cannot overwrite (storage.objects.delete is needed).
NARROWER_CAVEATS = {"roles/storage.objectCreator": "if it never overwrites an object: not told apart here"}


def _narrower_role(grant: Grant, used: set[str]) -> str | None:
    """The role with the fewest actions that still allows ``used`` and fewer than ``grant``'s, if there is one."""
    fitting = [(len(actions), role) for role, actions in ROLE_ACTIONS.items() if used <= actions < grant.actions]
    return min(fitting)[1] if fitting else None


def _allows(grant: Grant, use: Use) -> bool:
    return grant.identity == use.identity and grant.resource == use.resource and use.action in grant.actions


def compare(
    record: Iterable[Use],
    grants: Iterable[Grant],
    not_exercised: Iterable[NotExercised] = NOT_EXERCISED,
) -> Report:
    """``record`` with infra/'s names (in_infra) against ``grants``: what no grant allows, what no use needed."""
    grants, not_exercised, uses = sorted(grants), sorted(not_exercised), sorted(record)
    granted_uses = {grant: [use for use in uses if _allows(grant, use)] for grant in grants}
    refused = [use for use in uses if not any(_allows(g, use) for g in grants)]
    not_granted = [(use, NARROWEST_ROLE.get(use.action)) for use in refused]
    unused = [g for g in grants if not granted_uses[g] and not any(n.covers(g) for n in not_exercised)]
    stale = [n for n in not_exercised if not any(n.covers(g) for g in grants)]
    narrower = [
        (grant, role)
        for grant, used in granted_uses.items()
        if used and (role := _narrower_role(grant, {use.action for use in used}))
    ]
    return Report(not_granted, unused, stale, narrower, granted_uses)


# --- docs/identities.md -----------------------------------------------------------------------------------------

DOCS_PAGE = INFRA.parent / "docs" / "identities.md"
DOCS_RECORD = DOCS_PAGE.with_suffix(".record.jsonl")  # the record the page shows, kept beside it
_HEADER = """# Identities: what each may do, and what it was seen doing

Generated by `python -m devstack.access.report --record <a stack's record> --write-docs` from the grants in
`infra/*.tf` and the access record of a local stack run, kept beside this page (`identities.record.jsonl`;
every deployable reaches the emulators through a recording proxy of its own: `devstack/access/`); do not edit
by hand. A use no grant allows, or a grant no use needed (unless the local stack cannot exercise it,
as said in the table), fails the comparison.

| identity | may | seen doing | the grant in infra/ |
| --- | --- | --- | --- |
"""


def _seen(grant: Grant, report: Report, not_exercised: Iterable[NotExercised], recorded: bool) -> str:
    uses = report.granted_uses.get(grant, [])
    if uses:
        narrower = dict(report.narrower).get(grant)
        seen = ", ".join(sorted({use.action for use in uses}))
        if not narrower:
            return seen
        caveat = f", {NARROWER_CAVEATS[narrower]}" if narrower in NARROWER_CAVEATS else ""
        return f"{seen} ({narrower.removeprefix('roles/')} would do{caveat})"
    reason = next((n.why for n in not_exercised if n.covers(grant)), None)
    if reason is not None:
        return f"not exercisable locally: {reason}"
    return "**nothing** (unused)" if recorded else "(no record yet)"


def render(report: Report, not_exercised: Iterable[NotExercised] = NOT_EXERCISED, recorded: bool = True) -> str:
    """docs/identities.md: one row per grant, sorted; then what was used without a grant. ``recorded``: False when
    there is no record of a stack run to show yet."""
    not_exercised = list(not_exercised)
    rows = [
        f"| {g.identity} | {g.role.removeprefix('roles/')} on `{g.resource}` | {_seen(g, report, not_exercised, recorded)} | `{g.address}` |"
        for g in sorted(report.granted_uses)
    ]
    rows += [
        f"| {u.identity} | **no grant** | {u.action} on `{u.resource}` (needs {role}) | — |" for u, role in report.not_granted
    ]
    return _HEADER + "\n".join(rows) + "\n"


def docs_page() -> str:
    """docs/identities.md as infra/ and the record kept beside it make it."""
    report = compare(in_infra(read_record(DOCS_RECORD)), parse_grants(), NOT_EXERCISED)
    return render(report, NOT_EXERCISED, recorded=DOCS_RECORD.exists())
