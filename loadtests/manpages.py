"""A retrieval dev set from text nobody here wrote: the man pages installed on this machine.

Query = the one-line description of a page's NAME section ("ls - list directory contents" gives
"list directory contents"); relevant document = the rest of the page, as plain text. Both man(7) and
mdoc(7) pages are read with a small roff stripper (no groff needed).
"""

import gzip
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

MAN_ROOT = Path("/usr/share/man")
_ESCAPES: list[tuple[re.Pattern[str], str | Callable[[re.Match[str]], str]]] = [
    (re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""),  # font changes
    (re.compile(r"\\s[+-]?\d+"), ""),  # size changes
    (re.compile(r"\\\((em|en|hy)"), "-"),
    (re.compile(r"\\\(([a-zA-Z]{2})"), ""),
    (re.compile(r"\\\[[^\]]*\]"), ""),
    (re.compile(r"\\\*(\(..|\[[^\]]*\]|.)"), ""),
    (re.compile(r"\\[-&|^%0 ]"), lambda m: "-" if m.group(0) == "\\-" else " "),
    (re.compile(r"\\e"), "\\\\"),
    (re.compile(r"\\."), ""),
]
_TEXT_MACROS = re.compile(
    r"^\.(B|I|BR|BI|IB|IR|RB|RI|SM|SB|Nm|Nd|Fl|Ar|Op|Xr|Pa|Em|Sy|Dq|Qq|Li|Cm|It|Ss|SS|TP|IP)\b\s*"
)


@dataclass(frozen=True)
class ManPage:
    name: str
    description: str  # the query
    body: str  # the relevant document


def _plain(line: str) -> str:
    for pattern, replacement in _ESCAPES:
        line = pattern.sub(replacement, line)
    return line.replace('"', "").strip()


def parse_page(source: str) -> ManPage | None:
    """The page's NAME description and the rest of its text, or None for pages without both."""
    section = ""
    name_lines: list[str] = []
    body_lines: list[str] = []
    description = ""
    for raw in source.splitlines():
        if raw.startswith(('.\\"', "'\\\"", '.\\" ')):
            continue
        header = re.match(r'^\.(SH|Sh)\s+"?([^"]*)"?', raw)
        if header:
            section = header.group(2).strip().upper()
            continue
        if raw.startswith(".Nd ") and section == "NAME":
            description = _plain(raw[4:])
            continue
        if raw.startswith(".") and not _TEXT_MACROS.match(raw):
            continue
        text = _plain(_TEXT_MACROS.sub("", raw))
        if not text:
            continue
        (name_lines if section == "NAME" else body_lines).append(text)
    if not description and name_lines:
        joined = " ".join(name_lines)
        if " - " in joined:
            description = joined.split(" - ", 1)[1].strip()
    body = " ".join(" ".join(body_lines).split())
    if len(description) < 8 or len(body) < 200:
        return None
    name = " ".join(name_lines).split(" - ")[0][:80] if name_lines else ""
    return ManPage(name=name, description=description, body=body)


def load_man_pages(limit: int, root: Path = MAN_ROOT, sections: tuple[str, ...] = ("man1", "man8")) -> list[ManPage]:
    """Up to ``limit`` English pages with a description and a body, a deterministic sample by file hash.

    Pages whose description repeats another page's are dropped (a query must have one right answer)."""
    files = [p for section in sections for p in sorted((root / section).glob("*.gz"))] if root.is_dir() else []
    files.sort(key=lambda p: hashlib.sha256(p.name.encode()).hexdigest())
    pages: list[ManPage] = []
    seen: set[str] = set()
    for path in files:
        try:
            page = parse_page(gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace"))
        except (OSError, EOFError):
            continue
        if page is None or page.description.lower() in seen:
            continue
        seen.add(page.description.lower())
        pages.append(page)
        if len(pages) >= limit:
            break
    return pages
