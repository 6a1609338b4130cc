"""What a registered version says about itself in the MLflow UI: a markdown description and tags.

The numbers behind the promotion decision, written where the decision is made (the
registry's version page and table), and published as the training flow's Prefect artifact.
"""

from __future__ import annotations

from typing import Any

PLOTS = ("val_predictions.png", "test_predictions.png")


def plot_links(tracking_uri: str, experiment_id: str, run_id: str) -> dict[str, str]:
    """Where each plot of the run is seen: the MLflow UI when there is one, else the artifact's runs:/ URI."""
    if tracking_uri.startswith(("http://", "https://")):
        base = f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}/artifacts/plots"
        return {plot: f"{base}/{plot}" for plot in PLOTS}
    return {plot: f"runs:/{run_id}/plots/{plot}" for plot in PLOTS}


def version_story(
    version: str, months: dict[str, list[str]], metrics: dict[str, float], decision: Any, links: dict[str, str]
) -> tuple[str, dict[str, str]]:
    """(markdown description, tags) of a registered version; ``decision`` is the training flow's Decision."""

    def rmse(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    production = f"v{decision.production_version}" if decision.production_version else "none yet"
    rows = [
        ("validation RMSE", rmse(metrics.get("val_rmse")), ", ".join(months["val"])),
        ("test RMSE", rmse(metrics.get("test_rmse")), ", ".join(months["test"])),
        ("baseline test RMSE (LinearRegression)", rmse(metrics.get("baseline_test_rmse")), ", ".join(months["test"])),
        (
            "coarse estimator test RMSE (the backend's instant answer)",
            rmse(metrics.get("coarse_test_rmse")),
            ", ".join(months["test"]),
        ),
        (
            f"production ({production}) test RMSE, same rides, at evaluation",
            rmse(decision.production_rmse),
            ", ".join(months["test"]),
        ),
    ]
    verdict = "promoted to **production**" if decision.promoted else f"kept as **{decision.alias}**"
    lines = [
        f"### v{version}: {verdict}",
        "",
        f"{decision.reason}.",
        "",
        f"Trained on {', '.join(months['train'])}.",
        "",
        "| measure | minutes | month |",
        "| --- | --- | --- |",
        *[f"| {name} | {value} | {month} |" for name, value, month in rows],
        "",
        "Plots: " + ", ".join(f"[{name.removesuffix('.png').replace('_', ' ')}]({url})" for name, url in links.items()),
    ]
    tags = {
        "train_months": ",".join(months["train"]),
        "test_months": ",".join(months["test"]),
        "val_rmse": rmse(metrics.get("val_rmse")),
        "test_rmse": rmse(metrics.get("test_rmse")),
        "baseline_test_rmse": rmse(metrics.get("baseline_test_rmse")),
        "coarse_test_rmse": rmse(metrics.get("coarse_test_rmse")),
        "candidate_test_rmse_at_evaluation": rmse(decision.candidate_rmse),
        "production_version_at_evaluation": decision.production_version or "none",
        "production_test_rmse_at_evaluation": rmse(decision.production_rmse),
        "decision": "promoted" if decision.promoted else decision.alias,
        "decision_reason": decision.reason,
    }
    return "\n".join(lines), tags
