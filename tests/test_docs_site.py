"""The documentation: the site (mkdocs.yml, docs/) and the README, which GitHub shows and mkdocs does not build.

`mkdocs build --strict` fails on a broken link, a link to an anchor no page has, a page left out of the nav
and a link into the repository outside docs/ (mkdocs.yml's `validation`), so a broken page fails `make test`.
The README is held to the same here, against the site that build made: every relative link names a file
that exists, and every anchor into a page is one the built page has."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MKDOCS = REPO / ".venv/tools/docs/bin/mkdocs"
# A Markdown link's or an <img>'s target, relative to the README: not a web address, not an anchor of its own.
RELATIVE_TARGET = re.compile(r"\]\((?!https?:|mailto:|#)([^)\s]+)\)|<img src=\"(?!https?:)([^\"]+)\"")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    assert MKDOCS.exists(), (
        f"{MKDOCS.relative_to(REPO)} is missing: `make test` (or `make docs`) installs the documentation site's builder"
    )
    site_dir = tmp_path_factory.mktemp("site")
    # NO_MKDOCS_2_WARNING: Material's notice of its end of life (May 2027), printed at every build, is not a
    # warning of the build's; without it the output on a failure is the warnings alone.
    built = subprocess.run(
        [str(MKDOCS), "build", "--strict", "--site-dir", str(site_dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert built.returncode == 0, f"mkdocs build --strict failed:\n{built.stdout}{built.stderr}"
    return site_dir


def test_the_site_builds_with_no_warning_and_has_every_page(site):
    pages = sorted(path.relative_to(REPO / "docs") for path in (REPO / "docs").rglob("*.md"))
    assert pages
    for page in pages:
        built = site / page.with_suffix(".html")  # mkdocs.yml: use_directory_urls false
        assert built.exists(), f"docs/{page} was not built into {built.relative_to(site)}"


def test_every_relative_link_of_the_readme_leads_somewhere(site):
    readme = (REPO / "README.md").read_text()
    targets = [link or image for link, image in RELATIVE_TARGET.findall(readme)]
    assert any(target.startswith("docs/") for target in targets)
    broken = []
    for target in targets:
        path, _, anchor = target.partition("#")
        if not (REPO / path).exists():
            broken.append(f"{target}: no file {path}")
        elif anchor:
            assert path.startswith("docs/") and path.endswith(".md"), f"{target}: an anchor into a file that is no page"
            page = Path(path).relative_to("docs")
            html = site / page.with_suffix(".html")
            if f'id="{anchor}"' not in html.read_text():
                broken.append(f"{target}: the page has no anchor #{anchor}")
    assert not broken, "\n".join(broken)


def _section(text: str, heading: str) -> str:
    """A `## heading` section's text, up to the next `## `."""
    start = text.index(f"\n## {heading}\n")
    return text[start : text.index("\n## ", start + 1)]


@pytest.mark.parametrize("heading", ["Status", "Words used here"])
def test_the_site_home_says_what_the_readme_says(heading):
    # The README and the site's home page both open with what is verified where and with the words used
    # everywhere else: one text, so neither drifts.
    readme, home = (REPO / "README.md").read_text(), (REPO / "docs/index.md").read_text()
    assert _section(readme, heading) == _section(home, heading)


def test_the_site_home_draws_the_readmes_architecture():
    # One diagram of the system: the README's and the home page's mermaid blocks are the same text.
    readme, home = (REPO / "README.md").read_text(), (REPO / "docs/index.md").read_text()
    diagrams = [re.findall(r"```mermaid\n.*?```", text, re.S) for text in (readme, home)]
    assert diagrams[0] and diagrams[0] == diagrams[1]


def test_the_readmes_google_cloud_section_is_whole():
    # Issue 32: the one command, its cost at rest, the roles it needs, what success looks like, rollback, teardown.
    from operations.gcp import DEPLOYER_ROLES

    section = " ".join(_section((REPO / "README.md").read_text(), "Google Cloud").split())
    for needed in ("make gcp-up PROJECT=", "**At rest**", "**When it works**", "make gcp-rollback", "make gcp-down"):
        assert needed in section, needed
    roles = re.search(r"\*\*Your roles\*\* \(.*?\): (.*?)\.", section)
    assert roles and len(roles.group(1).split(", ")) == len(DEPLOYER_ROLES), roles
