"""The methods of the paper's comparison (Chen et al., ICLR 2024, sec. 4), each defined once.

A ``Method`` says what its fine-tuning learns from the rows generated once for every method
(``analyze/data/``, ``baselines/data.parquet``), with which loss, how it is asked at
evaluation, and where its stages write. ``compare``, the config's validation, the CLI's help and
the reports all read ``METHODS``; adding a method is one entry here plus its tests. ``build``
mixes every method's samples with the same helpful samples, so the methods differ only in what
they learn from the harmful instructions:

* vanilla: not trained, the base model;
* SFT: instruction -> the answer generated with the harmlessness hint;
* Critique-Revise: instruction -> the natural answer revised after the model's own critique;
* Chain of Hindsight: instruction + good feedback phrase -> harmless answer, and
  instruction + bad feedback phrase -> the induced harmful answer (inference uses the good one);
* DPO (standing in for the paper's PPO-based RLHF): pairs of the same instruction, chosen the
  harmless answer, rejected the induced harmful one; the helpful samples stay SFT samples;
* mistake analysis: (instruction, induced harmful answer) unguided -> the model's own analysis.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from ray_align import prompts

Row = dict[str, Any]
REMINDER_SUFFIX = "+reminder"  # a row's name when its method is asked with the reminder


class Sample(NamedTuple):
    """One fine-tuning example: a prompt and its target; with ``rejected``, a preference pair
    (the target preferred over ``rejected`` for the same prompt)."""

    id: str
    kind: str
    messages: prompts.Messages
    target: str
    rejected: str | None = None


SampleMaker = Callable[[list[Row], list[Row]], list[Sample]]  # (analyses, baselines) -> samples


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


def dpo_pairs(analyses: list[Row], baseline_rows: list[Row]) -> list[Sample]:
    """The plain instruction; chosen: the harmless answer made with the hint (what SFT learns);
    rejected: the induced harmful answer (what Chain of Hindsight learns as its bad example)."""
    return [Sample(f"pair-{r['id']}", "pair", prompts.helpful_sample_prompt(r["instruction"]),
                   r["harmless_response"], rejected=r["harmful_response"]) for r in baseline_rows]


def plain_ask(instruction: str, reminder: bool) -> prompts.Messages:
    """The instruction as it is, or wrapped in the harmlessness reminder."""
    return prompts.evaluate_prompt(instruction, reminder)


def hindsight_ask(instruction: str, reminder: bool) -> prompts.Messages:
    """Chain of Hindsight is asked with its good feedback phrase, after the reminder (its
    training puts the phrase last)."""
    [asked] = prompts.evaluate_prompt(instruction, reminder)
    return prompts.hindsight(asked["content"], good=True)


@dataclass(frozen=True)
class Method:
    """One method of the table: its fine-tuning samples (None: not trained, the base model
    answers), its loss, how it is asked at evaluation, and where its stages write."""

    name: str
    summary: str  # one line for the CLI's help and the docs
    samples: SampleMaker | None
    objective: Literal["sft", "dpo"] = "sft"
    ask: Callable[[str, bool], prompts.Messages] = plain_ask

    @property
    def trained(self) -> bool:
        return self.samples is not None

    @property
    def folder(self) -> str:
        """Prefix of its build and train stages (mistake analysis: the pipeline's own)."""
        return "" if self.name == "mistake_analysis" else f"methods/{self.name}/"


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("vanilla", "the base model, not fine-tuned", None),
    Method("sft", "fine-tuned on the answers made with the harmlessness hint", sft_samples),
    Method("critique_revise", "fine-tuned on its natural answers revised after self-critique",
           critique_revise_samples),
    Method("chain_of_hindsight", "fine-tuned on good and bad answers behind feedback phrases",
           chain_of_hindsight_samples, ask=hindsight_ask),
    Method("dpo", "DPO on (harmless, induced harmful) pairs, standing in for the paper's RLHF",
           dpo_pairs, objective="dpo"),
    Method("mistake_analysis", "fine-tuned on its own analyses of its induced mistakes",
           mistake_analysis_samples),
)}
METHOD_NAMES: tuple[str, ...] = tuple(METHODS)  # the table's order
DEFAULT_METHODS: tuple[str, ...] = METHOD_NAMES


def method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(METHOD_NAMES)}") from None


ASKED: dict[str, tuple[bool, ...]] = {"both": (False, True), "plain": (False,), "reminder": (True,)}


class Variant(NamedTuple):
    """One row of the comparison: a method asked plainly or with the harmlessness reminder."""

    name: str  # what the table, compare.json, the chart and the answers call the row
    method: str
    reminder: bool


def variant_name(method_name: str, reminder: bool) -> str:
    return method_name + REMINDER_SUFFIX if reminder else method_name


def variants(methods: Sequence[str], reminder: str) -> list[Variant]:
    """The table's rows: each method in the order given, asked plainly and/or with the reminder
    (``compare.reminder``: both, plain or reminder), plain first."""
    return [Variant(variant_name(name, reminded), name, reminded)
            for name in methods for reminded in ASKED[reminder]]


def inference_prompt(method_name: str, instruction: str, reminder: bool = False) -> prompts.Messages:
    """How a method is asked at evaluation, plainly or with the reminder."""
    return method(method_name).ask(instruction, reminder)
