"""Fine-tuning samples of each method in the paper's comparison (Chen et al., ICLR 2024, sec. 4).

Every function turns rows already generated (``analyze/data.parquet``, ``baselines/data.parquet``)
into ``Sample``s; ``build`` mixes them with the same helpful data for every method, so the
methods differ only in what they learn from the harmful instructions:

* mistake analysis: (instruction, induced harmful answer) unguided -> the model's own analysis;
* SFT: instruction -> the answer generated with the harmlessness hint;
* Critique-Revise: instruction -> the natural answer revised after the model's own critique;
* Chain of Hindsight: instruction + good feedback phrase -> harmless answer, and
  instruction + bad feedback phrase -> the induced harmful answer (inference uses the good one).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from ray_align import prompts
from ray_align.config import REMINDER_SUFFIX

Row = dict[str, Any]


class Sample(NamedTuple):
    id: str
    kind: str
    messages: prompts.Messages
    target: str


def mistake_analysis_samples(analyses: list[Row], baseline_rows: list[Row]) -> list[Sample]:
    return [Sample(f"analysis-{r['id']}", "analysis",
                   prompts.analysis_sample_prompt(r["instruction"], r["response"]), r["analysis"])
            for r in analyses]


def sft_samples(analyses: list[Row], baseline_rows: list[Row]) -> list[Sample]:
    return [Sample(f"harmless-{r['id']}", "harmless", prompts.helpful_sample_prompt(r["instruction"]),
                   r["harmless_response"]) for r in baseline_rows]


def critique_revise_samples(analyses: list[Row], baseline_rows: list[Row]) -> list[Sample]:
    return [Sample(f"revision-{r['id']}", "revision", prompts.helpful_sample_prompt(r["instruction"]),
                   r["revision"]) for r in baseline_rows]


def chain_of_hindsight_samples(analyses: list[Row], baseline_rows: list[Row]) -> list[Sample]:
    samples = []
    for r in baseline_rows:
        samples.append(Sample(f"hindsight-good-{r['id']}", "hindsight_good",
                              prompts.hindsight(r["instruction"], good=True), r["harmless_response"]))
        samples.append(Sample(f"hindsight-bad-{r['id']}", "hindsight_bad",
                              prompts.hindsight(r["instruction"], good=False), r["harmful_response"]))
    return samples


SAMPLES: dict[str, Callable[[list[Row], list[Row]], list[Sample]]] = {
    "mistake_analysis": mistake_analysis_samples,
    "sft": sft_samples,
    "critique_revise": critique_revise_samples,
    "chain_of_hindsight": chain_of_hindsight_samples,
}


ASKED: dict[str, tuple[bool, ...]] = {"both": (False, True), "plain": (False,), "reminder": (True,)}


class Variant(NamedTuple):
    """One row of the comparison: a method asked plainly or with the harmlessness reminder."""

    name: str  # what the table, compare.json, the chart and the answers call the row
    method: str
    reminder: bool


def variant_name(method: str, reminder: bool) -> str:
    return method + REMINDER_SUFFIX if reminder else method


def variants(methods: Sequence[str], reminder: str) -> list[Variant]:
    """The table's rows: each method in the order given, asked plainly and/or with the reminder
    (``compare.reminder``: both, plain or reminder), plain first."""
    return [Variant(variant_name(method, reminded), method, reminded)
            for method in methods for reminded in ASKED[reminder]]


def inference_prompt(method: str, instruction: str, reminder: bool = False) -> prompts.Messages:
    """How each method is asked at evaluation: Chain of Hindsight with its good phrase, every other
    method plainly; with ``reminder`` the instruction carries the harmlessness reminder (before
    Chain of Hindsight's phrase, which its training puts last)."""
    [asked] = prompts.evaluate_prompt(instruction, reminder)
    if method == "chain_of_hindsight":
        return prompts.hindsight(asked["content"], good=True)
    return [asked]


def trained_model_of(method: str) -> str | None:
    """The method whose fine-tuned model answers for ``method`` (None: the base model)."""
    return None if method == "vanilla" else method
