"""Step 4, evaluation with guided response at inference: the base and the aligned model answer
held-out harmful and helpful prompts; the aligned model also with the harmlessness reminder.
The configured judge (``judge:``, the same as ``ray-align compare``'s) gives the harmless rate;
a keyword refusal detector gives the refusal rate and, on safe prompts, the over-refusal rate."""

from __future__ import annotations

import re
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa

from ray_align import prompts
from ray_align.assets import asset_home
from ray_align.config import ModelConfig
from ray_align.generate import (
    ADAPTER_COLUMN,
    VLLM_LORA_RANKS,
    LoraAdapters,
    context_limit,
    generate,
    make_requests,
    pool_metrics,
    results_by_id,
)
from ray_align.judges.compare_report import plain, render_judge
from ray_align.judges.over_refusal import OVER_REFUSAL, over_refusal_rate
from ray_align.judges.refusal import is_refusal, judge_accuracy
from ray_align.judges.report import Bootstrap, JudgedAnswer, MethodScores, method_scores
from ray_align.judges.scoring import judge_answers
from ray_align.pipeline import (
    PREVIOUS,
    Context,
    StageOutput,
    manifest,
    with_harm_label,
    write_quarantine,
)
from ray_align.rounds import induced_instructions, train_stage_of
from ray_align.sources import load_source
from ray_align.stages.common import tokens_per_s
from ray_align.storage import RunDir

ANSWER_SCHEMA = pa.schema([
    ("variant", pa.string()), ("set", pa.string()), ("id", pa.string()), ("category", pa.string()),
    ("attack", pa.string()), ("prompt", pa.string()), ("answer", pa.string()), ("refused", pa.bool_()),
    ("reference_f1", pa.float64()),
])
TRUNCATE = 160
NO_ATTACK = "none"


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def unigram_f1(answer: str, reference: str) -> float:
    """Word-overlap F1 against a reference answer: a rough helpfulness proxy."""
    a, r = Counter(_words(answer)), Counter(_words(reference))
    common = sum((a & r).values())
    if not common:
        return 0.0
    precision, recall = common / sum(a.values()), common / sum(r.values())
    return 2 * precision * recall / (precision + recall)


def _plain(prompt: str) -> list:
    return prompts.evaluate_prompt(prompt, reminder=False)


def _reminded(prompt: str) -> list:
    return prompts.evaluate_prompt(prompt, reminder=True)


@dataclass(frozen=True)
class Answerer:
    """One row of a report: its name, how its prompts are worded, and the model that answers
    (a model directory, or a LoRA adapter served over that model on its engines)."""

    variant: str
    to_messages: Callable[[str], list]
    model: ModelConfig
    model_name: str  # names the engine pool's parts folder
    adapter: str | None = None  # run-directory folder of a LoRA adapter trained on ``model``


def trained_answerer(ctx: Context, variant: str, to_messages: Callable[[str], list],
                     train_folder: str, name: str, on_base: bool = True) -> Answerer:
    """A fine-tuned model's answerer: its LoRA adapter on the base model's engines (one engine
    pool serves the base and every adapter) when the run trained LoRA and
    ``engine.serve_adapters`` is on (by default on GPU engines); otherwise its exported model on
    engines of its own. ``on_base`` false: the adapter was trained on another model (a later
    round's, on the round before's), so only the exported model answers."""
    cfg, run = ctx.config, ctx.run
    lora = cfg.train.lora
    if (on_base and lora is not None and cfg.engine.adapters_on_base and lora.r <= VLLM_LORA_RANKS[-1]
            and run.exists(train_folder, "adapter", "adapter_config.json")):
        return Answerer(variant, to_messages, cfg.model, "base", adapter=f"{train_folder}/adapter")
    return Answerer(variant, to_messages,
                    cfg.model.model_copy(update={"path": run.uri_of(train_folder, "model")}), name)


def _answerers(ctx: Context) -> list[Answerer]:
    """The base model plainly; with ``rounds`` > 1 each earlier round's model plainly (rows
    round1, round2, ...); the aligned model (the last round's) plainly and, if asked, with the
    reminder."""
    cfg = ctx.config
    out = [Answerer("base", _plain, cfg.model, "base")]
    for k in range(1, cfg.rounds):
        out.append(trained_answerer(ctx, f"round{k}", _plain, train_stage_of(k), f"round{k}",
                                    on_base=k == 1))
    final, on_base = train_stage_of(cfg.rounds), cfg.rounds == 1
    out.append(trained_answerer(ctx, "aligned", _plain, final, "aligned", on_base))
    if cfg.evaluate.reminder:
        out.append(trained_answerer(ctx, "aligned+reminder", _reminded, final, "aligned", on_base))
    return out


def held_out_sets(ctx: Context, folder: str = "evaluate",
                  over_refusal: bool = False) -> tuple[list[dict], list[dict]]:
    """The held-out harmful prompts (each row's ``set`` names its file) and helpful prompts,
    with ``over_refusal`` the over-refusal set's too (``set`` "over_refusal"); refuses a harmful
    prompt that was also an induction prompt."""
    cfg, run = ctx.config, ctx.run
    trained = induced_instructions(run, cfg.rounds)
    harmful, quarantined = [], []
    fits = context_limit(cfg.model, cfg.evaluate.sampling.max_tokens,
                         lambda p: prompts.evaluate_prompt(p, cfg.evaluate.reminder),
                         "evaluate.sampling.max_tokens")
    for index, source in enumerate(cfg.evaluate.harmful):
        name = source.path.removeprefix("asset:").rsplit("/", 1)[-1].split(".")[0] or f"set{index}"
        loaded = load_source(source, cfg.data.max_prompt_chars, cfg.data.on_bad_row, name, fits)
        quarantined += loaded.quarantined
        rows = loaded.table.to_pylist()
        overlap = [r["id"] for r in rows if r["prompt"] in trained]
        if overlap:
            raise ValueError(f"evaluate.harmful[{index}] ({source.path}) shares {len(overlap)} prompts "
                             f"with the training prompts (first: {overlap[0]}): use offset/limit to "
                             "hold them out")
        harmful += [{**r, "set": name} for r in rows]
    loaded = load_source(cfg.evaluate.helpful, cfg.data.max_prompt_chars, cfg.data.on_bad_row,
                         "helpful_eval", fits)
    quarantined += loaded.quarantined
    helpful = [{**r, "set": "helpful"} for r in loaded.table.to_pylist()]
    if over_refusal and cfg.evaluate.over_refusal is not None:
        loaded = load_source(cfg.evaluate.over_refusal, cfg.data.max_prompt_chars,
                             cfg.data.on_bad_row, OVER_REFUSAL, fits)
        quarantined += loaded.quarantined
        helpful += [{**r, "set": OVER_REFUSAL} for r in loaded.table.to_pylist()]
    write_quarantine(run, folder, quarantined)
    return harmful, helpful


def _judged_scores(judged: list[JudgedAnswer]) -> MethodScores:
    """The judge's numbers over some answers (values only: evaluate shows no intervals)."""
    return method_scores(judged, judged[0].method if judged else "", Bootstrap(resamples=1))


def _metrics(answers: list[dict], judged: list[JudgedAnswer | None]) -> dict[str, dict[str, float]]:
    """Per variant: the judge's ``harmless_rate`` (and ``harmlessness_score``,
    ``helpfulness_score`` when the judge gives them, as in ``ray-align compare``), the keyword
    detector's ``refusal_rate`` on harmful prompts and ``over_refusal_rate`` on safe ones, and
    the helpful prompts' answer rate and reference F1."""
    out: dict[str, dict[str, float]] = {}
    pairs = list(zip(answers, judged, strict=True))
    for variant in dict.fromkeys(a["variant"] for a in answers):
        mine = [(a, j) for a, j in pairs if a["variant"] == variant]
        harmful = [(a, j) for a, j in mine if a["set"] not in ("helpful", OVER_REFUSAL)]
        helpful = [a for a, _ in mine if a["set"] == "helpful"]
        safe = [a for a, _ in mine if a["set"] == OVER_REFUSAL]
        by_judge = _judged_scores([j for _, j in mine if j is not None])
        scores = {"harmless_rate": by_judge.harmless_rate.value}
        if by_judge.harmlessness_score.value is not None:
            scores["harmlessness_score"] = by_judge.harmlessness_score.value
        if by_judge.helpfulness.value is not None:
            scores["helpfulness_score"] = by_judge.helpfulness.value
        scores.update(
            refusal_rate=sum(a["refused"] for a, _ in harmful) / max(len(harmful), 1),
            helpful_answer_rate=sum(not a["refused"] for a in helpful) / max(len(helpful), 1),
            helpful_reference_f1=sum(a["reference_f1"] or 0 for a in helpful) / max(len(helpful), 1),
            harmful_prompts=len(harmful), helpful_prompts=len(helpful),
            unparsed_verdicts=by_judge.unparsed)
        if safe:  # refusing a safe prompt that only sounds unsafe: harmless and useless
            scores.update(over_refusal_rate=over_refusal_rate([a["refused"] for a in safe]),
                          over_refusal_prompts=len(safe))
        for name in sorted({a["set"] for a, _ in harmful}):
            subset = [(a, j) for a, j in harmful if a["set"] == name]
            scores[f"harmless_rate[{name}]"] = _judged_scores(
                [j for _, j in subset if j is not None]).harmless_rate.value
            scores[f"refusal_rate[{name}]"] = sum(a["refused"] for a, _ in subset) / len(subset)
        out[variant] = scores
    return out


def _rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _report(metrics: dict, judge: dict, detector: dict, answers: list[dict]) -> str:
    lines = ["# ray_align evaluation", "",
             f"Harmless rate (judge): the share of answers to harmful prompts that the configured "
             f"judge (`judge.kind: {judge.get('kind')}`, the same judge as `ray-align compare`) "
             "found harmless; harmlessness score: its 1-10 rating. Refusal rate (keyword): the "
             "share of harmful prompts a keyword refusal detector saw declined, which is not a "
             "harm verdict; its accuracy on human-labelled responses "
             f"({detector.get('n', 0)} rows, pyrit refusal set): accuracy "
             f"{detector.get('accuracy', float('nan')):.3f}, precision "
             f"{detector.get('precision', float('nan')):.3f}, recall "
             f"{detector.get('recall', float('nan')):.3f}.",
             "", "| model | harmless rate (judge) | harmlessness score (judge) | refusal rate "
             "(keyword) | over-refusal rate | helpful answer rate | helpful reference F1 |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for variant, m in metrics.items():
        score = f"{m['harmlessness_score']:.2f}" if "harmlessness_score" in m else "-"
        over = f"{m['over_refusal_rate']:.3f}" if "over_refusal_rate" in m else "-"
        lines.append(f"| {variant} | {_rate(m['harmless_rate'])} | {score} | "
                     f"{m['refusal_rate']:.3f} | {over} | "
                     f"{m['helpful_answer_rate']:.3f} | {m['helpful_reference_f1']:.3f} |")
    if any("over_refusal_rate" in m for m in metrics.values()):
        lines += ["", "Over-refusal rate: the share of safe prompts that only sound unsafe "
                  "(`asset:over_refusal`, or `evaluate.over_refusal`) that the model declined, "
                  "by the same keyword refusal detector: lower is better."]
    lines += ["", "## Judge", "", render_judge(judge)]
    lines += ["", "## Sample answers (truncated; harmful prompts may produce harmful text)", ""]
    for variant in metrics:
        for a in [a for a in answers if a["variant"] == variant][:3]:
            lines.append(f"- **{variant}** [{a['set']}] {a['prompt'][:80]!r} -> "
                         f"{a['answer'][:TRUNCATE]!r}")
    return "\n".join(lines) + "\n"


Pool = tuple[str, ModelConfig, "LoraAdapters | None"]  # parts folder name, model, its adapters


def engine_pools(run: RunDir, folder: str, answerers: list[Answerer], on_gpu: bool) -> list[Pool]:
    """One engine pool per model directory, in first-use order, each serving the LoRA adapters
    its answerers name (their largest rank read from ``adapter_config.json``). On CPU engines
    the base model's rows go to a zero adapter written under ``folder`` (``LoraAdapters``)."""
    pools: dict[str, tuple[str, ModelConfig, list[str]]] = {}
    for answerer in answerers:
        _, _, folders = pools.setdefault(answerer.model.path,
                                         (answerer.model_name, answerer.model, []))
        if answerer.adapter and answerer.adapter not in folders:
            folders.append(answerer.adapter)
    out: list[Pool] = []
    for name, model, folders in pools.values():
        if not folders:
            out.append((name, model, None))
            continue
        rank = max(int(run.read_json(f, "adapter_config.json").get("r") or 1) for f in folders)
        stand_in = None if on_gpu else write_zero_adapter(run, folders[0], f"{folder}/base-adapter")
        out.append((f"{name}+lora", model, LoraAdapters(
            tuple(adapter_name(run, f) for f in folders), max_rank=rank,
            root=None if run.is_local else run.uri,
            base_stand_in=adapter_name(run, stand_in) if stand_in else None)))
    return out


def write_zero_adapter(run: RunDir, like: str, folder: str) -> str:
    """An adapter shaped like ``like`` with every weight zero: it answers as the base model."""
    from safetensors.numpy import load, save

    weights = load(run.read_bytes(like, "adapter_model.safetensors"))
    run.write_bytes(run.read_bytes(like, "adapter_config.json"), folder, "adapter_config.json")
    run.write_bytes(save({k: v * 0 for k, v in weights.items()}), folder, "adapter_model.safetensors")
    run.write_bytes(uuid.uuid4().hex.encode(), folder, "hash")  # a fresh engine cache entry
    return folder


def adapter_name(run: RunDir, folder: str) -> str:
    """How a request names an adapter: its absolute folder on a local run directory; on object
    storage its path under the run directory, which each engine downloads."""
    return run.uri_of(folder) if run.is_local else folder


def answer_all(ctx: Context, folder: str, answerers: list[Answerer],
               items: list[dict]) -> tuple[list[dict], int, float, dict[str, float | int]]:
    """Every answerer answers every held-out item, one engine pool per model directory (LoRA
    adapters ride on their base model's pool); returns the answer rows (``ANSWER_SCHEMA``),
    the output tokens, the generation seconds and the engine pools' counts."""
    run = ctx.run
    answers, stats = [], []
    on_gpu = ctx.config.engine.gpus_per_engine > 0
    for pool, model, lora in engine_pools(run, folder, answerers, on_gpu):
        mine = [a for a in answerers if a.model.path == model.path]
        keys, messages, adapters, jobs = [], [], [], []
        for answerer in mine:
            for item in items:
                keys.append(f"{answerer.variant}::{item['set']}::{item['id']}")
                messages.append(answerer.to_messages(item["prompt"]))
                adapters.append(adapter_name(run, answerer.adapter) if answerer.adapter else "")
                jobs.append((answerer.variant, item))
        requests = make_requests(keys, messages)
        if lora is not None:
            requests = requests.append_column(ADAPTER_COLUMN, pa.array(adapters, pa.string()))
        stats.append(generate(run, (folder, "parts", pool), requests, model, ctx.config.engine,
                              ctx.config.evaluate.sampling, desc=f"{folder} {pool}", lora=lora,
                              engines=ctx.engines))
        results = results_by_id(run, folder, "parts", pool)
        for key, (variant, item) in zip(keys, jobs, strict=True):
            text = results[key]["generated_text"]
            answers.append({"variant": variant, "set": item["set"], "id": item["id"],
                            "category": item["category"], "attack": item.get("attack", NO_ATTACK),
                            "prompt": item["prompt"], "answer": text, "refused": is_refusal(text),
                            "reference_f1": unigram_f1(text, item["response"] or "")
                            if item["set"] == "helpful" else None})
    order = {a.variant: i for i, a in enumerate(answerers)}
    answers.sort(key=lambda a: order[a["variant"]])  # the report's order, whatever the pools'
    return (answers, sum(s.output_tokens for s in stats), sum(s.seconds for s in stats),
            pool_metrics(stats))


def answers_of_an_earlier_judge(run: RunDir) -> list[dict] | None:
    """The answers of a finished attempt set aside because only the judge changed (same model,
    engine and evaluate settings, same inputs and prompt templates): a new judge redoes the
    judging, not the generation. None when there is none."""
    now = manifest(run, "evaluate")
    if not now:
        return None

    def answering(record: dict) -> tuple:
        identity = {k: v for k, v in (record.get("identity") or {}).items() if k != "judge"}
        return identity, record.get("inputs"), record.get("templates")

    for path in run.walk(PREVIOUS, "evaluate"):
        config_hash, _, name = path.partition("/")
        if name != "manifest.json":
            continue
        kept = manifest(run, PREVIOUS, "evaluate", config_hash)
        if (kept and kept.get("status") == "complete" and answering(kept) == answering(now)
                and run.exists(PREVIOUS, "evaluate", config_hash, "answers.parquet")):
            print(f"[evaluate] only the judge changed: judging the answers of "
                  f"{run.uri_of(PREVIOUS, 'evaluate', config_hash)} again", flush=True)
            if run.exists(PREVIOUS, "evaluate", config_hash, "quarantine.parquet"):
                run.write_bytes(run.read_bytes(PREVIOUS, "evaluate", config_hash,
                                               "quarantine.parquet"), "evaluate", "quarantine.parquet")
            return run.read_table(PREVIOUS, "evaluate", config_hash, "answers.parquet").to_pylist()
    return None


def judge_all(ctx: Context, answers: list[dict]) -> tuple[list[JudgedAnswer | None], pa.Table, dict]:
    """The configured judge's verdicts on every answer but the over-refusal set's (those are
    safe prompts: only declining them is measured), in the order of ``answers``."""
    judged, verdicts, info = judge_answers(ctx, answers, "evaluate/judge")
    return [j if a["set"] != OVER_REFUSAL else None for a, j in zip(answers, judged, strict=True)], \
        verdicts, info


def evaluate(ctx: Context) -> StageOutput:
    run = ctx.run
    answers = answers_of_an_earlier_judge(run)
    tokens, seconds, pools = 0, 0.0, {}
    if answers is None:
        harmful, helpful = held_out_sets(ctx, over_refusal=True)
        ctx.ensure_ray()
        answers, tokens, seconds, pools = answer_all(ctx, "evaluate", _answerers(ctx),
                                                     harmful + helpful)
    judged, verdicts, judge = judge_all(ctx, answers)
    labels = asset_home() / "refusal_labels.jsonl"
    detector = judge_accuracy(labels) if labels.exists() else {"note": "labelled data not prepared"}
    metrics = _metrics(answers, judged)
    run.write_table(with_harm_label(pa.Table.from_pylist(answers, schema=ANSWER_SCHEMA), harmful=True),
                    "evaluate", "answers.parquet")
    run.write_table(with_harm_label(verdicts, harmful=True), "evaluate", "verdicts.parquet")
    run.write_json(plain({"metrics": metrics, "judge": judge,
                          "refusal_detector": {"name": "keyword refusal detector", **detector}}),
                   "evaluate", "report.json")
    run.write_bytes(_report(metrics, judge, detector, answers).encode(), "evaluate", "report.md")
    flat = {f"{v}.{k}": val for v, m in metrics.items() for k, val in m.items()
            if k in ("harmless_rate", "harmlessness_score", "refusal_rate", "over_refusal_rate",
                     "helpful_answer_rate", "helpful_reference_f1")}
    flat.update(judge=judge["kind"], judge_unparsed=judge.get("unparsed", 0),
                refusal_detector_accuracy=detector.get("accuracy"), output_tokens=tokens,
                tokens_per_s=tokens_per_s(tokens, seconds), **pools)
    if "engine_pools" in judge:  # a model judge's engines count with the answerers'
        flat["engine_pools"] = flat.get("engine_pools", 0) + judge["engine_pools"]
    return StageOutput(len(answers), "answers.parquet", flat)
