"""Benchmark reports keep their hand-written notes when they are rewritten."""

from __future__ import annotations

from pathlib import Path

from experiments.report_io import hand_notes, write_report


def test_a_rerun_keeps_the_notes_and_replaces_the_tables(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "bench.md"
    write_report(out, "| a |\n|---|\n| 1 |\n")
    assert out.read_text() == "| a |\n|---|\n| 1 |\n"
    notes = "## Notes (written by hand)\n\n- why 1 is low\n"
    out.write_text(out.read_text() + "\n" + notes)

    write_report(out, "| a |\n|---|\n| 2 |\n")

    assert out.read_text() == "| a |\n|---|\n| 2 |\n\n" + notes


def test_new_notes_from_the_benchmark_win(tmp_path: Path) -> None:
    out = tmp_path / "bench.md"
    out.write_text("old table\n\n## Notes\n- old\n")

    write_report(out, "new table\n\n## Notes\n- generated\n")

    assert out.read_text() == "new table\n\n## Notes\n- generated\n"
    assert hand_notes("no notes here\n## Not notes\n") == ""
