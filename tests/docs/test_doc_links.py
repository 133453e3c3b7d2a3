"""Links between the documents: every ``[text](file.md#anchor)`` and
``[text](#anchor)`` in README.md and docs/*.md names a heading that is
there, with the anchor GitHub gives it (lower case, punctuation dropped,
spaces as hyphens, ``-1``, ``-2`` ... for repeats).  A heading renamed or a
section split (docs/gateway.md's API, one subsection per RPC the table links
to) fails here instead of leaving a link that lands on the top of the page."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kupd.testing import REPO_ROOT

__all__: list[str] = []

DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]


def anchors(text: str) -> set[str]:
    """The anchors of the document's headings (none from fenced blocks)."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    fenced = False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
            continue
        m = None if fenced else re.match(r"#{1,6} (.*)", line)
        if m is None:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        found.add(slug if n == 0 else f"{slug}-{n}")
    return found


def test_anchors_are_githubs() -> None:
    assert anchors("## The API (`x.proto`, service `Kup`)\n# a\n```\n# not one\n```\n# a\n") == {
        "the-api-xproto-service-kup",
        "a",
        "a-1",
    }


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(Path(p).relative_to(REPO_ROOT)))
def test_every_link_to_a_heading_finds_it(doc: Path) -> None:
    text = doc.read_text()
    broken = []
    for target, frag in re.findall(r"\]\(([^)#\s]*)#([^)\s]+)\)", text):
        dest = (doc.parent / target) if target else doc
        if not dest.is_file() or frag not in anchors(dest.read_text()):
            broken.append(f"{target}#{frag}")
    assert not broken, f"{doc.name}: links to no heading: {broken}"
