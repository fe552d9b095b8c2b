"""Writing a benchmark's Markdown report without losing the notes written by hand.

Benchmarks regenerate their tables on every run; what a person wrote below them,
under a ``## Notes`` heading, explains the figures and must survive the rerun.
"""

from __future__ import annotations

from pathlib import Path

NOTES_HEADING = "## Notes"


def hand_notes(text: str) -> str:
    """Return ``text`` from its first ``## Notes`` heading on ("" if it has none)."""
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.startswith(NOTES_HEADING):
            return "".join(lines[i:])
    return ""


def write_report(path: Path, text: str) -> None:
    """Write ``text`` to ``path``, keeping the notes of the report it replaces.

    If the file at ``path`` has a ``## Notes`` section and ``text`` has none, the
    section is appended to ``text`` unchanged, so rerunning a benchmark refreshes
    its tables and keeps the hand-written explanation below them.
    """
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    notes = hand_notes(old)
    if notes and not hand_notes(text):
        text = text.rstrip("\n") + "\n\n" + notes
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
