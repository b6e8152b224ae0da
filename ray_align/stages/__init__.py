"""The method's steps as pipeline stages, in order (Chen et al., ICLR 2024, section 3)."""

from ray_align.pipeline import Stage
from ray_align.stages.analyze import analyze
from ray_align.stages.build import build
from ray_align.stages.evaluate import evaluate
from ray_align.stages.induce import induce
from ray_align.stages.train import train

STAGES: dict[str, Stage] = {
    "induce": Stage("induce", ("model", "data.harmful", "data.max_prompt_chars", "data.on_bad_row",
                               "engine", "induce"), (), induce),
    "analyze": Stage("analyze", ("model", "engine", "analyze"), ("induce",), analyze),
    "build": Stage("build", ("model", "data.helpful", "data.max_prompt_chars", "data.on_bad_row",
                             "build"), ("analyze",), build),
    "train": Stage("train", ("model", "train"), ("build",), train),
    "evaluate": Stage("evaluate", ("model", "engine", "evaluate"), ("train",), evaluate),
}
