"""The examples' result tables: one aligned text table for the terminal and the same rows as markdown."""

from __future__ import annotations

from collections.abc import Sequence


def tables(head: Sequence[str], body: Sequence[Sequence[str]]) -> tuple[str, str]:
    """``(text, markdown)`` of the same rows: text left-aligns the first column and right-aligns the others."""
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    text = "\n".join([line(head), line(["-" * w for w in widths]), *(line(b) for b in body)])
    md = "\n".join(["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|",
                    *("| " + " | ".join(b) + " |" for b in body)])
    return text, md


__all__ = ["tables"]
