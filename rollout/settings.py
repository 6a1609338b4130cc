"""The rollout service's configuration: every environment variable it reads, in one place."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields

from ride_contract.ride import MAX_DURATION_MINUTES


@dataclass(frozen=True)
class AnalysisSettings:
    """What a new production version must show on live rides, beside the version serving, before riders get
    it (shadow) and after (bake). Every threshold, in one place; each is read from ROLLOUT_<NAME upper-cased>,
    e.g. ROLLOUT_SHADOW_MIN_RIDES. The defaults pass a retrained model and block a broken one
    (tests/test_analysis.py shows both, on real models and real rides)."""

    # The shadow window: at least this many rides answered by both versions AND min_outcomes of them with
    # their actual duration back (a ride's outcome comes when it ends: 12 min median, up to 60), or its time
    # limit. At the limit with too few rides the version is blocked (no evidence is no pass); with the rides
    # but too few outcomes it is judged on what it has, and says so ("RMSE gate: not applied, ...").
    # 60 min: at 1 ride/s the outcomes gate closes in about 10 min; the limit leaves room for 0.1 ride/s.
    # rollout.reconcile.expected_rollout_minutes gives the times; docs/rollout-controller.md shows them.
    shadow_min_rides: int = 200
    shadow_max_minutes: float = 60.0
    # The bake: the new version answers riders while the old one answers the same rides in shadow,
    # for at least this long and this many rides; a breach meanwhile sends riders back. 30 min: longer
    # than most rides (the RMSE gate can apply on the rides of its first half). A bake that has not
    # gathered bake_min_rides by bake_max_minutes does not pass: riders go back, the version is blocked.
    bake_minutes: float = 30.0
    bake_min_rides: int = 200
    bake_max_minutes: float = 90.0
    # A ride counts once the candidate had this long to answer it too (else it is "unanswered").
    answer_grace_seconds: float = 10.0
    max_missing_rate: float = 0.01  # rides the serving version answered and the candidate did not
    max_extra_dead_letter_rate: float = 0.005  # rides the candidate refused beyond those the serving one refused
    max_extra_clipped_rate: float = 0.02  # answers out of bounds (clipped) beyond the serving version's
    max_p95_answer_ms: float = 200.0  # the function's own time to decode, validate and score a ride
    max_median_abs_diff_minutes: float = 2.0  # median |candidate - serving| on the same rides
    max_abs_mean_diff_minutes: float = 1.5  # |mean (candidate - serving)|: a shift of every answer
    # Where actual durations have come back: the candidate's RMSE may be worse than the serving
    # version's by at most this much at the low end of the paired bootstrap's 95 % interval.
    max_rmse_increase_minutes: float = 0.25
    min_outcomes: int = 100  # outcomes (actual durations) needed before the RMSE gate applies
    bootstrap_samples: int = 2000  # resamples of the paired bootstrap behind the RMSE gate's interval
    # How long the controller keeps a ride's answers for its outcome to come back: the longest ride
    # (60 min) after the shadow's and the bake's windows close. 0: exactly that, from the settings above.
    answer_retention_minutes: float = 0.0
    # A guard on the controller's memory (rollout.analysis.KEPT_RIDE_BYTES a ride: 480 MB at 800k, within
    # its 1 GiB; the whole 150 min default retention up to 89 rides/s, and at 100 rides/s still the last
    # 133 min, twice the longest ride): beyond it the oldest rides go first; those that go before their
    # retention ends are counted and logged.
    max_kept_rides: int = 800_000

    def answer_retention_seconds(self) -> float:
        derived = MAX_DURATION_MINUTES + self.shadow_max_minutes + self.bake_minutes
        return 60.0 * (self.answer_retention_minutes or derived)

    @classmethod
    def from_env(cls) -> AnalysisSettings:
        values = {}
        for item in fields(cls):
            name = f"ROLLOUT_{item.name.upper()}"
            raw = os.environ.get(name)
            if raw:
                try:
                    values[item.name] = int(raw) if item.type == "int" else float(raw)
                except ValueError:
                    raise RuntimeError(
                        f"{name}={raw!r}: expected {'a whole number' if item.type == 'int' else 'a number'}"
                    ) from None
        return cls(**values)


@dataclass(frozen=True)
class RolloutSettings:
    webhook_secret: str  # ROLLOUT_WEBHOOK_SECRET: the secret the MLflow webhook signs with (Secret Manager on GCP)
    # MODEL_NAME: the registered model whose aliases are rolled out; training and the flows name the same model
    # REGISTERED_MODEL_NAME: set both alike.
    model_name: str
    # ROLLOUT_ALIASES: alias=function pairs; production always, and challenger: the shadow deployment,
    # which production's rollouts borrow for their shadow analysis and bake (on Google Cloud, the
    # same function's service: challenger=<the same name>; without it, pre-flight only)
    aliases: dict[str, str]
    tolerance_seconds: float  # WEBHOOK_TOLERANCE_SECONDS: how old a signed call may be
    # ROLLOUT_RETRY_INITIAL_SECONDS: a failed rollout is tried again after this long, then twice as long each time,
    # up to ROLLOUT_RETRY_MAX_SECONDS (the previous deployment serves meanwhile).
    retry_initial_seconds: float
    retry_max_seconds: float
    # ROLLOUT_RESYNC_SECONDS: how often the registry is read without a webhook (a lost delivery is corrected then)
    resync_seconds: float = 60.0
    # MLFLOW_ID_TOKEN_AUDIENCE: the MLflow server's URL when it sits behind Cloud Run IAM (an ID token per call)
    mlflow_audience: str = ""
    analysis: AnalysisSettings = field(default_factory=AnalysisSettings)
    # GCP_PROJECT: the Google Cloud project of the function's service and of the subscriptions below (what the
    # other deployables read as PROJECT_ID).
    project: str = ""
    region: str = ""  # GCP_REGION: where the function's Cloud Run service runs
    # BACKEND_PULL_STREAM / BACKEND_SHADOW_STREAM: where production's and the shadow's revisions publish
    results_topic: str = "backend-pull-stream"
    shadow_results_topic: str = "backend-shadow-stream"
    # Where the controller reads live answers: its own subscriptions on production's result topic and the
    # shadow's (ANALYSIS_RESULT_SUBSCRIPTIONS, comma-separated), and on the dead letters
    # (ANALYSIS_DEADLETTER_SUBSCRIPTION).
    result_subscriptions: tuple[str, ...] = ()
    deadletter_subscription: str = ""
    # Completed rides (ANALYSIS_OUTCOME_SUBSCRIPTION, on the outcomes topic): where actual durations come
    # back within the window, the analysis adds the paired RMSE difference with its interval.
    outcome_subscription: str = ""
    # ROLLOUT_DEPLOY_ATTEMPTS: a version whose deploy fails this many times (or once deterministically: its
    # revision failed readiness) is blocked, the alias back on what serves; other failures are retried.
    deploy_attempts: int = 3
    # The lease that makes exactly one controller act (rollout.lease): ROLLOUT_LEASE_REDIS_URL (on Google
    # Cloud, the backend's Memorystore, its URL with AUTH from Secret Manager), ROLLOUT_LEASE_KEY (a key of
    # its own per deployment or stack), ROLLOUT_LEASE_SECONDS (its time; renewed every third), and
    # ROLLOUT_LEASE_MARGIN_SECONDS (an act needs this much of it left). Without a lease store the controller
    # refuses to start unless ROLLOUT_SINGLE_INSTANCE=true says it is the only one (tests, a one-off run).
    lease_redis_url: str = ""
    lease_key: str = "ridestream:rollout:lease"
    lease_seconds: float = 15.0
    lease_margin_seconds: float = 5.0
    single_instance: bool = False
    # Who may see /status's and /readyz's details (run ids, paths, errors): ROLLOUT_OPERATORS, e-mails whose
    # Google ID token (audience ROLLOUT_OPERATOR_AUDIENCE, the service's URL) is verified; locally a shared
    # ROLLOUT_OPERATOR_TOKEN (a bearer token). Anyone else gets states and version numbers only.
    operators: tuple[str, ...] = ()
    operator_audience: str = ""
    operator_token: str = ""
    # ROLLOUT_STATUS_CACHE_SECONDS: /status and /readyz reuse what they read for this long (each read asks the
    # registry and gcloud: processes on the controller's one CPU).
    status_cache_seconds: float = 5.0

    @classmethod
    def from_env(cls) -> RolloutSettings:
        secret = os.environ.get("ROLLOUT_WEBHOOK_SECRET", "")
        if not secret:
            raise RuntimeError("set ROLLOUT_WEBHOOK_SECRET: the rollout service accepts only signed webhooks")
        pairs = os.environ.get("ROLLOUT_ALIASES", "production=function").split(",")
        aliases = dict(pair.strip().split("=", 1) for pair in pairs if pair.strip())
        return cls(
            webhook_secret=secret,
            model_name=os.environ.get("MODEL_NAME", "ride-duration"),
            aliases=aliases,
            tolerance_seconds=float(os.environ.get("WEBHOOK_TOLERANCE_SECONDS", "300")),
            retry_initial_seconds=float(os.environ.get("ROLLOUT_RETRY_INITIAL_SECONDS", "2")),
            retry_max_seconds=float(os.environ.get("ROLLOUT_RETRY_MAX_SECONDS", "60")),
            resync_seconds=float(os.environ.get("ROLLOUT_RESYNC_SECONDS", "60")),
            mlflow_audience=os.environ.get("MLFLOW_ID_TOKEN_AUDIENCE", ""),
            analysis=AnalysisSettings.from_env(),
            project=os.environ.get("GCP_PROJECT", ""),
            region=os.environ.get("GCP_REGION", "europe-west1"),
            results_topic=os.environ.get("BACKEND_PULL_STREAM", "backend-pull-stream"),
            shadow_results_topic=os.environ.get("BACKEND_SHADOW_STREAM", "backend-shadow-stream"),
            result_subscriptions=tuple(
                s.strip() for s in os.environ.get("ANALYSIS_RESULT_SUBSCRIPTIONS", "").split(",") if s.strip()
            ),
            deadletter_subscription=os.environ.get("ANALYSIS_DEADLETTER_SUBSCRIPTION", ""),
            outcome_subscription=os.environ.get("ANALYSIS_OUTCOME_SUBSCRIPTION", ""),
            deploy_attempts=_whole("ROLLOUT_DEPLOY_ATTEMPTS", 3, least=1),
            lease_redis_url=os.environ.get("ROLLOUT_LEASE_REDIS_URL", ""),
            lease_key=os.environ.get("ROLLOUT_LEASE_KEY", "ridestream:rollout:lease"),
            lease_seconds=float(os.environ.get("ROLLOUT_LEASE_SECONDS", "15")),
            lease_margin_seconds=float(os.environ.get("ROLLOUT_LEASE_MARGIN_SECONDS", "5")),
            single_instance=_flag("ROLLOUT_SINGLE_INSTANCE"),
            operators=tuple(e.strip().lower() for e in os.environ.get("ROLLOUT_OPERATORS", "").split(",") if e.strip()),
            operator_audience=os.environ.get("ROLLOUT_OPERATOR_AUDIENCE", ""),
            operator_token=os.environ.get("ROLLOUT_OPERATOR_TOKEN", ""),
            status_cache_seconds=float(os.environ.get("ROLLOUT_STATUS_CACHE_SECONDS", "5")),
        )


def _whole(name: str, default: int, least: int) -> int:
    raw = os.environ.get(name, "")
    try:
        value = int(raw) if raw else default
    except ValueError:
        raise RuntimeError(f"{name}={raw!r}: expected a whole number") from None
    if value < least:
        raise RuntimeError(f"{name}={raw!r}: expected at least {least}")
    return value


def _flag(name: str) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if raw not in ("", "true", "false", "1", "0"):
        raise RuntimeError(f"{name}={raw!r}: expected true or false")
    return raw in ("true", "1")
