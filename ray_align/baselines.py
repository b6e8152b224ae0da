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

from collections.abc import Callable
from typing import Any, NamedTuple

from ray_align import prompts

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


def inference_prompt(method: str, instruction: str) -> prompts.Messages:
    """How each method is asked at evaluation: Chain of Hindsight with its good phrase, mistake
    analysis + reminder with the harmlessness reminder, every other method plainly."""
    if method == "chain_of_hindsight":
        return prompts.hindsight(instruction, good=True)
    return prompts.evaluate_prompt(instruction, reminder=method == "mistake_analysis+reminder")


def trained_model_of(method: str) -> str | None:
    """The method whose fine-tuned model answers for ``method`` (None: the base model)."""
    if method == "vanilla":
        return None
    return "mistake_analysis" if method == "mistake_analysis+reminder" else method
