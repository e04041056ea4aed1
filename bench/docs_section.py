"""Write a bench script's generated section into a docs page, between its BEGIN / END markers."""
from __future__ import annotations

from pathlib import Path


def replace_section(md: Path, begin: str, end: str, section: str, title: str) -> None:
    """Replace what lies between `begin` and `end` in `md` by `section` (markers included in it);
    append it when the markers are missing; create the page (with `title`) when it does not exist.
    Hand-written text outside the markers is kept."""
    text = md.read_text() if md.exists() else f"# {title}\n\n{begin}\n{end}\n"
    if begin in text and end in text:
        text = text[:text.index(begin)] + section + text[text.index(end) + len(end):]
    else:
        text += "\n" + section + "\n"
    md.write_text(text)
