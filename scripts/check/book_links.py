#!/usr/bin/env python3
"""Checks the relative links of the book (docs/src/*.md) and of README.md.

Every relative link must name a file or directory that exists, and every
`#anchor` must name a heading of the Markdown page it points at. Anchors are
the heading ids mdBook generates. With `--html DIR` (the built book), a book
page's ids are read from its HTML, which is what a reader's browser sees;
without it, or for pages outside the book (README.md), they are computed as
mdBook computes them. A link from a book page to a file outside docs/src is
broken in the built book (mdBook copies only docs/src), so it is reported
too.

Links in code blocks and code spans are not links, and are skipped. So are
links with a scheme (https:, mailto:) and links that leave the repository's
working tree only through a scheme.

Prints each broken link as `FILE:LINE: TARGET: why` and exits 1 when there
is one, 0 when there is none.

    scripts/check/book_links.py [--html target/book] [FILE.md ...]
"""

from __future__ import annotations

import argparse
import html.parser
import re
import sys
import urllib.parse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BOOK_SRC = ROOT / "docs" / "src"

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
ATX_HEADING = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
SETEXT_UNDERLINE = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
HEADING_ID = re.compile(r"[ \t]*\{#([^\s}]+)[^}]*\}[ \t]*$")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
INLINE_LINK = re.compile(r"\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
REFERENCE_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
HTML_HREF = re.compile(r"<a\s[^>]*\bhref=\"([^\"]*)\"", re.IGNORECASE)
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
MD_LINK_TEXT = re.compile(r"!?\[([^\]]*)\]\([^)]*\)")
EMPHASIS_UNDERSCORE = re.compile(r"(?<![A-Za-z0-9])_+|_+(?![A-Za-z0-9])")
HTML_TAG = re.compile(r"<[^>]+>")


def normalize_id(text: str) -> str:
    """mdBook's heading id: letters, digits, `_` and `-` kept (ASCII
    lowercased), each white-space character a `-`, everything else dropped."""
    out = []
    for ch in text:
        if ch.isalnum() or ch in "_-":
            out.append(ch.lower() if ch.isascii() else ch)
        elif ch.isspace():
            out.append("-")
    return "".join(out)


def heading_text(markdown: str) -> str:
    """The text a heading renders to: code spans keep their content, links
    their text; emphasis marks and HTML tags go."""
    parts = []
    last = 0
    for m in CODE_SPAN.finditer(markdown):
        parts.append(_plain(markdown[last : m.start()]))
        parts.append(m.group(2).strip())
        last = m.end()
    parts.append(_plain(markdown[last:]))
    return "".join(parts).strip()


def _plain(text: str) -> str:
    text = MD_LINK_TEXT.sub(r"\1", text)
    text = HTML_TAG.sub("", text)
    text = text.replace("*", "")
    return EMPHASIS_UNDERSCORE.sub("", text)


def _closes(marker: str, fence: str) -> bool:
    """Whether a fence line `marker` closes the block opened by `fence`."""
    return marker[0] == fence[0] and len(marker) >= len(fence)


def _paragraph(line: str) -> bool:
    """Whether `line` can be the text of a setext heading (not a table row,
    a list item or another heading)."""
    text = line.strip()
    return bool(text) and not text.startswith(("|", "-", "*", "+", "#", ">"))


class Page:
    """One Markdown file: its links (line, target) and its heading ids."""

    def __init__(self, path: Path):
        self.path = path
        self.links: list[tuple[int, str]] = []
        self.ids: list[str] = []
        self._parse(path.read_text(encoding="utf-8").splitlines())

    def _parse(self, lines: list[str]) -> None:
        fence = ""
        seen: dict[str, int] = {}
        previous = ""
        for number, line in enumerate(lines, start=1):
            opening = FENCE.match(line)
            if fence:
                if opening and _closes(opening.group(1), fence):
                    fence = ""
                previous = ""
                continue
            if opening:
                fence = opening.group(1)
                previous = ""
                continue
            heading = None
            atx = ATX_HEADING.match(line)
            if atx:
                heading = atx.group(2) or ""
            elif SETEXT_UNDERLINE.match(line) and _paragraph(previous):
                heading = previous.strip()
            if heading is not None:
                self._add_heading(heading, seen)
            self._collect_links(number, line)
            previous = line

    def _add_heading(self, markdown: str, seen: dict[str, int]) -> None:
        explicit = HEADING_ID.search(markdown)
        if explicit:
            self.ids.append(explicit.group(1))
            return
        base = normalize_id(heading_text(markdown))
        count = seen.get(base, 0)
        seen[base] = count + 1
        self.ids.append(base if count == 0 else f"{base}-{count}")

    def _collect_links(self, number: int, line: str) -> None:
        text = CODE_SPAN.sub(lambda m: " " * len(m.group(0)), line)
        targets = [m.group(1) for m in INLINE_LINK.finditer(text)]
        targets += [m.group(1) for m in HTML_HREF.finditer(text)]
        definition = REFERENCE_DEF.match(text)
        if definition:
            targets.append(definition.group(1))
        for target in targets:
            self.links.append((number, target.strip("<>")))


class HtmlIds(html.parser.HTMLParser):
    """The ids of an HTML page's headings (not those of mdBook's own menus)."""

    HEADINGS = {"h1", "h2", "h3", "h4", "h5", "h6"}

    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in self.HEADINGS:
            return
        for name, value in attrs:
            if name == "id" and value:
                self.ids.add(value)


class Checker:
    def __init__(self, html_dir: Path | None):
        self.html_dir = html_dir
        self.pages: dict[Path, Page] = {}
        self.html_ids: dict[Path, set[str] | None] = {}

    def page(self, path: Path) -> Page:
        if path not in self.pages:
            self.pages[path] = Page(path)
        return self.pages[path]

    def anchors(self, path: Path) -> set[str]:
        """The ids a link to `path` may name: from the built page where
        there is one, else computed from its headings."""
        built = self._built_ids(path)
        return built if built is not None else set(self.page(path).ids)

    def _built_ids(self, path: Path) -> set[str] | None:
        if self.html_dir is None or not _inside(path, BOOK_SRC):
            return None
        if path not in self.html_ids:
            rel = path.relative_to(BOOK_SRC).with_suffix(".html")
            html_file = self.html_dir / rel
            if not html_file.is_file():
                self.html_ids[path] = None
            else:
                parser = HtmlIds()
                parser.feed(html_file.read_text(encoding="utf-8"))
                self.html_ids[path] = parser.ids
        return self.html_ids[path]

    def check(self, source: Path) -> list[str]:
        problems = []
        for number, target in self.page(source).links:
            why = self._why_broken(source, target)
            if why:
                problems.append(f"{_show(source)}:{number}: {target}: {why}")
        return problems

    def _why_broken(self, source: Path, target: str) -> str | None:
        if not target or SCHEME.match(target) or target.startswith("//"):
            return None
        raw_path, _, raw_anchor = target.partition("#")
        path_part = urllib.parse.unquote(raw_path.split("?", 1)[0])
        anchor = urllib.parse.unquote(raw_anchor)
        if path_part.startswith("/"):
            return "absolute path: use a path relative to the page"
        dest = (source.parent / path_part).resolve() if path_part else source.resolve()
        if not dest.exists() and dest.suffix == ".html" and _inside(source, BOOK_SRC):
            # A book page may link to another's HTML name.
            dest = dest.with_suffix(".md")
        if not dest.exists():
            return "no such file"
        if _inside(source, BOOK_SRC) and not _inside(dest, BOOK_SRC):
            return "leaves docs/src: the built book does not have it"
        if not anchor:
            return None
        if dest.is_dir() or dest.suffix != ".md":
            return None
        if anchor not in self.anchors(dest):
            return f"no heading with the id {anchor!r} in {_show(dest)}"
        return None


def _inside(path: Path, directory: Path) -> bool:
    try:
        path.resolve().relative_to(directory.resolve())
    except ValueError:
        return False
    return True


def _show(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--html",
        type=Path,
        help="the built book, whose heading ids are the truth for its pages",
    )
    parser.add_argument(
        "files",
        nargs="*",
        type=Path,
        help="default: README.md and docs/src/**/*.md",
    )
    args = parser.parse_args()

    files = args.files or [ROOT / "README.md", *sorted(BOOK_SRC.rglob("*.md"))]
    if args.html is not None and not args.html.is_dir():
        print(
            f"book_links: --html {args.html}: not a directory (build the book first)",
            file=sys.stderr,
        )
        return 2
    checker = Checker(args.html)
    problems = []
    links = 0
    for path in files:
        path = path.resolve()
        problems += checker.check(path)
        links += len(checker.page(path).links)
    for problem in problems:
        print(problem)
    if problems:
        summary = f"{len(problems)} broken of {links} links in {len(files)} files"
        print(f"book_links: {summary}", file=sys.stderr)
        return 1
    print(f"book_links: {links} links in {len(files)} files, none broken")
    return 0


if __name__ == "__main__":
    sys.exit(main())
