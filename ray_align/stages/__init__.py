"""The method's steps as pipeline stages, in order (Chen et al., ICLR 2024, section 3).

One module per step, each with a function of the same name: ``induce.induce`` and so on.
"""

from ray_align.pipeline import Stage
from ray_align.stages import analyze, build, evaluate, induce, train

GENERATION_SCRATCH = ("parts",)  # results written as they stream back (resume by request id)
TRAIN_SCRATCH = ("ray_train",)  # Ray Train's checkpoints (resume at the exact batch)

STAGES: dict[str, Stage] = {
    "induce": Stage("induce", ("model", "data.harmful", "data.max_prompt_chars", "data.on_bad_row",
                               "engine", "induce"), (), induce.induce, GENERATION_SCRATCH),
    "analyze": Stage("analyze", ("model", "engine", "analyze"), ("induce",), analyze.analyze,
                     GENERATION_SCRATCH),
    "build": Stage("build", ("model", "data.helpful", "data.max_prompt_chars", "data.on_bad_row",
                             "build"), ("analyze",), build.build),
    "train": Stage("train", ("model", "train"), ("build",), train.train, TRAIN_SCRATCH),
    "evaluate": Stage("evaluate", ("model", "engine", "evaluate"), ("train",), evaluate.evaluate,
                      GENERATION_SCRATCH),
}
