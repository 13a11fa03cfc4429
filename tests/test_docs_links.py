"""The README and docs/*.md: every relative link and image points at a file that exists, and a
link with an #anchor into a Markdown file names one of its headings (GitHub's heading ids)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

FENCED = re.compile(r"```.*?```", flags=re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*$", flags=re.M)


def read(page: Path) -> str:
    return page.read_text(encoding="utf-8")


def without_code(markdown: str) -> str:
    """The text outside fenced blocks and inline code, where a `[x](y)` is not a link."""
    return INLINE_CODE.sub("", FENCED.sub("", markdown))


def heading_ids(markdown: str) -> set[str]:
    """GitHub's ids: lowercase, punctuation dropped, spaces to hyphens, -1, -2 for repeats."""
    ids: set[str] = set()
    for title in HEADING.findall(FENCED.sub("", markdown)):  # a fenced `# comment` is no heading
        slug = unique = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        repeat = 0
        while unique in ids:
            repeat += 1
            unique = f"{slug}-{repeat}"
        ids.add(unique)
    return ids


def broken_links(page: Path) -> list[str]:
    """Each relative link of `page` whose file, or whose heading, does not exist."""
    broken = []
    for target in LINK.findall(without_code(read(page))):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{page.name}: {target} (no such file)")
        elif anchor and file.suffix == ".md" and anchor not in heading_ids(read(file)):
            broken.append(f"{page.name}: {target} (no such heading)")
    return broken


def test_every_relative_link_in_readme_and_docs_resolves():
    assert len(PAGES) > 1
    assert [link for page in PAGES for link in broken_links(page)] == []


def test_broken_links_are_found(tmp_path):
    (tmp_path / "other.md").write_text("# Other\n\n## A section, with: `code`\n\n## Other\n")
    (tmp_path / "img.png").write_bytes(b"")
    page = tmp_path / "page.md"
    page.write_text(
        "# Top\n\n"
        "[ok](other.md) [ok](other.md#a-section-with-code) [ok](other.md#other-1) ![ok](img.png)\n"
        "[ok](#top)\n"
        "[web](https://example.com/missing.md) `[code](missing.md)`\n"
        "```\n[fenced](missing.md)\n```\n"
        "[gone](missing.md) [bad anchor](other.md#nowhere) ![gone](pics/none.png) [self](#none)\n"
    )
    assert broken_links(page) == [
        "page.md: missing.md (no such file)",
        "page.md: other.md#nowhere (no such heading)",
        "page.md: pics/none.png (no such file)",
        "page.md: #none (no such heading)",
    ]
