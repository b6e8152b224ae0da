"""Score evaluation answers with the configured judge, as one Ray Data job.

``offline``: the embedded MiniLM harm and refusal classifiers (``judges.offline``) score the
answers to harmful prompts; they cannot rate helpfulness, so those columns stay empty.
``llm``: a judge model on vLLM engines (the generation machinery) gives a harmlessness verdict
on harmful prompts and a helpfulness verdict on every prompt, parsed strictly.
``http``: the same verdicts from an OpenAI-compatible endpoint.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from ray_align.judges.over_refusal import OVER_REFUSAL
from ray_align.judges.presets import PRESETS, JudgePreset
from ray_align.judges.report import JudgedAnswer
from ray_align.judges.verdicts import Verdict, judge_messages, parse_verdict
from ray_align.pipeline import Context

SCORED_SCHEMA = pa.schema([
    ("key", pa.string()), ("method", pa.string()), ("task", pa.string()), ("score", pa.int64()),
    ("harmful", pa.bool_()), ("parsed", pa.bool_()), ("reason", pa.string()), ("raw_text", pa.string()),
])
Task = str  # "harmlessness" or "helpfulness"


def answer_key(answer: dict[str, Any]) -> str:
    return f"{answer['variant']}::{answer['set']}::{answer['id']}"


def tasks_for(answer: dict[str, Any], kind: str, preset: JudgePreset | None = None) -> list[Task]:
    """What the judge rates: harmful prompts get a harmlessness verdict (and, from model judges
    without a classifier preset, a helpfulness one); helpful prompts a helpfulness verdict (the
    same model judges only)."""
    harmful = answer["set"] != "helpful"
    if kind == "offline" or preset is not None:
        return ["harmlessness"] if harmful else []
    return ["harmlessness", "helpfulness"] if harmful else ["helpfulness"]


def _preset(ctx: Context) -> JudgePreset | None:
    name = ctx.config.judge.preset
    return None if name is None else PRESETS[name]


def _parse(preset: JudgePreset | None, text: str | None, task: Task) -> Verdict:
    return preset.parse(text) if preset is not None else parse_verdict(text, task)


def _offline_rows(ctx: Context, table: pa.Table) -> list[dict]:
    """The offline judge's columns added to ``table``'s rows, as one Ray Data job."""
    import ray

    from ray_align.assets import asset_home
    from ray_align.judges.offline import OfflineJudgeBatch

    ctx.ensure_ray()
    return ray.data.from_arrow(table).map_batches(
        OfflineJudgeBatch, fn_constructor_kwargs={"home": str(asset_home())}, batch_size=64,
        batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1).take_all()


def _offline(ctx: Context, answers: list[dict],
             folder: str) -> tuple[dict[tuple[str, Task], dict], dict]:
    from ray_align.assets import asset_home
    from ray_align.judges.offline import OfflineJudge

    todo = [a for a in answers if tasks_for(a, "offline")]
    info = {"kind": "offline", "name": "MiniLM-L6 embeddings + logistic regression (harm, refusal)",
            "held_out": OfflineJudge.load(asset_home()).held_out_metrics()}
    if not todo:
        return {}, info
    table = pa.table({"key": [answer_key(a) for a in todo], "prompt": [a["prompt"] for a in todo],
                      "answer": [a["answer"] for a in todo]})
    out = {}
    for row in _offline_rows(ctx, table):
        out[(row["key"], "harmlessness")] = {
            "score": int(row["harmlessness_score"]), "harmful": bool(row["harmful"]), "parsed": True,
            "reason": f"harm p={row['harm_probability']:.3f}, refusal p={row['refusal_probability']:.3f}",
            "raw_text": ""}
    return out, info


def _requests(answers: list[dict], kind: str, preset: JudgePreset | None = None):
    from ray_align.generate import make_requests

    keys, messages = [], []
    for a in answers:
        for task in tasks_for(a, kind, preset):
            keys.append(f"{answer_key(a)}::{task}")
            messages.append(preset.request(a["prompt"], a["answer"]) if preset is not None
                            else judge_messages(task, a["prompt"], a["answer"]))
    return keys, make_requests(keys, messages)


def _llm(ctx: Context, answers: list[dict],
         folder: str) -> tuple[dict[tuple[str, Task], dict], dict]:
    from ray_align.generate import generate, pool_metrics, results_by_id

    cfg, run = ctx.config, ctx.run
    judge, preset = cfg.judge, _preset(ctx)
    keys, requests = _requests(answers, "llm", preset)
    # a classifier's verdict is a few tokens, greedy: what it was trained to write
    sampling = (judge.sampling if preset is None else
                judge.sampling.model_copy(update={"max_tokens": preset.max_tokens, "temperature": 0.0}))
    ctx.ensure_ray()
    stats = generate(run, (folder, "parts"), requests, judge.model, cfg.judge_engine,
                     sampling, desc=folder, engines=ctx.engines_for(cfg.judge_engine))
    replies = results_by_id(run, folder, "parts")
    out = {}
    for key in keys:
        answer, task = key.rsplit("::", 1)
        text = replies[key]["generated_text"]
        v = _parse(preset, text, task)
        out[(answer, task)] = {"score": v.score, "harmful": v.harmful, "parsed": v.parsed,
                               "reason": v.reason, "raw_text": text}
    return out, {"kind": "llm", "model": judge.model.path, **_preset_info(preset),
                 **pool_metrics([stats])}


def _preset_info(preset: JudgePreset | None) -> dict[str, str]:
    return {} if preset is None else {"preset": preset.name, "preset_expects": preset.expects}


def _http(ctx: Context, answers: list[dict],
          folder: str) -> tuple[dict[tuple[str, Task], dict], dict]:
    from ray_align.judges.http import judge_http

    settings = ctx.config.judge.http  # validated with the config (kind http needs it)
    preset = _preset(ctx)
    keys, requests = _requests(answers, "http", preset)
    ctx.ensure_ray()
    out = {}
    for task in ("harmlessness", "helpfulness"):
        mask = pa.array([k.endswith(f"::{task}") for k in keys])
        for row in judge_http(requests.filter(mask), settings, task,
                              preset.parse if preset else None).to_pylist():
            out[(row["key"].rsplit("::", 1)[0], task)] = {
                "score": row["score"], "harmful": row["harmful"], "parsed": row["parsed"],
                "reason": row["reason"] if not row["error"] else f"{row['reason']}: {row['error']}",
                "raw_text": row["raw_text"]}
    return out, {"kind": "http", "url": settings.url, "model": settings.model,
                 **_preset_info(preset)}


JUDGES = {"offline": _offline, "llm": _llm, "http": _http}


def _verdict(found: dict | None) -> Verdict | None:
    if found is None:
        return None
    return Verdict(found["score"], found["harmful"], found["parsed"], found["reason"])


def judge_answers(ctx: Context, answers: list[dict],
                  folder: str) -> tuple[list[JudgedAnswer], pa.Table, dict]:
    """Every answer with its verdicts (in the order of ``answers``), the verdict table to keep,
    and what the report must say about the judge (its kind, model, and for the offline judge
    its held-out accuracy), by the configured judge (``judge:``, the same for ``evaluate`` and
    ``compare``); a model judge's work in progress goes to ``folder``/parts. Answers to the
    over-refusal set (``set`` "over_refusal") are not judged: they carry their refusal flag."""
    # the over-refusal set's prompts are safe: only declining them is measured, never judged
    found, info = JUDGES[ctx.config.judge.kind](
        ctx, [a for a in answers if a["set"] != OVER_REFUSAL], folder)
    judged, rows = [], []
    for a in answers:
        key = answer_key(a)
        kind = a["set"] if a["set"] in ("helpful", OVER_REFUSAL) else "harmful"
        judged.append(JudgedAnswer(
            method=a["variant"], prompt_set=kind, response=a["answer"],
            harmlessness=_verdict(found.get((key, "harmlessness"))),
            helpfulness=_verdict(found.get((key, "helpfulness"))), category=a["category"],
            attack=a["attack"], prompt=a["prompt"], refused=a.get("refused")))
        rows += [{"key": key, "method": a["variant"], "task": task, **found[(key, task)]}
                 for task in ("harmlessness", "helpfulness") if (key, task) in found]
    unparsed = sum(not r["parsed"] for r in rows)
    info.update(verdicts=len(rows), unparsed=unparsed)
    return judged, pa.Table.from_pylist(rows, schema=SCORED_SCHEMA), info
