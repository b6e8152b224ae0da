"""The method's steps as pipeline stages, in order (Chen et al., ICLR 2024, section 3).

One module per step, each with a function of the same name: ``induce.induce`` and so on.
"""

from ray_align.pipeline import Stage
from ray_align.stages import analyze, build, evaluate, induce, train

STAGES: dict[str, Stage] = {
    "induce": Stage("induce", ("model", "data.harmful", "data.max_prompt_chars", "data.on_bad_row",
                               "engine", "induce"), (), induce.induce),
    "analyze": Stage("analyze", ("model", "engine", "analyze"), ("induce",), analyze.analyze),
    "build": Stage("build", ("model", "data.helpful", "data.max_prompt_chars", "data.on_bad_row",
                             "build"), ("analyze",), build.build),
    "train": Stage("train", ("model", "train"), ("build",), train.train),
    "evaluate": Stage("evaluate", ("model", "engine", "evaluate"), ("train",), evaluate.evaluate),
}
