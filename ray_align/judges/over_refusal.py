"""Over-refusal: safe prompts that only sound unsafe, and how often a model turns them down.

A model that refuses everything scores perfectly on harmlessness and is useless. The packaged
``data/over_refusal.jsonl`` holds prompts written for this repository in the spirit of XSTest
(homonyms such as "kill a process", idioms, safe targets, fiction and games, definitions,
public-safety information, public facts, history, common medical knowledge, security defence and
legal self-protection). Every row is safe to answer (``expected: "comply"``), so each refusal
counts against the model; ``is_refusal`` is the pipeline's own keyword detector.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from importlib import resources
from pathlib import Path

from ray_align.judges.refusal import is_refusal

REQUIRED_KEYS = ("id", "prompt", "category", "expected")
EXPECTED_VALUES = ("comply", "refuse")

OVER_REFUSAL = "over_refusal"  # the ``set`` of its prompts among held-out answers


class OverRefusalDataError(ValueError):
    """A malformed row in an over-refusal file; the message names the file, line and key."""


def default_path() -> Path:
    """The packaged set, ``ray_align/data/over_refusal.jsonl``."""
    return Path(str(resources.files("ray_align") / "data" / "over_refusal.jsonl"))


def _validate(row: object, where: str) -> dict:
    if not isinstance(row, dict):
        raise OverRefusalDataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for key in REQUIRED_KEYS:
        if key not in row:
            raise OverRefusalDataError(f"{where}: missing key {key!r}")
        value = row[key]
        if not isinstance(value, str) or not value.strip():
            raise OverRefusalDataError(f"{where}: key {key!r} must be a non-empty string")
    if row["expected"] not in EXPECTED_VALUES:
        raise OverRefusalDataError(
            f"{where}: key 'expected' is {row['expected']!r}; use one of {', '.join(EXPECTED_VALUES)}"
        )
    return row


def load_over_refusal(
    limit: int | None = None, expected: str | None = "comply", path: str | Path | None = None,
) -> list[dict]:
    """The rows whose ``expected`` matches (``None``: all rows), in file order, at most ``limit``.

    Every row of the file is validated, not only those returned, and ids must be unique.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if expected is not None and expected not in EXPECTED_VALUES:
        raise ValueError(f"expected must be one of {', '.join(EXPECTED_VALUES)} or None, got {expected!r}")
    source = Path(path) if path is not None else default_path()
    text = source.read_text(encoding="utf-8")
    rows, seen = [], {}
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{source} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise OverRefusalDataError(f"{where}: not valid JSON ({exc.msg})") from exc
        row = _validate(record, where)
        if row["id"] in seen:
            raise OverRefusalDataError(
                f"{where}: key 'id' value {row['id']!r} repeats line {seen[row['id']]}"
            )
        seen[row["id"]] = number
        rows.append(row)
    chosen = [row for row in rows if expected is None or row["expected"] == expected]
    return chosen if limit is None else chosen[:limit]


def over_refusal_rate(refused: list[bool]) -> float:
    """The share of safe prompts that were refused; 0.0 for no prompts."""
    return sum(map(bool, refused)) / len(refused) if refused else 0.0


def refusals(answers: Iterable[str]) -> list[bool]:
    """Each answer judged by the pipeline's keyword refusal detector."""
    return [is_refusal(answer) for answer in answers]


def score_answers(answers: Iterable[str]) -> float:
    """The over-refusal rate of answers to the ``comply`` prompts."""
    return over_refusal_rate(refusals(answers))
