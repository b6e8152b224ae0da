"""Iterative rounds of the method (``rounds: N``): round k+1 induces mistakes from, analyzes
with and fine-tunes round k's model, so each round learns from the mistakes the last one still
makes.

Round 1 is the pipeline's own stages (``induce`` ... ``train``); round k > 1 runs the same steps
in ``RUN/round<k>/`` (``round2/induce`` ... ``round2/train``), each with its own manifest and
resume. Round k asks the next ``data.harmful.limit`` prompts of the source (offset moved by
k - 1 limits) when the source has them, else the same prompts as round 1 (said when it runs).
``evaluate`` scores every round's model.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

from ray_align.config import Config, SourceConfig
from ray_align.pipeline import Context, Stage, StageOutput
from ray_align.storage import RunDir

ROUND_STEPS = ("induce", "analyze", "build", "train")


def round_folder(k: int) -> str:
    """The prefix of round ``k``'s stages (round 1: the pipeline's own folders)."""
    return "" if k == 1 else f"round{k}/"


def train_stage_of(k: int) -> str:
    """Where round ``k``'s model is trained (and exported, in its ``model/``)."""
    return f"{round_folder(k)}train"


def induced_instructions(run: RunDir, rounds: int) -> set[str]:
    """Every prompt a round has induced on so far: none may be a held-out evaluation prompt."""
    seen: set[str] = set()
    for k in range(1, rounds + 1):
        folder = f"{round_folder(k)}induce"
        if run.exists(folder, "data"):
            seen.update(run.read_tables(folder, "data", columns=["instruction"])
                        .column("instruction").to_pylist())
    return seen


def harmful_source(cfg: Config, k: int) -> SourceConfig:
    """Round ``k``'s induction prompts: the ``k``-th window of ``data.harmful.limit`` rows from
    the configured offset. Without a limit every round uses the whole source."""
    source = cfg.data.harmful
    if k == 1 or source.limit is None:
        return source
    return source.model_copy(update={"offset": source.offset + (k - 1) * source.limit})


def round_config(cfg: Config, run: RunDir, k: int) -> Config:
    """The config round ``k`` runs with: round ``k - 1``'s exported model, its own prompts."""
    if k == 1:
        return cfg
    model = cfg.model.model_copy(update={"path": run.uri_of(train_stage_of(k - 1), "model")})
    data = cfg.data.model_copy(update={"harmful": harmful_source(cfg, k)})
    return cfg.model_copy(update={"model": model, "data": data})


def _in_round(k: int, step: Callable[[Context], StageOutput], ctx: Context,
              induces: bool = False) -> StageOutput:
    """Run a pipeline step for round ``k``: its config, and ``RUN/round<k>/`` as its run dir
    (so every step reads and writes its usual folder names there). Ray first, so the run's own
    context owns (and shuts down) any engine pool the round starts."""
    ctx.ensure_ray()
    sub = Context(config=round_config(ctx.config, ctx.run, k),
                  run=RunDir(ctx.run.uri_of(round_folder(k).rstrip("/"))),
                  _ray_ready=True, engines=ctx.engines)
    return step(_with_prompts_available(sub, k) if induces else sub)


def _with_prompts_available(sub: Context, k: int) -> Context:
    """Round ``k``'s own prompts when the source has enough rows past round ``k - 1``'s, else
    round 1's prompts again (printed: the round then learns from new mistakes on old prompts)."""
    from ray_align.sources import source_rows

    source = sub.config.data.harmful
    if source.limit is None or source_rows(source) >= source.offset + source.limit:
        return sub
    first = source.model_copy(update={"offset": source.offset - (k - 1) * source.limit})
    print(f"[{round_folder(k)}induce] {source.path} has no {source.limit} rows after row "
          f"{source.offset}: round {k} induces on round 1's prompts again", flush=True)
    data = sub.config.data.model_copy(update={"harmful": first})
    return dataclasses.replace(sub, config=sub.config.model_copy(update={"data": data}))


def round_stages(stages: dict[str, Stage], k: int) -> list[Stage]:
    """Round ``k``'s induce, analyze, build and train: the pipeline's stages under
    ``round<k>/``, induce reading round ``k - 1``'s model (its train stage is an input, so a
    retrained model redoes the later rounds)."""
    prefix, out = round_folder(k), []
    for name in ROUND_STEPS:
        stage = stages[name]
        inputs = (train_stage_of(k - 1),) if name == "induce" else tuple(
            prefix + upstream for upstream in stage.inputs)
        compute = functools.partial(_in_round, k, stage.compute, induces=name == "induce")
        out.append(dataclasses.replace(stage, name=prefix + name, inputs=inputs, compute=compute))
    return out


def pipeline_plan(cfg: Config, stages: dict[str, Stage], names: Sequence[str]) -> list[Stage]:
    """``ray-align run``'s stages in order: round 1 (``names``), the later rounds' steps after
    round 1's train, then evaluate, which reads every round's model."""
    plan: list[Stage] = []
    for name in names:
        if name == "evaluate":
            trains = tuple(train_stage_of(k) for k in range(1, cfg.rounds + 1))
            plan.append(dataclasses.replace(stages[name], inputs=trains))
            continue
        plan.append(stages[name])
        if name == "train":
            for k in range(2, cfg.rounds + 1):
                plan += round_stages(stages, k)
    return plan
