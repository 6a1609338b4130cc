"""A version's rollout story on MLflow's PostgreSQL store, Cloud SQL's engine (issue 31): there the description
is VARCHAR(5000), and a page that grew by a paragraph per phase failed every write past it. Twenty rollouts
of one version, written by the controller's own code (rollout.reconcile through rollout.app.RegistryStory):
every write succeeds, the page stays bounded and keeps the training flow's story, the full history reads
back in order from the version's tags."""

from __future__ import annotations

import uuid

import pytest
from test_guarded_rollout import FAST, Deployed, LiveStream, _passed, retrained, served, shuffled

from rollout.app import RegistryStory
from rollout.reconcile import Deployment, Guard, Rollout, ShadowSlot
from rollout.story import DESCRIPTION_LIMIT, EVENT_LIMIT, bounded_description, page_of_others

pytestmark = pytest.mark.integration
MODEL = "ride-duration-story"
TRAINING_STORY = "### v2: kept as **challenger**\n\nIts validation RMSE beat production's on the same rides."


@pytest.fixture
def postgres_tracking_uri(monkeypatch, tmp_path):
    """MLflow's tracking and registry store in a PostgreSQL database of the test's own (as the stack makes them:
    MLflow's schema from the migrated template), dropped afterwards."""
    from devstack.stack import create_database, drop_database

    database = f"ridestream_test_{uuid.uuid4().hex[:8]}"
    uri = create_database(database)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # where MLflow puts a run's artifacts by default
    try:
        yield uri
    finally:
        drop_database(database)  # WITH (FORCE): MLflow's pooled connections are ended with it


def _two_versions(client) -> dict[str, Deployment]:
    experiment = client.create_experiment("story")
    client.create_registered_model(MODEL)
    versions = {}
    for _ in range(2):
        run = client.create_run(experiment)
        version = client.create_model_version(MODEL, f"runs:/{run.info.run_id}/model", run.info.run_id).version
        versions[str(version)] = Deployment(str(version), run.info.run_id)
    return versions


def test_twenty_rollouts_of_a_version_keep_its_page_within_postgresqls_column_and_its_history_whole(postgres_tracking_uri):
    from mlflow import MlflowClient

    client = MlflowClient(postgres_tracking_uri)
    versions = _two_versions(client)
    client.update_model_version(MODEL, "2", description=TRAINING_STORY)  # what the training flow wrote
    client.set_registered_model_alias(MODEL, "production", "1")
    story = RegistryStory(MODEL)

    def resolve(alias: str) -> Deployment | None:
        return versions[str(client.get_model_version_by_alias(MODEL, alias).version)]

    target, shadow = Deployed(versions["1"]), Deployed()
    answers = {"1": served, "2": shuffled}
    guard = Guard(shadow, LiveStream(target, shadow, answers), FAST, ShadowSlot())
    rollout = Rollout("production", resolve, target, preflight=lambda model: _passed(), story=story, guard=guard)

    pages = []  # the version's page after each rollout
    for attempt in range(1, 21):
        # 19 times blocked in shadow and retried as docs/rollout.md says (its rollout_status tag deleted, promoted
        # again), then it passes: pre-flight, shadow, bake and the switch, each phase's events.
        answers["2"] = retrained if attempt == 20 else shuffled
        client.set_registered_model_alias(MODEL, "production", "2")
        message = rollout.reconcile()
        assert ("v2 serving after" if attempt == 20 else "v2 blocked at shadow analysis") in message, (attempt, message)
        pages.append(client.get_model_version(MODEL, "2").description)
        if attempt < 20:
            client.delete_model_version_tag(MODEL, "2", "rollout_status")

    assert max(len(page) for page in pages) <= DESCRIPTION_LIMIT
    assert all(page.startswith(TRAINING_STORY) for page in pages)
    history = story.history("2")
    kinds = [event.split("**")[1].split(" (")[0] for event in history]
    blocked = ["Pre-flight passed", "Rollout to production blocked at shadow analysis"]
    passed = ["Pre-flight passed", "Shadow analysis passed", "Bake passed", "Rolled out to production"]
    assert kinds == blocked * 19 + passed
    assert all(len(event) <= EVENT_LIMIT for event in history)
    assert sum(len(event) for event in history) > 5000  # the whole story would not fit the column
    page = client.get_model_version(MODEL, "2").description
    assert history[-1] in page and "serving production" in page  # the latest state and the last events
    assert client.get_model_version(MODEL, "2").tags["rollout_status"] == "serving production"


@pytest.mark.parametrize(
    ("others", "events"),
    [
        ("", ["**Pre-flight passed** (now): fine."]),
        (TRAINING_STORY, [f"**Bake passed** ({i}): " + "figures " * 200 for i in range(50)]),
        ("x" * 20_000, ["y" * 20_000]),  # a page and an event each far beyond the column
    ],
)
def test_the_page_is_bounded_whatever_it_is_given_and_gives_the_others_text_back(others, events):
    page = bounded_description(others, events, {"rollout_status": "blocked", "rollout_phase": "bake"})
    assert len(page) <= DESCRIPTION_LIMIT and events[-1][:100] in page and "blocked (phase bake)" in page
    kept = page_of_others(page)  # what the training and challenger flows wrote (clipped only if beyond half the page)
    assert kept == others if len(others) < DESCRIPTION_LIMIT // 2 else kept.startswith(others[:1000])
    verdict = "The challenger flow's verdict."  # appended after the section by another writer: kept as theirs
    assert page_of_others(f"{page}\n\n{verdict}") == f"{kept}\n\n{verdict}".strip()
