"""The documentation stands alone: no reference to a file the repository does not have,
and every relative link resolves."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
PAGES = [REPOSITORY / "README.md", *sorted((REPOSITORY / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]+)(#[^)]*)?\)")


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_a_page_names_no_file_outside_the_repository(page: Path) -> None:
    text = page.read_text()
    assert "DESIGN.md" not in text
    for target, _ in LINK.findall(text):
        if "://" in target:
            continue
        assert (page.parent / target).exists(), f"{page.name}: {target}"


def test_the_new_pages_are_linked_from_the_readme() -> None:
    readme = (REPOSITORY / "README.md").read_text()
    for page in ("docs/lan.md", "docs/troubleshooting.md", "docs/cookbook.md"):
        assert f"({page})" in readme, page
