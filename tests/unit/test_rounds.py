"""Iterative rounds (``rounds: N``) without Ray: the plan, each round's model and prompts, its
own stages and resume, the evaluation of every round's model, and the summary."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

from ray_align.pipeline import StageOutput, run_stage, write_run_summary
from ray_align.rounds import harmful_source, pipeline_plan, round_config
from ray_align.stages import PIPELINE, STAGES, analyze, evaluate, induce
from tests.unit.conftest import as_table, fake_generate


def test_the_plan_runs_each_later_round_after_round_one_and_evaluates_every_model(ctx):
    ctx.config.rounds = 3
    plan = {s.name: s for s in pipeline_plan(ctx.config, STAGES, PIPELINE)}
    assert list(plan) == ["induce", "analyze", "build", "train",
                          "round2/induce", "round2/analyze", "round2/build", "round2/train",
                          "round3/induce", "round3/analyze", "round3/build", "round3/train",
                          "evaluate"]
    assert plan["round2/induce"].inputs == ("train",)  # a retrained model redoes later rounds
    assert plan["round3/induce"].inputs == ("round2/train",)
    assert plan["round3/train"].inputs == ("round3/build",)
    assert plan["evaluate"].inputs == ("train", "round2/train", "round3/train")
    ctx.config.rounds = 1
    assert [s.name for s in pipeline_plan(ctx.config, STAGES, PIPELINE)] == list(PIPELINE)


def test_round_k_starts_from_the_model_before_it_on_the_next_window_of_prompts(ctx):
    ctx.config.data.harmful.limit, ctx.config.data.harmful.offset = 2, 1
    assert harmful_source(ctx.config, 1) is ctx.config.data.harmful
    assert harmful_source(ctx.config, 3).offset == 5
    second = round_config(ctx.config, ctx.run, 2)
    assert second.model.path == ctx.run.uri_of("train", "model")
    assert round_config(ctx.config, ctx.run, 3).model.path == ctx.run.uri_of("round2/train", "model")
    assert second.data.harmful.offset == 3 and second.train == ctx.config.train


def _fake_train(ctx):
    """Stands in for Ray Train: exports the tokenizer and a config that records what it was
    trained from (the next round's build tokenizes with it)."""
    source = Path(ctx.config.model.path)
    for path in source.iterdir():  # the tokenizer and its chat template
        if path.suffix != ".safetensors":
            ctx.run.write_bytes(path.read_bytes(), "train", "model", path.name)
    ctx.run.write_json({"trained_from": str(source)}, "train", "model", "config.json")
    return StageOutput(1, "model", {"global_step": 1})


def test_each_round_has_its_own_stages_prompts_and_resume(ctx, monkeypatch, capsys):
    cfg = ctx.config
    cfg.rounds, cfg.data.harmful.limit = 4, 2  # 6 prompts: rounds 1-3 fresh, round 4 reuses round 1's
    asked: dict[str, set] = {}

    def reply(key, messages):
        if "::" in key:  # induce's answers
            return "Sure, here is how to do it step by step."
        return "This is harmful because it helps."

    def recording(run_dir, folder, requests, model, *args, **kwargs):
        requests = as_table(requests)
        asked.setdefault(f"{run_dir.uri}|{model.path}", set()).update(
            k.split("::")[0] for k in requests.column("key").to_pylist())
        return fake_generate(reply)(run_dir, folder, requests, model, *args, **kwargs)

    monkeypatch.setattr(induce, "generate", recording)
    monkeypatch.setattr(analyze, "generate", fake_generate(reply))
    stages = {**STAGES, "train": dataclasses.replace(STAGES["train"], compute=_fake_train)}
    plan = pipeline_plan(cfg, stages, PIPELINE[:4])
    for stage in plan:
        run_stage(ctx, stage)
    run = ctx.run
    for k, (ids, trained_from) in {
        2: ({"h2", "h3"}, run.uri_of("train", "model")),
        3: ({"h4", "h5"}, run.uri_of("round2/train", "model")),
        4: ({"h0", "h1"}, run.uri_of("round3/train", "model")),
    }.items():
        induced = set(run.read_tables(f"round{k}/induce", "data").column("id").to_pylist())
        assert induced == ids, k
        assert asked[f"{run.uri_of(f'round{k}')}|{trained_from}"] == ids  # the model before it
        assert run.read_json(f"round{k}/train", "model", "config.json")["trained_from"] == trained_from
        assert run.read_json(f"round{k}/build", "manifest.json")["status"] == "complete"
    assert "round 4 induces on round 1's prompts again" in capsys.readouterr().out

    for stage in plan:  # a rerun skips every round's stages
        run_stage(ctx, stage)
    assert capsys.readouterr().out.count("complete in an earlier run: skipped") == 16

    summary = write_run_summary(run, [s.name for s in pipeline_plan(cfg, stages, PIPELINE)])
    assert summary["model_dir"] == run.uri_of("round4/train", "model")
    assert summary["stages"]["round3/analyze"]["status"] == "complete"


def test_evaluate_asks_every_rounds_model_and_the_last_one_is_the_aligned_model(ctx):
    ctx.config.rounds = 3
    ctx.config.engine.serve_adapters = True  # round 1's adapter rides on the base model
    ctx.run.write_json({"r": 8}, "train", "adapter", "adapter_config.json")
    ctx.run.write_json({"r": 8}, "round2/train", "adapter", "adapter_config.json")
    answerers = {a.variant: a for a in evaluate._answerers(ctx)}
    assert list(answerers) == ["base", "round1", "round2", "aligned", "aligned+reminder"]
    assert answerers["round1"].adapter == "train/adapter"
    # a later round's adapter was trained on the round before's model, never on the base
    assert answerers["round2"].adapter is None
    assert answerers["round2"].model.path == ctx.run.uri_of("round2/train", "model")
    assert answerers["aligned"].model.path == ctx.run.uri_of("round3/train", "model")


def test_no_rounds_prompt_may_be_a_held_out_one(ctx, monkeypatch, tiny_model):
    ctx.config.rounds, ctx.config.data.harmful.limit = 2, 3
    shutil.copytree(tiny_model, ctx.run.path("train", "model"))  # round 1's export
    ctx.config.evaluate.harmful[0].offset = 3  # round 2 induces on h3-h5: these
    monkeypatch.setattr(induce, "generate", fake_generate(lambda k, m: "Sure"))
    induce.induce(ctx)
    assert evaluate.held_out_sets(ctx)[0]  # round 1 alone: no overlap
    second = dataclasses.replace(ctx, config=round_config(ctx.config, ctx.run, 2))
    second = dataclasses.replace(second, run=type(ctx.run)(ctx.run.uri_of("round2")))
    induce.induce(second)
    with pytest.raises(ValueError, match="shares 3 prompts with the training prompts"):
        evaluate.held_out_sets(ctx)
