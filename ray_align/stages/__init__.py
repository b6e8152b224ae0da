"""Every stage, registered once: the method's steps in order (Chen et al., ICLR 2024, section 3)
and the comparison's own stages (section 4). The CLI, ``ray-align run`` and ``ray-align compare``
all read this registry.

One module per step, each with a function of the same name: ``induce.induce`` and so on.
"""

from ray_align.pipeline import Stage
from ray_align.stages import analyze, baselines, build, compare, evaluate, induce, train

GENERATION_SCRATCH = ("parts",)  # results written as they stream back (resume by request id)
TRAIN_SCRATCH = ("ray_train",)  # Ray Train's checkpoints (resume at the exact batch)

PIPELINE: tuple[str, ...] = ("induce", "analyze", "build", "train", "evaluate")  # `ray-align run`

STAGES: dict[str, Stage] = {stage.name: stage for stage in (
    Stage("induce", ("model", "data.harmful", "data.max_prompt_chars", "data.on_bad_row", "engine",
                     "induce"), (), induce.induce, (*GENERATION_SCRATCH, "prompts")),
    Stage("analyze", ("model", "engine", "analyze"), ("induce",), analyze.analyze, GENERATION_SCRATCH),
    Stage("build", ("model", "data.helpful", "data.max_prompt_chars", "data.on_bad_row", "build"),
          ("analyze",), build.build),
    Stage("train", ("model", "train"), ("build",), train.train, TRAIN_SCRATCH),
    # the judge is part of the identity of the stages that judge; evaluate keeps the answers of
    # an attempt that only had another judge (``answers_of_an_earlier_judge``): it judges again
    Stage("evaluate", ("model", "engine", "evaluate", "judge"), ("train",), evaluate.evaluate,
          (*GENERATION_SCRATCH, "judge/parts")),
    # ray-align compare: the baselines' shared generation, every method asked and judged
    Stage("baselines", ("model", "engine", "compare.sampling"), ("induce",), baselines.baselines,
          GENERATION_SCRATCH),
    Stage("compare/evaluate", ("model", "engine", "evaluate", "compare.methods", "compare.attacks",
                               "compare.attack_limit"), (), compare.compare_evaluate,
          GENERATION_SCRATCH),
    Stage("compare/judge", ("compare", "judge"), ("compare/evaluate",), compare.compare_judge,
          GENERATION_SCRATCH),
)}
