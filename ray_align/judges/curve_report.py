"""The learning curve of ``ray-align compare`` (``compare.steps``): harmless rate and over-refusal
rate against optimizer steps, one line per method and reminder setting.

Every point is one trained model (a method after N optimizer steps, saved during its one
training) asked the same held-out prompts as every other point; step 0 of every line is the
untrained model asked the same way (vanilla or vanilla+reminder). The scores and the paired
differences from that untrained model come from the comparison's own code (``report``,
``compare_report``), so ``curve.md``, ``curve.json`` and ``curve.png`` agree with ``compare.md``
at the largest budget.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ray_align.judges.compare_report import (
    DIFFERENCE_SHOWN,
    DPI,
    Difference,
    _signed,
    baseline_of,
    differences,
    estimate_dict,
    plain,
    render_judge,
    save_png,
)
from ray_align.judges.report import (
    Bootstrap,
    Estimate,
    JudgedAnswer,
    MethodScores,
    compare_methods,
    format_estimate,
    markdown_table,
)
from ray_align.methods import REMINDER_SUFFIX

RATES: tuple[tuple[str, str], ...] = (("harmless_rate", "harmless rate"),
                                      ("over_refusal_rate", "over-refusal rate"))


@dataclasses.dataclass(frozen=True)
class CurvePoint:
    """One point of a line: the answers' row name for ``line`` (a method, ``+reminder`` when asked
    with the reminder) after ``step`` optimizer steps, and what its training had seen."""

    row: str
    line: str
    step: int
    # training samples consumed: step x samples per optimizer step (None: packed sequences hold
    # an unknown number of samples each)
    samples_seen: int | None = 0
    train_rows: int = 0  # the method's fine-tuning rows (analyses or baseline samples + helpful)

    @property
    def epochs_seen(self) -> float | None:
        if self.samples_seen is None:
            return None
        return self.samples_seen / self.train_rows if self.train_rows else 0.0


def _rates(scores: Mapping[str, MethodScores], row: str) -> dict[str, Estimate]:
    none = Estimate(None, None, None, 0)
    found = scores.get(row)
    return {attr: getattr(found, attr) if found else none for attr, _ in RATES}


def curve_data(points: Sequence[CurvePoint], answers: Sequence[JudgedAnswer], settings: Bootstrap,
               judge: Mapping[str, Any], training: Mapping[str, Any]) -> dict[str, Any]:
    """Every point's rates with intervals and its paired difference from the untrained model asked
    the same way, line by line, as plain JSON data."""
    scores = {s.method: s for s in compare_methods(answers, settings)}
    diffs: dict[tuple[str, str], Difference] = {(d.method, d.metric): d
                                                for d in differences(answers, settings)}
    lines: dict[str, list[dict[str, Any]]] = {}
    for point in sorted(points, key=lambda p: (p.line, p.step)):
        rates = _rates(scores, point.row)
        shown = {"step": point.step, "row": point.row, "samples_seen": point.samples_seen,
                 "epochs_seen": None if point.epochs_seen is None else round(point.epochs_seen, 3),
                 **{attr: estimate_dict(rates[attr]) for attr, _ in RATES}, "difference": {}}
        for attr, _ in RATES:
            d = diffs.get((point.row, attr))
            if d is not None:
                shown["difference"][attr] = {"baseline": d.baseline, "value": d.value, "low": d.low,
                                             "high": d.high, "n": d.n, "excludes_zero": d.excludes_zero}
        lines.setdefault(point.line, []).append(shown)
    return plain({
        "title": "Learning curve: harmless and over-refusal rates against optimizer steps",
        "steps": sorted({p.step for p in points}),
        "bootstrap": dataclasses.asdict(settings),
        "lines": [{"line": name, "baseline": baseline_of(name), "points": pts}
                  for name, pts in lines.items()],
        "training": training, "judge": judge,
    })


def _cell(estimate: Mapping[str, Any]) -> str:
    if estimate.get("value") is None:
        return "n/a"
    return format_estimate(Estimate(estimate["value"], estimate["low"], estimate["high"],
                                    estimate["n"]))


def _difference_cell(diff: Mapping[str, Any] | None, metric: str) -> str:
    _, scale, digits, unit = DIFFERENCE_SHOWN[metric]
    if not diff or diff.get("value") is None or diff.get("low") is None:
        return "-"
    text = (f"{_signed(diff['value'], scale, digits)} [{_signed(diff['low'], scale, digits)}, "
            f"{_signed(diff['high'], scale, digits)}]{unit}")
    return f"**{text}**" if diff.get("excludes_zero") else text


def render_curve(data: Mapping[str, Any], chart_name: str | None) -> str:
    """``curve.md``: the rates per line and budget, the paired differences from the untrained
    model at each budget, what each point's training saw, and the judge."""
    steps = data["steps"]
    settings = data["bootstrap"]
    parts = [f"# {data['title']}", "",
             f"Each cell is a rate with its {settings['confidence']:.0%} percentile-bootstrap "
             f"interval ({settings['resamples']} resamples) over the same held-out prompts. Step 0 "
             "is the untrained model asked the same way (vanilla, or vanilla+reminder); every later "
             "point is the method's model saved after that many optimizer steps of one training "
             "run. The harmless rate comes from the judge, the over-refusal rate (safe prompts "
             "declined, lower is better) from the keyword refusal detector."]
    if chart_name:
        parts += ["", f"![learning curve]({chart_name})"]
    for attr, label in RATES:
        rows = [[line["line"]] + [_cell(next((p[attr] for p in line["points"] if p["step"] == s),
                                             {})) for s in steps] for line in data["lines"]]
        parts += ["", f"## {label.capitalize()} by optimizer steps", "",
                  markdown_table(["line", *map(str, steps)], rows)]
    parts += ["", "## Paired differences from the untrained model at each budget", "",
              "Each point minus the untrained model asked the same way, on the same prompts (95% "
              "paired bootstrap); **bold**: the interval excludes 0. Harmless rate and over-refusal "
              "rate in percentage points."]
    for attr, label in RATES:
        trained_steps = [s for s in steps if s > 0]
        rows = [[line["line"]] + [_difference_cell(next((p["difference"].get(attr) for p in
                                                         line["points"] if p["step"] == s), None),
                                                   attr) for s in trained_steps]
                for line in data["lines"] if not line["line"].startswith("vanilla")]
        parts += ["", f"### {label.capitalize()}", "",
                  markdown_table(["line", *map(str, trained_steps)], rows)]
    parts += ["", "## What each point trained on", "", _training_note(data)]
    parts += ["", "## Judge", "", render_judge(data.get("judge") or {})]
    return "\n".join(parts) + "\n"


def _training_note(data: Mapping[str, Any]) -> str:
    training = data.get("training") or {}
    lines = [f"- {key}: {value}" for key, value in training.items() if not isinstance(value, dict)]
    rows: dict[tuple[str, int], list[str]] = {}  # a method's two lines share its saved models
    for line in data["lines"]:
        method = line["line"].removesuffix(REMINDER_SUFFIX)
        for p in line["points"]:
            if p["step"]:
                seen, epochs = p["samples_seen"], p["epochs_seen"]
                rows[(method, p["step"])] = [method, str(p["step"]),
                                             "n/a (packed)" if seen is None else str(seen),
                                             "n/a" if epochs is None else f"{epochs:.2f}"]
    table = markdown_table(["method", "optimizer steps", "samples seen", "epochs of its rows"],
                           list(rows.values()))
    return "\n".join([*lines, "", table]) if lines else table


def write_curve_chart(data: Mapping[str, Any], path: Path) -> Path:
    """Harmless rate (left) and over-refusal rate (right) against optimizer steps, asked plainly
    (top) and with the reminder (bottom): a colour per method, shaded bands the 95% intervals."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    settings = [reminded for reminded in (False, True)
                if any(line["line"].endswith(REMINDER_SUFFIX) == reminded for line in data["lines"])]
    fig = Figure(figsize=(12.0, 1.0 + 4.0 * max(len(settings), 1)), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.subplots(max(len(settings), 1), 2, sharex=True, squeeze=False)
    methods = list(dict.fromkeys(line["line"].removesuffix(REMINDER_SUFFIX) for line in data["lines"]))
    colors = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    for axes, reminded in zip(grid, settings, strict=False):
        asked = "with the harmlessness reminder" if reminded else "asked plainly"
        for ax, (attr, label) in zip(axes, RATES, strict=True):
            for line in data["lines"]:
                shown = [p for p in line["points"] if p[attr]["value"] is not None]
                if not shown or line["line"].endswith(REMINDER_SUFFIX) != reminded:
                    continue
                xs = [p["step"] for p in shown]
                color = colors[line["line"].removesuffix(REMINDER_SUFFIX)]
                ax.plot(xs, [p[attr]["value"] for p in shown], marker="o", markersize=3.5,
                        color=color, label=line["line"].removesuffix(REMINDER_SUFFIX))
                ax.fill_between(xs, [p[attr]["low"] for p in shown],
                                [p[attr]["high"] for p in shown], color=color, alpha=0.12,
                                linewidth=0)
            ax.set_xticks(data["steps"])
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
            ax.set_ylabel(label)
            better = "higher" if attr == "harmless_rate" else "lower"
            ax.set_title(f"{label}, {asked} ({better} is better)", fontsize=10)
    for ax in grid[-1]:
        ax.set_xlabel("optimizer steps (0: the untrained model)")
    fig.legend(*grid[0][0].get_legend_handles_labels(), loc="outside right center", fontsize=9,
               frameon=False)
    fig.suptitle(f"{data['title']}\nbands: {data['bootstrap']['confidence']:.0%} bootstrap "
                 "intervals over the same held-out prompts", fontsize=11)
    return save_png(fig, path)


def write_curve_outputs(points: Sequence[CurvePoint], answers: Sequence[JudgedAnswer], out_dir: Path,
                        settings: Bootstrap, judge: Mapping[str, Any],
                        training: Mapping[str, Any]) -> dict[str, Path]:
    """Write ``curve.md``, ``curve.json`` and ``curve.png`` into ``out_dir`` from one computation."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = curve_data(points, answers, settings, judge, training)
    paths = {"md": out_dir / "curve.md", "json": out_dir / "curve.json", "png": out_dir / "curve.png"}
    paths["json"].write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    write_curve_chart(data, paths["png"])
    paths["md"].write_text(render_curve(data, paths["png"].name), encoding="utf-8")
    return paths
