"""A rollout's story on the version's page, kept within MLflow's columns (issue 31).

MLflow stores a version's description as VARCHAR(5000) on PostgreSQL (Cloud SQL; sqlite does not enforce
it): a page that grew by a paragraph per phase failed every write past 5,000 characters, and the controller
looped. So each event is a version tag of its own (``rollout.history.0001`` onwards: the full history, in
order; no run artifact, which would need the controller to write to the models bucket), and the
description holds the page as others wrote it (the training flow's story, the challenger's verdict), then
the latest state and the last few events between two markers, always within ``DESCRIPTION_LIMIT``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

DESCRIPTION_LIMIT = 4000  # characters of the page; the column holds 5,000, the rest is room for other writers
EVENT_LIMIT = 4000  # characters of one event's tag
RECENT_EVENTS = 3  # events shown on the page; all of them are in the tags
HISTORY_PREFIX = "rollout.history."
# Link definitions to nothing: markdown's comments, which no renderer shows (HTML comments may be escaped).
BEGIN, END = "[//]: # (rollout begins)", "[//]: # (rollout ends)"
_SECTION = re.compile(rf"\s*{re.escape(BEGIN)}.*?{re.escape(END)}", re.S)


def history_key(number: int) -> str:
    """The tag of the ``number``-th event (from 1)."""
    return f"{HISTORY_PREFIX}{number:04d}"


def history(tags: Mapping[str, str]) -> list[str]:
    """Every event the tags hold, in the order they were told."""
    keys = [key for key in tags if key.startswith(HISTORY_PREFIX) and key[len(HISTORY_PREFIX) :].isdigit()]
    return [tags[key] for key in sorted(keys, key=lambda key: int(key[len(HISTORY_PREFIX) :]))]


def clipped(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def page_of_others(description: str) -> str:
    """The page without the rollout's section: what the training flow and the challenger flow wrote."""
    return _SECTION.sub("", description).strip()


def bounded_description(
    others: str, events: list[str], state: Mapping[str, str], limit: int = DESCRIPTION_LIMIT, recent: int = RECENT_EVENTS
) -> str:
    """The page: ``others`` (at most half of it), then the rollout's state and its last ``recent`` events, as many
    as fit; never longer than ``limit``."""
    others = clipped(others, limit // 2)
    room = limit - len(others) - len(BEGIN) - len(END) - 8
    status = f"{state.get('rollout_status', '-')} (phase {state.get('rollout_phase', '-')})"
    shown = events[-recent:]
    while True:
        heading = (
            f"#### Rollout: {status}\n\nThe last {len(shown)} of {len(events)} events; "
            f"all of them in the tags {history_key(1)} to {history_key(len(events))}."
        )
        section = "\n\n".join([heading, *shown])
        if len(section) <= room or len(shown) <= 1:
            break
        shown = shown[1:]  # the oldest shown gives way
    # Blank lines around the markers: a link definition cannot interrupt a paragraph.
    return f"{others}\n\n{BEGIN}\n\n{clipped(section, room)}\n\n{END}".strip()
