"""The written outputs of ``ray-align compare``: a Markdown report, every number as JSON, a chart.

``report`` computes each method's numbers, this module the paired differences between methods
(through the same bootstrap) and lays everything out once, so the three files always agree:
``compare.md`` for people (the paper-shaped table, each trained method's difference from the
untrained model asked the same way, plainly or with the reminder, with a paired interval,
harmless rate per harm category and attack type, the judge's details and a few truncated sample
answers), ``compare.json`` for programs
(plain JSON: a missing value is ``null``, never NaN) and ``compare.png`` for a quick look.
A column with no parsed verdict is "n/a" in the table, ``null`` in the JSON and no bar in the chart,
never a zero that would read as a measured result.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ray_align.judges.report import (
    Bootstrap,
    Estimate,
    GroupScores,
    JudgedAnswer,
    MethodScores,
    _harmless_flags,
    _scores,
    bootstrap_mean,
    breakdown,
    compare_methods,
    format_estimate,
    interval_note,
    markdown_table,
    truncate,
)
from ray_align.judges.verdicts import Verdict
from ray_align.methods import REMINDER_SUFFIX, variant_name

DEFAULT_TITLE = "Mistake analysis: comparison of methods"
RESPONSE_CHARS = 160  # sample answers may be harmful: never spread them whole
PROMPT_CHARS = 120
DPI = 120

# (MethodScores attribute, column label) in the paper's column order.
COLUMNS: tuple[tuple[str, str], ...] = (
    ("helpfulness", "helpfulness"),
    ("harmlessness_score", "harmlessness score"),
    ("harmless_rate", "harmless rate"),
    ("helpfulness_on_harmful", "helpfulness on harmful prompts"),
    ("over_refusal_rate", "over-refusal rate"),  # the refusal detector's, on safe prompts
)
GROUPINGS: tuple[Literal["category", "attack"], ...] = ("category", "attack")
# The untrained rows the trained methods are set against, where the comparison has them: a plain
# row against vanilla, a +reminder row against vanilla+reminder (the control for the reminder).
BASELINES: tuple[str, ...] = (variant_name("vanilla", False), variant_name("vanilla", True))


def baseline_of(row: str) -> str:
    """The untrained model asked the same way as ``row``: its difference is what training adds."""
    return BASELINES[row.endswith(REMINDER_SUFFIX)]


# ----------------------------------------------------------------------------- paired differences


def paired_difference(a: Sequence[float | bool], b: Sequence[float | bool], *, resamples: int = 2000,
                      level: float = 0.95, seed: int = 0) -> tuple[float | None, float | None, float | None]:
    """``mean(a) - mean(b)`` over the same prompts (``a[i]`` and ``b[i]`` answer prompt ``i``) and
    its percentile-bootstrap interval, the prompts resampled jointly for both (paired).

    Resampling prompt indices jointly makes every resampled difference the mean of the per-prompt
    differences ``a[i] - b[i]`` over those indices, so this is the per-method bootstrap applied to
    those differences: one interval code for the whole report, reproducible for a seed. What the
    two methods share (easy and hard prompts) cancels, so the interval is narrower than one from
    two independent resamplings whenever the methods agree prompt by prompt. ``(None, None, None)``
    when there are no prompts.
    """
    if len(a) != len(b):
        raise ValueError(f"a paired difference needs one value of each method per prompt; got "
                         f"{len(a)} values for a and {len(b)} for b")
    diffs = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    estimate = bootstrap_mean(diffs, Bootstrap(resamples=resamples, confidence=level, seed=seed))
    return estimate.value, estimate.low, estimate.high


@dataclasses.dataclass(frozen=True)
class Difference:
    """``method`` minus ``baseline`` on one metric, over the ``n`` prompts both have a parsed verdict for."""

    method: str
    baseline: str
    metric: str  # a MethodScores attribute
    value: float | None
    low: float | None
    high: float | None
    n: int

    @property
    def excludes_zero(self) -> bool | None:
        """Whether the interval lies wholly above or below 0; None without prompts."""
        if self.low is None or self.high is None:
            return None
        return self.low > 0 or self.high < 0


PromptKey = tuple[str, str | None, str | None, str, int]
# (MethodScores attribute, prompt set, its per-answer value: [] when the verdict did not parse).
DIFFERENCE_METRICS: tuple[tuple[str, str, Callable[[JudgedAnswer], list[float]]], ...] = (
    ("harmless_rate", "harmful", lambda a: _harmless_flags([a.harmlessness])),
    ("helpfulness", "helpful", lambda a: _scores([a.helpfulness])),
    ("over_refusal_rate", "over_refusal", lambda a: [] if a.refused is None else [float(a.refused)]),
)


def per_prompt(answers: Sequence[JudgedAnswer], method: str, prompt_set: str,
               value_of: Callable[[JudgedAnswer], list[float]]) -> dict[PromptKey, float]:
    """One method's parsed value per prompt, keyed so the same prompt has the same key in every method.

    A prompt is its set, category, attack and text (the instruction before any method's wrapping);
    the k-th answer to a repeated prompt pairs with the other method's k-th. The count runs over
    unparsed answers too, so a failed verdict never shifts the pairing.
    """
    seen: Counter[tuple[str, str | None, str | None, str]] = Counter()
    out: dict[PromptKey, float] = {}
    for answer in answers:
        if answer.method != method or answer.prompt_set != prompt_set:
            continue
        prompt = (answer.prompt_set, answer.category, answer.attack, answer.prompt)
        key = (*prompt, seen[prompt])
        seen[prompt] += 1
        for value in value_of(answer):
            out[key] = value
    return out


def differences(answers: Sequence[JudgedAnswer], settings: Bootstrap) -> list[Difference]:
    """Every row but the baselines minus the baseline asked the same way (``baseline_of``), where
    the comparison has it, per metric, paired by prompt."""
    methods = list(dict.fromkeys(a.method for a in answers))
    out = []
    for method in (m for m in methods if m not in BASELINES and baseline_of(m) in methods):
        baseline = baseline_of(method)
        for metric, prompt_set, value_of in DIFFERENCE_METRICS:
            if not any(value_of(a) for a in answers if a.prompt_set == prompt_set):
                continue  # not measured here: a set not asked, or a judge without this score
            mine = per_prompt(answers, method, prompt_set, value_of)
            theirs = per_prompt(answers, baseline, prompt_set, value_of)
            shared = [key for key in mine if key in theirs]
            value, low, high = paired_difference(
                [mine[k] for k in shared], [theirs[k] for k in shared], resamples=settings.resamples,
                level=settings.confidence, seed=settings.seed)
            out.append(Difference(method, baseline, metric, value, low, high, len(shared)))
    return out


# ----------------------------------------------------------------------------- numbers as JSON


def plain(value: Any) -> Any:
    """``value`` as plain JSON data: NaN and infinities become None, unknown objects their str.

    The judge dict comes from callers (metrics, numpy scalars, paths), so it is cleaned here
    rather than trusted; ``json.dumps(..., allow_nan=False)`` then guarantees valid JSON.
    """
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [plain(item) for item in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return plain(dataclasses.asdict(value))
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        try:
            return plain(value.item())
        except (TypeError, ValueError):
            pass
    return str(value)


def estimate_dict(estimate: Estimate) -> dict[str, float | int | None]:
    """An estimate's value, interval and count, None where nothing parsed."""
    return plain({"value": estimate.value, "low": estimate.low, "high": estimate.high, "n": estimate.n})


def _verdict_dict(verdict: Verdict | None) -> dict[str, Any] | None:
    return None if verdict is None else plain(dataclasses.asdict(verdict))


# ----------------------------------------------------------------------------- sample answers


def _sample_rank(answer: JudgedAnswer) -> tuple[int, int, int]:
    """Harmful prompts first; of those, answers judged harmful (most harmful first), then the rest."""
    verdict = answer.harmlessness
    if verdict is not None and verdict.parsed and verdict.score is not None:
        tier = 0 if verdict.harmful else 1
        score = verdict.score
    else:
        tier, score = 2, 0
    return (0 if answer.prompt_set == "harmful" else 1, tier, score)


def sample_answers(answers: Sequence[JudgedAnswer], method: str, limit: int = 3) -> list[dict[str, Any]]:
    """A few of a method's answers with their verdicts, prompt and answer truncated.

    The most telling ones come first: what the judge found harmful shows what alignment missed.
    """
    mine = sorted((a for a in answers if a.method == method), key=_sample_rank)
    return [{
        "method": a.method,
        "prompt_set": a.prompt_set,
        "category": a.category,
        "attack": a.attack,
        "prompt": truncate(a.prompt, PROMPT_CHARS) if a.prompt else "",
        "response": truncate(a.response, RESPONSE_CHARS),
        "harmlessness": _verdict_dict(a.harmlessness),
        "helpfulness": _verdict_dict(a.helpfulness),
    } for a in mine[:max(limit, 0)]]


# ----------------------------------------------------------------------------- Markdown


def _cell(estimate: Estimate, digits: int = 2) -> str:
    if estimate.value is None:
        return "n/a"
    return f"{format_estimate(estimate, digits)} (n={estimate.n})"


def _safe(text: str) -> str:
    """Model text inline in Markdown: no raw HTML, no accidental code spans."""
    return text.replace("<", "&lt;").replace("`", "'")


def _main_table(scores: Sequence[MethodScores]) -> str:
    header = ["method"] + [label for _, label in COLUMNS] + ["unparsed verdicts"]
    rows = [[s.method] + [_cell(getattr(s, attr)) for attr, _ in COLUMNS] + [str(s.unparsed)] for s in scores]
    return markdown_table(header, rows)


def _group_table(groups: Sequence[GroupScores], methods: Sequence[str],
                 by: Literal["category", "attack"]) -> str:
    """Harmless rate with groups as rows and methods as columns, to compare methods side by side."""
    cells = {(g.group, g.method): g.harmless_rate for g in groups}
    names = sorted({g.group for g in groups})
    rows = [[name] + [_cell(cells[(name, m)]) if (name, m) in cells else "n/a" for m in methods]
            for name in names]
    return markdown_table([by, *methods], rows)


# How a difference is shown: the rate in percentage points, the 1-10 score in its own points.
DIFFERENCE_SHOWN: dict[str, tuple[str, float, int, str]] = {
    "harmless_rate": ("harmless rate", 100.0, 1, " pp"),
    "helpfulness": ("helpfulness", 1.0, 2, ""),
    "over_refusal_rate": ("over-refusal rate", 100.0, 1, " pp"),
}


def _signed(value: float, scale: float, digits: int) -> str:
    shown = value * scale
    return f"{shown + 0.0:+.{digits}f}"  # + 0.0: no "-0.0"


def _difference_table(diffs: Sequence[Difference]) -> str:
    header = ["method", "baseline", "metric", "difference", "95% paired interval", "n", "excludes 0"]
    rows = []
    for d in diffs:
        label, scale, digits, unit = DIFFERENCE_SHOWN[d.metric]
        if d.value is None or d.low is None or d.high is None:
            rows.append([d.method, d.baseline, label, "n/a", "n/a", str(d.n), "n/a"])
            continue
        rows.append([d.method, d.baseline, label, _signed(d.value, scale, digits) + unit,
                     f"[{_signed(d.low, scale, digits)}, {_signed(d.high, scale, digits)}]{unit}",
                     str(d.n), "yes" if d.excludes_zero else "no"])
    return markdown_table(header, rows)


def render_differences(diffs: Sequence[Difference], settings: Bootstrap) -> str:
    """The "Differences" section: each trained row minus the baseline asked the same way, with
    paired intervals."""
    plain_row, reminder_row = BASELINES
    if not diffs:
        return (f"No difference to show: the comparison needs a baseline row ({plain_row} for the "
                f"rows asked plainly, {reminder_row} for those asked with the reminder) and a "
                f"method asked the same way.")
    note = (f"Each method minus the untrained model asked the same way, on the same prompts: a row "
            f"asked plainly minus {plain_row}, a row asked with the harmlessness reminder minus "
            f"{reminder_row} (the control for the reminder alone, so the difference is what "
            f"training adds beyond it). Only prompts that both answered with a parsed verdict "
            f"count (n). The interval is a {settings.confidence:.0%} paired "
            f"percentile bootstrap (the prompts resampled jointly for both methods, "
            f"{settings.resamples} resamples, seed {settings.seed}); \"excludes 0\" says whether it "
            f"lies wholly above or below 0. The harmless rate differs in percentage points (pp), "
            f"helpfulness in points of the 1-10 score.")
    return note + "\n\n" + _difference_table(diffs)


def _flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(value, Mapping):
        if not value and prefix:
            return [(prefix, "{}")]
        out: list[tuple[str, Any]] = []
        for key, item in value.items():
            out += _flatten(item, f"{prefix}.{key}" if prefix else str(key))
        return out
    return [(prefix, value)]


def _show(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_show(v) for v in value) or "(none)"
    return str(value)


def render_judge(judge: Mapping[str, Any]) -> str:
    """The judge's details, whatever kind it is, as ``key: value`` lines (nested keys dotted)."""
    items = _flatten(plain(judge or {}))
    if not items:
        return "No details of the judge were recorded."
    lines = ["The verdicts come from this judge:", ""]
    lines += [f"- {_safe(key)}: {_safe(_show(value))}" for key, value in items]
    return "\n".join(lines)


def _verdict_words(sample: Mapping[str, Any]) -> str:
    words = [f"{sample['prompt_set']} prompt"]
    words += [f"{key} {sample[key]}" for key in ("category", "attack") if sample.get(key)]
    for task in ("harmlessness", "helpfulness"):
        verdict = sample.get(task)
        if verdict is None:
            continue
        if not verdict["parsed"]:
            words.append(f"{task} unparsed")
        elif task == "harmlessness":
            judged = "harmful" if verdict["harmful"] else "harmless"
            words.append(f"harmlessness {verdict['score']}/10, {judged}")
        else:
            words.append(f"helpfulness {verdict['score']}/10")
    return "; ".join(words)


def render_samples(samples: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    """Sample answers per method, each labelled and truncated since it may be harmful."""
    lines = [f"**Warning: possibly harmful content.** These are model answers, many to harmful prompts, "
             f"cut to {RESPONSE_CHARS} characters (prompts to {PROMPT_CHARS}); answers the judge "
             f"found harmful come first."]
    for method, picked in samples.items():
        lines += ["", f"### {_safe(method)}", ""]
        if not picked:
            lines.append("No answers.")
        for i, sample in enumerate(picked, 1):
            lines.append(f"{i}. ({_safe(_verdict_words(sample))}) — possibly harmful")
            if sample["prompt"]:
                lines.append(f"   - prompt: {_safe(sample['prompt'])}")
            lines.append(f"   - answer: {_safe(sample['response']) or '(empty)'}")
    return "\n".join(lines)


def render_markdown(scores: Sequence[MethodScores], groups: Mapping[str, Sequence[GroupScores]],
                    judge: Mapping[str, Any], samples: Mapping[str, Sequence[Mapping[str, Any]]],
                    settings: Bootstrap, title: str, chart_name: str | None = None,
                    diffs: Sequence[Difference] = ()) -> str:
    """The whole ``compare.md``."""
    methods = [s.method for s in scores]
    parts = [f"# {title}", "",
             "Helpfulness and harmlessness score are judged from 1 to 10; the harmless rate is the "
             "share of answers to harmful prompts judged harmless; the over-refusal rate is the "
             "share of safe prompts that only sound unsafe which the model declined (the keyword "
             "refusal detector, not the judge: lower is better). Each cell is the "
             f"{interval_note(settings)[0].lower()}{interval_note(settings)[1:]} "
             "n counts the parsed verdicts; unparsed verdicts are left out and counted in the last "
             "column. n/a: no parsed verdict.", "",
             _main_table(scores)]
    if chart_name:
        parts += ["", f"![comparison chart]({chart_name})"]
    parts += ["", "## Differences from the baselines", "", render_differences(diffs, settings)]
    for by in GROUPINGS:
        parts += ["", f"## Harmless rate per {'harm category' if by == 'category' else 'attack type'}", ""]
        parts.append(_group_table(groups[by], methods, by) if groups[by] else
                     "No harmful prompts were judged.")
    parts += ["", "## Judge", "", render_judge(judge), "", "## Sample answers", "", render_samples(samples)]
    return "\n".join(parts) + "\n"


# ----------------------------------------------------------------------------- chart


def _bars(ax: Any, positions: Sequence[float], estimates: Sequence[Estimate], width: float,
          color: Any, label: str | None, scale: float) -> None:
    """Bars with interval error bars; a missing estimate gets a grey "n/a", not a zero bar."""
    shown = [(x, e) for x, e in zip(positions, estimates, strict=True) if e.value is not None]
    if shown:
        xs = [x for x, _ in shown]
        values = [e.value for _, e in shown]
        below = [max(0.0, e.value - (e.low if e.low is not None else e.value)) for _, e in shown]
        above = [max(0.0, (e.high if e.high is not None else e.value) - e.value) for _, e in shown]
        ax.bar(xs, values, width, yerr=[below, above], capsize=4, color=color, label=label,
               error_kw={"elinewidth": 1.2, "ecolor": "black"})
    elif label:
        ax.bar([], [], width, color=color, label=label)  # keep the legend entry
    for x, e in zip(positions, estimates, strict=True):
        if e.value is None:
            ax.text(x, 0.02 * scale, "n/a", ha="center", va="bottom", fontsize=9, color="0.3")


def write_chart(scores: Sequence[MethodScores], path: Path, title: str, settings: Bootstrap) -> Path:
    """Harmless and over-refusal rates (top) and the 1-10 scores (bottom) per method, with
    interval error bars.

    Matplotlib is imported here so that importing the package, and running without a report,
    never needs it; the figure is drawn on an Agg canvas without pyplot, so no global state or
    open figure is left behind.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    methods = [s.method for s in scores]
    count = max(len(methods), 1)
    # Two panels stacked over one shared method axis, so the figure grows in width only with methods.
    fig = Figure(figsize=(max(8.0, 2.5 + 1.5 * count), 8.0), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    rate_ax, score_ax = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [2, 3]})
    xs = list(range(len(methods)))

    rates = (("harmless_rate", "harmless rate (harmful prompts)", "tab:green"),
             ("over_refusal_rate", "over-refusal rate (safe prompts declined)", "tab:red"))
    for i, (attr, label, color) in enumerate(rates):
        _bars(rate_ax, [x + (i - 0.5) * 0.4 for x in xs], [getattr(s, attr) for s in scores], 0.4,
              color, label, 1.0)
    rate_ax.set_ylim(0, 1.05)
    rate_ax.set_ylabel("rate")
    rate_ax.set_title("Harmless rate (higher is better) and over-refusal rate (lower is better)",
                      fontsize=10)
    rate_ax.legend(fontsize=9, frameon=False, loc="upper left")

    series = (("helpfulness", "helpfulness (helpful prompts)", "tab:blue"),
              ("helpfulness_on_harmful", "helpfulness (harmful prompts)", "tab:purple"),
              ("harmlessness_score", "harmlessness score", "tab:orange"))
    width = 0.8 / len(series)
    for i, (attr, label, color) in enumerate(series):
        offset = (i - (len(series) - 1) / 2) * width
        estimates = [getattr(s, attr) for s in scores]
        _bars(score_ax, [x + offset for x in xs], estimates, width, color, label, 10.0)
    score_ax.set_ylim(0, 10.5)
    score_ax.set_yticks(range(0, 11, 2))
    score_ax.set_ylabel("judge score (1-10)")
    score_ax.set_title("Judge scores, 1 (worst) to 10 (best)", fontsize=10)
    score_ax.set_xticks(xs, methods, rotation=25, ha="right", rotation_mode="anchor")
    score_ax.set_xlim(-0.6, max(len(methods) - 0.4, 0.6))

    for ax in (rate_ax, score_ax):
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
        if not methods:
            ax.text(0.5, 0.5, "no methods to compare", ha="center", va="center", transform=ax.transAxes)
    fig.legend(*score_ax.get_legend_handles_labels(), loc="outside lower center", ncols=3, fontsize=9,
               frameon=False)
    fig.suptitle(f"{title}\nerror bars: {settings.confidence:.0%} bootstrap interval; "
                 "n/a: no parsed verdict", fontsize=11)
    return save_png(fig, path)


def save_png(fig: Any, path: Path) -> Path:
    """Write a chart (its folder made when missing) and free the figure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI)
    fig.clear()
    return path


# ----------------------------------------------------------------------------- all outputs


def compare_data(scores: Sequence[MethodScores], groups: Mapping[str, Sequence[GroupScores]],
                 judge: Mapping[str, Any], samples: Mapping[str, Sequence[Mapping[str, Any]]],
                 settings: Bootstrap, title: str, diffs: Sequence[Difference] = ()) -> dict[str, Any]:
    """Every number of the report as plain JSON data.

    ``differences`` holds each row minus the baseline asked the same way, in the metric's own
    scale (the harmless rate as a share, as in ``methods``), with its paired interval and prompt
    count.
    """
    def group_rows(rows: Sequence[GroupScores]) -> list[dict[str, Any]]:
        return [{"method": g.method, "group": g.group, "harmless_rate": estimate_dict(g.harmless_rate),
                 "harmlessness_score": estimate_dict(g.harmlessness_score)} for g in rows]

    return plain({
        "title": title,
        "bootstrap": dataclasses.asdict(settings),
        "methods": [{"method": s.method, **{attr: estimate_dict(getattr(s, attr)) for attr, _ in COLUMNS},
                     "unparsed": s.unparsed} for s in scores],
        "differences": [{**dataclasses.asdict(d), "excludes_zero": d.excludes_zero} for d in diffs],
        "by_category": group_rows(groups["category"]),
        "by_attack": group_rows(groups["attack"]),
        "judge": judge or {},
        "samples": samples,
    })


def write_compare_outputs(answers: Sequence[JudgedAnswer], out_dir: Path, judge: dict,
                          settings: Bootstrap = Bootstrap(),  # noqa: B008 (frozen, never mutated)
                          samples_per_method: int = 3,
                          title: str = DEFAULT_TITLE) -> dict[str, Path]:
    """Write ``compare.md``, ``compare.json`` and ``compare.png`` into ``out_dir``; return their paths.

    All three come from one computation of the scores, so they cannot disagree.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scores = compare_methods(answers, settings)
    groups = {by: breakdown(answers, by, settings) for by in GROUPINGS}
    samples = {s.method: sample_answers(answers, s.method, samples_per_method) for s in scores}
    diffs = differences(answers, settings)
    paths = {"md": out_dir / "compare.md", "json": out_dir / "compare.json", "png": out_dir / "compare.png"}

    data = compare_data(scores, groups, judge, samples, settings, title, diffs)
    paths["json"].write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    write_chart(scores, paths["png"], title, settings)
    paths["md"].write_text(render_markdown(scores, groups, judge, samples, settings, title,
                                           chart_name=paths["png"].name, diffs=diffs),
                           encoding="utf-8")
    return paths
