"""What several stages do the same way, written once so their manifests and quarantines agree."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ray_align.pipeline import write_quarantine
from ray_align.storage import RunDir

Row = dict[str, Any]


def tokens_per_s(tokens: int, seconds: float) -> float:
    """Output tokens per second as a manifest records it: one decimal, 0.0 when nothing was timed."""
    return round(tokens / seconds, 1) if seconds else 0.0


def set_aside_short(run: RunDir, stage: str, rows: Sequence[Row], fields: Sequence[str],
                    min_chars: int, what: str) -> tuple[list[Row], int]:
    """The rows whose generated ``fields`` all have at least ``min_chars`` characters, and how many
    others went to ``STAGE/quarantine.parquet`` with the short fields as the reason.

    Why: a generation too short to learn from (an empty analysis, a one-word revision) must not
    become a training target, and must not vanish silently either. No usable row at all is an
    error, raised after the quarantine is written so the message can point at it.
    """
    kept, short_rows = [], []
    for row in rows:
        short = [name for name in fields if len(row[name]) < min_chars]
        if not short:
            kept.append(row)
            continue
        lengths = ", ".join(f"{name} has {len(row[name])} characters" for name in short)
        short_rows.append({"source": stage, "row": None, "id": row["id"],
                           "reason": f"{lengths} (under {min_chars})"})
    set_aside = write_quarantine(run, stage, short_rows)
    if not kept:
        raise RuntimeError(f"{stage}: no usable {what} was generated; see {stage}/quarantine.parquet")
    return kept, set_aside
