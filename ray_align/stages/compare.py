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
from ray_align.judges.curve_report import CurvePoint, write_curve_outputs
from ray_align.judges.over_refusal import OVER_REFUSAL
from ray_align.methods import METHODS, REMINDER_SUFFIX, Variant, method, variant_name, variants
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
from ray_align.training.ray_worker import step_folder


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
    for point in curve_points(cfg):  # a learning curve's earlier points: models saved mid-training
        if point.step in (0, _final_step(cfg)):
            continue  # the untrained model and the finished training are rows of the table
        row_method = point.line.removesuffix(REMINDER_SUFFIX)
        asked = method(row_method)
        ask = functools.partial(asked.ask, reminder=point.line.endswith(REMINDER_SUFFIX))
        answerers.append(trained_answerer(ctx, point.row, ask,
                                          step_folder(f"{asked.folder}train", point.step),
                                          f"{asked.name}-step{point.step}"))
    return answerers


def _final_step(cfg: Config) -> int | None:
    return cfg.compare.steps[-1] if cfg.compare.steps else None


def curve_points(cfg: Config) -> list[CurvePoint]:
    """The learning curve's points (``compare.steps``), line by line: step 0 is the untrained
    model asked the same way, the largest budget the table's own row, every other budget the row
    ``METHOD@N`` (``METHOD@N+reminder``). Empty without ``compare.steps``."""
    if not cfg.compare.steps:
        return []
    out = []
    for row in table_rows(cfg):
        if not METHODS[row.method].trained:
            continue
        line, untrained = row.name, variant_name("vanilla", row.reminder)
        if untrained in {r.name for r in table_rows(cfg)}:
            out.append(CurvePoint(untrained, line, 0))
        for step in cfg.compare.steps:
            name = row.name if step == _final_step(cfg) else variant_name(f"{row.method}@{step}",
                                                                            row.reminder)
            out.append(CurvePoint(name, line, step))
    return out


def row_names(cfg: Config) -> list[str]:
    """Every row answered, in the report's order: the table's, then the curve's earlier points."""
    return list(dict.fromkeys([*(r.name for r in table_rows(cfg)),
                               *(p.row for p in curve_points(cfg))]))


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
    order = {name: i for i, name in enumerate(row_names(cfg))}
    judged.sort(key=lambda a: order[a.method])  # the table in config order, plain first
    run.write_table(with_harm_label(verdicts, harmful=True), "compare/judge", "verdicts.parquet")
    judge_info["training_steps"] = {
        m: (manifest(run, f"{model_folder(m)}train") or {}).get("metrics", {}).get("global_step")
        for m in trained_methods(cfg)}
    settings = Bootstrap(resamples=cfg.compare.bootstrap_resamples)
    table = {row.name for row in table_rows(cfg)}
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_compare_outputs([a for a in judged if a.method in table], Path(tmp),
                                      judge_info, settings,
                                      samples_per_method=cfg.compare.samples_per_method)
        if cfg.compare.steps:
            paths |= {f"curve_{k}": v for k, v in write_curve_outputs(
                seen_by_points(ctx), judged, Path(tmp), settings, judge_info,
                curve_training(cfg)).items()}
        for path in paths.values():
            run.write_bytes(Path(path).read_bytes(), "compare", Path(path).name)
    return StageOutput(verdicts.num_rows, "verdicts.parquet", {
        "judge": cfg.judge.kind,
        **{k: judge_info[k] for k in ("engine_pools", "engine_first_result_s") if k in judge_info}})


def samples_per_step(cfg: Config) -> int:
    """Fine-tuning rows one optimizer step consumes (padded rows; packed: sequences)."""
    return cfg.train.micro_batch_size * cfg.train.grad_accum * cfg.train.num_workers


def seen_by_points(ctx: Context) -> list[CurvePoint]:
    """The curve's points with what each trained point had seen: steps x samples per step, out
    of its method's training rows (the build manifest's ``train_rows``)."""
    out = []
    for point in curve_points(ctx.config):
        if not point.step:
            out.append(point)
            continue
        trained = method(point.line.removesuffix(REMINDER_SUFFIX))
        seen = None if ctx.config.train.packing else point.step * samples_per_step(ctx.config)
        out.append(dataclasses.replace(point, samples_seen=seen,
                                       train_rows=_train_rows(ctx, f"{trained.folder}build")))
    return out


def curve_training(cfg: Config) -> dict[str, str | int]:
    """Which source rows every point's training drew on, for the curve's report."""
    def rows_of(source) -> str:
        last = "end" if source.limit is None else source.offset + source.limit - 1
        return f"{source.path} rows {source.offset}-{last}"

    return {"induction prompts": rows_of(cfg.data.harmful),
            "helpful samples": f"{cfg.build.helpful_ratio:g} per induced prompt, drawn (seed "
                               f"{cfg.build.seed}) from {rows_of(cfg.data.helpful)}",
            "analyses": "all" if not cfg.build.drop_analyses else
                        f"without those {cfg.build.drop_analyses.replace('_', ' ')} (offline judge)",
            "samples per optimizer step": samples_per_step(cfg),
            "fine-tuning": "full" if cfg.train.lora is None else f"LoRA r={cfg.train.lora.r}",
            "learning rate": str(cfg.train.lr)}


def _budgeted(ctx: Context, steps: int | None, rows: int) -> Context:
    """The paper's equal training budget: every method takes ``steps`` optimizer steps on its
    ``rows`` training rows (more epochs when it has fewer rows, a step cap when it has more)."""
    if steps is None:
        return ctx
    cfg = ctx.config
    # a learning curve's budget is its largest point, whatever train.max_steps says
    limit = steps if cfg.compare.steps else min(steps, cfg.train.max_steps or steps)
    if cfg.train.packing:  # packed epochs have no step count known here: the step cap decides
        epochs = max(cfg.train.epochs, limit)
    else:
        per_epoch = max(total_steps(cfg.train.model_copy(update={"epochs": 1, "max_steps": None}),
                                    rows), 1)
        epochs = max(cfg.train.epochs, math.ceil(limit / per_epoch))
    train = cfg.train.model_copy(update={"max_steps": limit, "epochs": epochs,
                                         "export_at_steps": cfg.compare.steps})
    return dataclasses.replace(ctx, config=cfg.model_copy(update={"train": train}))


def compare_plan(cfg: Config) -> list[Stage]:
    """Every stage of the comparison, in order: shared generation, each trained method's build
    and train, the evaluation (its inputs: the models actually trained), the judging."""
    trained = [method_stages(m) for m in trained_methods(cfg)]
    from ray_align.stages import STAGES

    # the baselines' data (harmless answers, critiques, revisions) only for the methods it trains
    names = [m for m in trained_methods(cfg) if m != "mistake_analysis"]
    shared = [STAGES[name] for name in ("induce", *(("analyze",) if trained else ()),
                                        *(("baselines",) if names else ()))]
    evaluate = STAGES["compare/evaluate"]
    # The reminder setting decides which rows are asked, so it is part of the answers' identity
    # (the training stages' sections do not hold it: changing it retrains nothing).
    evaluate = dataclasses.replace(evaluate, inputs=tuple(t.name for _, t in trained),
                                   sections=tuple(dict.fromkeys((*evaluate.sections,
                                                                 "compare.reminder", "compare.steps"))))
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
    curve = bool(cfg.compare.steps)  # every method, mistake analysis too, to the largest point
    trains = {t.name: b.name for b, t in map(method_stages, trained) if curve or t.name != "train"}
    for stage in compare_plan(cfg):
        if stage.name not in trains:
            run_stage(ctx, stage)
            continue
        ma_steps = "mistake_analysis" in trained and not curve
        budget = _final_step(cfg) if curve else (_steps_taken(ctx) if ma_steps else None)
        run_stage(_budgeted(ctx, budget, _train_rows(ctx, trains[stage.name])), stage)
