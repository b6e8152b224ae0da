"""``ray-align compare``: the paper's comparison table (Chen et al., ICLR 2024, section 4).

Generation shared between methods runs once (``induce``, ``analyze``, ``baselines``); each
trained method then gets its own ``build`` and ``train`` on the same helpful data and the same
number of optimizer steps (mistake analysis uses the pipeline's own ``build`` and ``train``, so a
finished ``ray-align run`` is reused). ``compare/evaluate`` asks every method the same held-out
harmful, instruction-attack, helpful and over-refusal prompts, plainly and/or with the harmlessness reminder
(``compare.reminder``: a table row each), and ``compare/judge`` scores the answers and writes
``compare/compare.md``, ``compare.json`` and ``compare.png``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import tempfile
from pathlib import Path

import pyarrow as pa

from ray_align import prompts
from ray_align.config import Config
from ray_align.judges.over_refusal import OVER_REFUSAL
from ray_align.methods import METHODS, Variant, method, variants
from ray_align.pipeline import Context, Stage, StageOutput, manifest, run_stage, with_harm_label
from ray_align.stages.build import write_samples
from ray_align.stages.common import tokens_per_s
from ray_align.stages.evaluate import (
    ANSWER_SCHEMA,
    Answerer,
    answer_all,
    held_out_sets,
    trained_answerer,
)
from ray_align.stages.train import total_steps, train_model


def model_folder(name: str) -> str:
    """Where a trained method's stages write (mistake analysis: the pipeline's own folders)."""
    return method(name).folder


def _build_method(name: str, ctx: Context) -> StageOutput:
    run = ctx.run
    rows = run.read_table("baselines", "data.parquet").to_pylist()
    analyses = run.read_tables("analyze", "data").to_pylist()
    trained = method(name)
    return write_samples(ctx, f"{trained.folder}build", trained.samples(analyses, rows))


def _train_method(name: str, ctx: Context) -> StageOutput:
    trained = method(name)
    return train_model(ctx, f"{trained.folder}build", f"{trained.folder}train",
                       objective=trained.objective)


def trained_methods(cfg: Config) -> list[str]:
    """The methods that need a fine-tuned model; mistake analysis first (it sets the training
    budget), then in the table's order."""
    found = [name for name in cfg.compare.methods if METHODS[name].trained]
    return sorted(found, key=lambda name: name != "mistake_analysis")


def method_stages(name: str) -> tuple[Stage, Stage]:
    """A trained method's build and train: the pipeline's own for mistake analysis, the same
    stages in ``methods/NAME/`` on the baselines' samples for the others (a DPO method's train
    stage also depends on ``compare.dpo``)."""
    from ray_align.stages import STAGES

    build, train = STAGES["build"], STAGES["train"]
    if name == "mistake_analysis":
        return build, train
    trained = method(name)
    folder = trained.folder
    sections = (*train.sections, "compare.dpo") if trained.objective == "dpo" else train.sections
    return (dataclasses.replace(build, name=f"{folder}build", inputs=("analyze", "baselines"),
                                compute=functools.partial(_build_method, name)),
            dataclasses.replace(train, name=f"{folder}train", inputs=(f"{folder}build",),
                                sections=sections, compute=functools.partial(_train_method, name)))


def attack_items(harmful: list[dict], attacks: list[str], limit: int) -> list[dict]:
    """The first ``limit`` prompts of the first held-out harmful set, wrapped in each attack."""
    first = [r for r in harmful if r["set"] == harmful[0]["set"]][:limit] if harmful else []
    return [{**r, "id": f"{r['id']}@{attack}", "set": f"attack:{attack}", "attack": attack,
             "prompt": prompts.attacked(r["prompt"], attack)}
            for attack in attacks for r in first]


def compare_evaluate(ctx: Context) -> StageOutput:
    cfg, run = ctx.config, ctx.run
    harmful, helpful = held_out_sets(ctx, "compare/evaluate", over_refusal=True)
    items = harmful + attack_items(harmful, cfg.compare.attacks, cfg.compare.attack_limit) + helpful
    ctx.ensure_ray()
    answers, tokens, seconds, pools = answer_all(ctx, "compare/evaluate", method_answerers(ctx), items)
    run.write_table(with_harm_label(pa.Table.from_pylist(answers, schema=ANSWER_SCHEMA), harmful=True),
                    "compare/evaluate", "answers.parquet")
    return StageOutput(len(answers), "answers.parquet", {
        "output_tokens": tokens, "tokens_per_s": tokens_per_s(tokens, seconds),
        "harmful_prompts": len(harmful), "attack_prompts": len(items) - len(harmful) - len(helpful),
        "helpful_prompts": sum(r["set"] == "helpful" for r in helpful),
        "over_refusal_prompts": sum(r["set"] == OVER_REFUSAL for r in helpful), **pools})


def method_answerers(ctx: Context) -> list[Answerer]:
    """Each row of the table (a method asked plainly or with the reminder, ``compare.reminder``)
    with its inference prompt and the model it asks: the base model for vanilla, the method's
    trained model otherwise (a LoRA adapter when possible). A method's two rows ask the same model,
    so they share its engine pool."""
    cfg = ctx.config
    answerers = []
    for row in table_rows(cfg):
        asked = method(row.method)
        ask = functools.partial(asked.ask, reminder=row.reminder)
        answerers.append(trained_answerer(ctx, row.name, ask, f"{asked.folder}train", asked.name)
                         if asked.trained else Answerer(row.name, ask, cfg.model, "vanilla"))
    return answerers


def table_rows(cfg: Config) -> list[Variant]:
    """The comparison's rows in the table's order: ``compare.methods``, plain before reminder."""
    return variants(cfg.compare.methods, cfg.compare.reminder)


def compare_judge(ctx: Context) -> StageOutput:
    from ray_align.judges.compare_report import write_compare_outputs
    from ray_align.judges.report import Bootstrap
    from ray_align.judges.scoring import judge_answers

    cfg, run = ctx.config, ctx.run
    answers = run.read_table("compare/evaluate", "answers.parquet").to_pylist()
    judged, verdicts, judge_info = judge_answers(ctx, answers, "compare/judge")
    order = {row.name: i for i, row in enumerate(table_rows(cfg))}
    judged.sort(key=lambda a: order[a.method])  # the table in config order, plain first
    run.write_table(with_harm_label(verdicts, harmful=True), "compare/judge", "verdicts.parquet")
    judge_info["training_steps"] = {
        m: (manifest(run, f"{model_folder(m)}train") or {}).get("metrics", {}).get("global_step")
        for m in trained_methods(cfg)}
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_compare_outputs(judged, Path(tmp), judge_info,
                                      Bootstrap(resamples=cfg.compare.bootstrap_resamples),
                                      samples_per_method=cfg.compare.samples_per_method)
        for path in paths.values():
            run.write_bytes(Path(path).read_bytes(), "compare", Path(path).name)
    return StageOutput(verdicts.num_rows, "verdicts.parquet", {
        "judge": cfg.judge.kind,
        **{k: judge_info[k] for k in ("engine_pools", "engine_first_result_s") if k in judge_info}})


def _budgeted(ctx: Context, steps: int | None, rows: int) -> Context:
    """The paper's equal training budget: every method takes ``steps`` optimizer steps on its
    ``rows`` training rows (more epochs when it has fewer rows, a step cap when it has more)."""
    if steps is None:
        return ctx
    cfg = ctx.config
    limit = min(steps, cfg.train.max_steps or steps)
    if cfg.train.packing:  # packed epochs have no step count known here: the step cap decides
        epochs = max(cfg.train.epochs, limit)
    else:
        per_epoch = max(total_steps(cfg.train.model_copy(update={"epochs": 1, "max_steps": None}),
                                    rows), 1)
        epochs = max(cfg.train.epochs, math.ceil(limit / per_epoch))
    train = cfg.train.model_copy(update={"max_steps": limit, "epochs": epochs})
    return dataclasses.replace(ctx, config=cfg.model_copy(update={"train": train}))


def compare_plan(cfg: Config) -> list[Stage]:
    """Every stage of the comparison, in order: shared generation, each trained method's build
    and train, the evaluation (its inputs: the models actually trained), the judging."""
    trained = [method_stages(m) for m in trained_methods(cfg)]
    from ray_align.stages import STAGES

    shared = [STAGES[name] for name in (("induce", "analyze", "baselines") if trained else ("induce",))]
    evaluate = STAGES["compare/evaluate"]
    # The reminder setting decides which rows are asked, so it is part of the answers' identity
    # (the training stages' sections do not hold it: changing it retrains nothing).
    evaluate = dataclasses.replace(evaluate, inputs=tuple(t.name for _, t in trained),
                                   sections=tuple(dict.fromkeys((*evaluate.sections,
                                                                 "compare.reminder"))))
    return [*shared, *(b for b, _ in trained), *(t for _, t in trained), evaluate,
            STAGES["compare/judge"]]


def _steps_taken(ctx: Context) -> int:
    """Mistake analysis's optimizer steps: what its finished training recorded (packed epochs
    make the count known only once trained), else what its padded rows make."""
    steps = ((manifest(ctx.run, "train") or {}).get("metrics") or {}).get("global_step")
    return int(steps) if steps else total_steps(ctx.config.train, _train_rows(ctx, "build"))


def _train_rows(ctx: Context, build_stage: str) -> int:
    return manifest(ctx.run, build_stage)["metrics"]["train_rows"]


def run_compare(ctx: Context) -> None:
    """Run the plan (finished stages are skipped); the baselines train with mistake analysis's
    step budget."""
    cfg = ctx.config
    if cfg.rounds > 1:
        print(f"[compare] rounds: {cfg.rounds} applies to `ray-align run`; the comparison trains "
              "every method once, on one step budget (mistake analysis: round 1's model)", flush=True)
    trained = trained_methods(cfg)
    baseline_trains = {t.name: b.name for b, t in map(method_stages, trained) if t.name != "train"}
    for stage in compare_plan(cfg):
        if stage.name not in baseline_trains:
            run_stage(ctx, stage)
            continue
        budget = _steps_taken(ctx) if "mistake_analysis" in trained else None
        run_stage(_budgeted(ctx, budget, _train_rows(ctx, baseline_trains[stage.name])), stage)
