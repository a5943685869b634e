"""Writing a results table: the same rows as name.csv (for tools) and name.md (for people).

The markdown opens with the provenance block of the run (`provenance.provenance()`); the csv stays plain rows
(one header line), so it reads back with csv.DictReader as before.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path
from typing import Iterable


def provenance_lines(prov: dict[str, str]) -> list[str]:
    """The provenance as a short markdown list (no line starts with "|", so it never reads as a table row)."""
    return [f"- {key}: {value}" for key, value in prov.items()]


def markdown_table(rows: list[dict], title: str) -> list[str]:
    """`rows` as a titled markdown table (the first row's keys are the columns)."""
    keys = list(rows[0])
    lines = [f"### {title}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    return lines + ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]


def write_table(rows: list[dict], stem: Path, title: str, provenance: dict[str, str] | list[str] | None = None,
                before: list[str] = ()) -> None:
    """stem.csv and stem.md of `rows` (the first row's keys are the columns); `provenance` opens the md: a
    `provenance()` dict, or lines already formatted (a table rewritten keeps the block it had); `before` (a
    headline, summary tables) goes between the provenance and the table."""
    keys = list(rows[0])
    with open(stem.with_suffix(".csv"), "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    head = provenance_lines(provenance) if isinstance(provenance, dict) else list(provenance or [])
    lines = (head + [""] if head else []) + ([*before, ""] if before else []) + markdown_table(rows, title)
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def read_provenance_lines(md: Path) -> list[str]:
    """The provenance block a table's md opens with (the lines before its title); none when it has none."""
    try:
        text = md.read_text(encoding="utf-8")
    except OSError:
        return []
    head = text.split("\n### ", 1)[0] if not text.startswith("### ") else ""
    return [line for line in head.splitlines() if line.startswith("- ")]


def publish(out_dir: Path, dest: Path, names: Iterable[str], pictures: str) -> None:
    """A run's files `names` and its pictures (the glob `pictures`) copied from `out_dir` to `dest` (e.g. docs/...);
    the pictures `dest` had from an earlier run are removed first, so none is left over."""
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob(pictures):
        old.unlink()
    for f in [*(out_dir / n for n in names), *sorted(out_dir.glob(pictures))]:
        shutil.copy2(f, dest / f.name)


__all__ = ["write_table", "markdown_table", "provenance_lines", "read_provenance_lines", "publish"]
