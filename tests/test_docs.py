"""The README is the front door and the manual lives under docs/: both stay navigable and current."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from .conftest import REPO

MANUAL = [
    "installation", "configuration", "identity", "trust", "sensors", "spool", "hardware", "operations",
    "security",
]  # fmt: skip
DOCS = sorted((REPO / "docs").glob("*.md"))
LINK = re.compile(r"\]\(([^)#\s]+)(#[^)]*)?\)")


def test_the_readme_is_a_front_door() -> None:
    readme = REPO / "README.md"
    assert readme.stat().st_size < 12 * 1024, f"README is {readme.stat().st_size} bytes: move detail to docs/"
    text = readme.read_text()
    for heading in (
        "## Two commands",
        "## Installing on a gateway",
        "## A first sensor",
        "## Where to read on",
    ):
        assert heading in text
    for name in MANUAL:
        assert f"(docs/{name}.md)" in text, f"the README does not lead to docs/{name}.md"


@pytest.mark.parametrize("path", [REPO / "README.md", *DOCS], ids=lambda p: p.name)
def test_relative_links_resolve(path: Path) -> None:
    for target, _anchor in LINK.findall(path.read_text()):
        if "://" in target or target.startswith("mailto:"):
            continue
        assert (path.parent / target).exists(), f"{path.name} links to {target}, which does not exist"


def test_every_manual_page_is_packaged() -> None:
    packaged = set((REPO / "debian" / "gatewayd.docs").read_text().split())
    for name in MANUAL:
        assert f"docs/{name}.md" in packaged, f"docs/{name}.md is not installed by the package"


def test_no_pointer_to_a_readme_section_is_left() -> None:
    """Sections moved to docs/: a reference to `README, "Section"` would send the reader nowhere."""
    stale = re.compile(r"README,? \"")
    for path in [
        *REPO.glob("gatewayd/**/*.py"),
        REPO / "config" / "gatewayd.toml",
        *DOCS,
        *REPO.glob("debian/*"),
    ]:
        if path.is_file():
            assert not stale.search(path.read_text(errors="replace")), f"{path}: points to a README section"


SECTION_REF = re.compile(r"docs/([a-z]+\.md),? \(?\"([^\"]+)\"")


def test_pointers_to_a_section_of_the_manual_name_one_that_exists() -> None:
    """`docs/identity.md, "Renewal"` in a docstring, the reference config or the man page: the page has a
    heading (or a bold run-in title) of that name."""
    sources = [*REPO.glob("gatewayd/**/*.py"), REPO / "config" / "gatewayd.toml", *DOCS, REPO / "README.md"]
    found = 0
    for path in sources:
        text = re.sub(r"\s*\n\s*(#\s*)?", " ", path.read_text())  # a reference may wrap across lines
        for page, section in SECTION_REF.findall(text):
            found += 1
            target = (REPO / "docs" / page).read_text()
            assert re.search(rf"^#+ {re.escape(section)}|\*\*{re.escape(section)}", target, re.M), (
                f'{path.relative_to(REPO)} points to docs/{page}, "{section}", which it does not have'
            )
    assert found >= 5, "the pattern no longer finds the references"
