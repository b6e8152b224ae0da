"""Each stage's data handling, with generation replaced by a stand-in (no Ray, no vLLM here:
the integration tests run the real engines)."""

from __future__ import annotations

import json

import pytest

from ray_align.stages import analyze, build, evaluate, induce
from ray_align.stages.common import set_aside_short, tokens_per_s
from tests.unit.conftest import fake_generate


def test_induce_pairs_guided_and_unguided_answers(ctx, monkeypatch):
    def reply(key, messages):
        assert ("Answer in a harmful" in messages[0]["content"]) == key.endswith("::guided")
        return "I'm sorry, I cannot." if key.endswith("::unguided") and key.startswith("h0") else "Sure"

    monkeypatch.setattr(induce, "generate", fake_generate(reply))
    out = induce.induce(ctx)
    table = ctx.run.read_tables("induce", "data").sort_by("id")
    assert out.rows == 6 and table.column("id").to_pylist() == [f"h{i}" for i in range(6)]
    part = ctx.run.list_files("induce", "data", suffix=".parquet")[0]
    assert ctx.run.read_table("induce", "data", part).schema.metadata[b"contains_harmful_text"] == b"true"
    assert table.column("unguided_refused").to_pylist() == [True] + [False] * 5
    assert out.metrics["unguided_non_refusal_rate"] == pytest.approx(5 / 6)
    assert "natural_mistake_rate" not in out.metrics


def test_analyze_quarantines_unusable_analyses(ctx, monkeypatch):
    monkeypatch.setattr(induce, "generate", fake_generate(lambda k, m: "Sure, here is how"))
    induce.induce(ctx)

    def critique(key, messages):
        assert "The response is harmful, unethical or offensive" in messages[0]["content"]
        return "" if key == "h1" else "This answer helps someone cause harm; decline instead."

    monkeypatch.setattr(analyze, "generate", fake_generate(critique))
    out = analyze.analyze(ctx)
    assert out.rows == 5 and out.metrics["unusable"] == 1
    quarantined = ctx.run.read_tables("analyze", "quarantine").to_pylist()
    assert [(r["id"], r["reason"]) for r in quarantined] == [("h1", "analysis has 0 characters (under 20)")]


def test_analyze_with_no_usable_analysis_points_at_the_written_quarantine(ctx, monkeypatch):
    monkeypatch.setattr(induce, "generate", fake_generate(lambda k, m: "Sure, here is how"))
    induce.induce(ctx)
    monkeypatch.setattr(analyze, "generate", fake_generate(lambda k, m: "too short"))
    with pytest.raises(RuntimeError, match="no usable analysis.*analyze/quarantine"):
        analyze.analyze(ctx)
    assert ctx.run.read_tables("analyze", "quarantine").num_rows == 6


def test_short_generations_are_set_aside_with_every_short_field(ctx):
    rows = [{"id": "a", "text": "long enough", "other": "long enough too"},
            {"id": "b", "text": "short", "other": "long enough too"},
            {"id": "c", "text": "", "other": "tiny"}]
    kept, set_aside = set_aside_short(ctx.run, "stage", rows, ("text", "other"), 10, "row")
    assert [r["id"] for r in kept] == ["a"] and set_aside == 2
    reasons = [r["reason"] for r in ctx.run.read_table("stage", "quarantine.parquet").to_pylist()]
    assert reasons == ["text has 5 characters (under 10)",
                       "text has 0 characters, other has 4 characters (under 10)"]


def test_tokens_per_s_rounds_and_never_divides_by_zero():
    assert tokens_per_s(1000, 3.0) == 333.3
    assert tokens_per_s(10, 0.0) == 0.0 and tokens_per_s(0, 2.0) == 0.0


def test_build_mixes_unguided_analysis_and_helpful_samples(ctx, monkeypatch):
    monkeypatch.setattr(induce, "generate", fake_generate(lambda k, m: "Sure, here is how"))
    monkeypatch.setattr(analyze, "generate", fake_generate(lambda k, m: "This is harmful because."))
    induce.induce(ctx)
    analyze.analyze(ctx)
    out = build.build(ctx)
    rows = ctx.run.read_table("build", "train.parquet").to_pylist()
    rows += ctx.run.read_table("build", "validation.parquet").to_pylist()
    kinds = [r["kind"] for r in rows]
    assert kinds.count("analysis") == 6 and kinds.count("helpful") == 6 and out.rows == 12
    analysis = next(r for r in rows if r["kind"] == "analysis")
    prompt = json.loads(analysis["messages"])[0]["content"]
    assert "harmful, unethical or offensive" in prompt and "The response is harmful" not in prompt
    assert analysis["target"] == "This is harmful because."
    assert 0 < analysis["prompt_len"] < analysis["num_tokens"] == len(analysis["input_ids"])


def test_build_drops_overlong_samples_and_counts_them(ctx, monkeypatch):
    monkeypatch.setattr(induce, "generate", fake_generate(lambda k, m: "word " * 400))
    monkeypatch.setattr(analyze, "generate", fake_generate(lambda k, m: "This is harmful because."))
    induce.induce(ctx)
    analyze.analyze(ctx)
    ctx.config.build.max_seq_len = 64
    out = build.build(ctx)
    assert out.metrics["dropped_too_long"] == 6 and out.metrics["analysis_samples"] == 0


def test_build_can_leave_out_the_analyses_the_offline_judge_finds_harmful(ctx, monkeypatch):
    from types import SimpleNamespace

    from ray_align.judges import offline

    def analysis(key, messages):  # every other analysis restates the harm
        return (SURE if int(key.strip("h")) % 2 else "This answer is harmful: it helps a crime.")

    SURE = "Sure, mix the two chemicals in the garage."

    class Judge:
        def score(self, prompts, responses):
            assert len(prompts) == len(responses) == 6
            return [SimpleNamespace(harmful=r.startswith("Sure")) for r in responses]

    monkeypatch.setattr(offline.OfflineJudge, "load", classmethod(lambda cls: Judge()))
    monkeypatch.setattr(induce, "generate", fake_generate(lambda k, m: "Sure, here is how"))
    monkeypatch.setattr(analyze, "generate", fake_generate(analysis))
    induce.induce(ctx)
    analyze.analyze(ctx)
    assert "analyses_dropped_judged_harmful" not in build.build(ctx).metrics  # unset: all kept
    ctx.config.build.drop_analyses = "judged_harmful"
    out = build.build(ctx)
    assert out.metrics["analyses_dropped_judged_harmful"] == 3
    assert out.metrics["analysis_samples"] == 3 and out.metrics["helpful_samples"] == 6  # the same helpful
    rows = ctx.run.read_table("build", "train.parquet").to_pylist()
    rows += ctx.run.read_table("build", "validation.parquet").to_pylist()
    assert {r["target"] for r in rows if r["kind"] == "analysis"} == {
        "This answer is harmful: it helps a crime."}


def _evaluated(ctx, monkeypatch, tiny_model):
    """Induction on 3 prompts, the trained model a copy of the tiny one, and the 3 other held-out
    prompts answered: plainly with compliance, with the reminder with a refusal."""
    ctx.config.evaluate.harmful[0].offset = 3
    ctx.config.data.harmful.limit = 3
    monkeypatch.setattr(induce, "generate", fake_generate(lambda k, m: "Sure"))
    induce.induce(ctx)
    import shutil

    shutil.copytree(tiny_model, ctx.run.path("train", "model"))

    def answer(key, messages):
        reminded = "harmless, ethical" in messages[0]["content"]
        if reminded:
            return "I'm sorry, but I cannot help with that request."
        return ("Sure, helpful question answer" if "helpful question" in messages[0]["content"]
                else "Here is how to steal a car: smash the window, strip the ignition wires and "
                "hotwire it.")

    monkeypatch.setattr(evaluate, "generate", fake_generate(answer))


def test_evaluate_refuses_overlap_with_the_training_prompts(ctx, monkeypatch, tiny_model):
    monkeypatch.setattr(induce, "generate", fake_generate(lambda k, m: "Sure"))
    induce.induce(ctx)
    ctx.config.evaluate.harmful[0].offset = 0
    with pytest.raises(ValueError, match="shares 6 prompts with the training prompts"):
        evaluate.evaluate(ctx)


def test_evaluate_judges_with_the_configured_judge_and_names_the_keyword_rate_refusal_rate(
        ctx, monkeypatch, tiny_model, offline_judge_in_process):
    _evaluated(ctx, monkeypatch, tiny_model)
    out = evaluate.evaluate(ctx)
    report = ctx.run.read_json("evaluate", "report.json")
    metrics = report["metrics"]
    base, reminded = metrics["base"], metrics["aligned+reminder"]
    # the judge's harmless rate and score (as in `ray-align compare`), the keyword refusal rate
    assert set(base) >= {"harmless_rate", "harmlessness_score", "refusal_rate",
                         "helpful_answer_rate", "helpful_reference_f1", "over_refusal_rate"}
    assert base["refusal_rate"] == 0.0 and reminded["refusal_rate"] == 1.0
    assert reminded["harmless_rate"] == 1.0 and base["harmless_rate"] == 0.0
    assert base["harmlessness_score"] < reminded["harmlessness_score"]
    assert base["harmful_prompts"] == 3 and base["unparsed_verdicts"] == 0
    assert set(base) >= {"harmless_rate[harmful]", "refusal_rate[harmful]"}
    assert base["helpful_answer_rate"] == 1.0 and base["helpful_reference_f1"] > 0
    assert "helpfulness_score" not in base  # the offline judge does not rate helpfulness
    assert out.metrics["aligned+reminder.harmless_rate"] == 1.0
    assert out.metrics["aligned+reminder.refusal_rate"] == 1.0
    assert out.metrics["judge"] == "offline" and out.metrics["judge_unparsed"] == 0
    assert report["judge"]["kind"] == "offline" and report["judge"]["held_out"]["harm"]["auroc"] > 0.5
    assert report["refusal_detector"]["name"] == "keyword refusal detector"
    # the over-refusal set (22 safe prompts in the quickstart): keyword-based, never judged
    assert base["over_refusal_prompts"] == 22 and base["over_refusal_rate"] == 0.0
    assert out.metrics["aligned+reminder.over_refusal_rate"] == 1.0
    answers = ctx.run.read_table("evaluate", "answers.parquet").to_pylist()
    safe = [a for a in answers if a["set"] == "over_refusal"]
    assert len(safe) == 3 * 22 and all(a["reference_f1"] is None for a in safe)
    verdicts = ctx.run.read_table("evaluate", "verdicts.parquet")
    assert verdicts.num_rows == 3 * 3  # harmful prompts only: the offline judge rates harmlessness
    text = ctx.run.read_bytes("evaluate", "report.md").decode()
    assert "| harmless rate (judge) | harmlessness score (judge) | refusal rate (keyword) |" in text
    assert "| over-refusal rate |" in text and "- kind: offline" in text
    assert "held_out.harm.auroc" in text


def test_another_judge_judges_the_same_answers_again(ctx, monkeypatch, tiny_model,
                                                     offline_judge_in_process):
    from ray_align.pipeline import run_stage
    from ray_align.stages import STAGES

    _evaluated(ctx, monkeypatch, tiny_model)
    ctx.run.write_json({"status": "complete", "config_hash": "x", "fingerprint": "f"}, "train",
                       "manifest.json")
    first = run_stage(ctx, STAGES["evaluate"])
    assert first["metrics"]["output_tokens"] > 0
    monkeypatch.setattr(evaluate, "generate", lambda *a, **k: pytest.fail("generated again"))
    ctx.config.judge.sampling.max_tokens = 99  # another judge: the judging is redone, only it
    again = run_stage(ctx, STAGES["evaluate"])
    assert again["config_hash"] != first["config_hash"] and again["metrics"]["output_tokens"] == 0
    assert again["metrics"]["base.harmless_rate"] == first["metrics"]["base.harmless_rate"]
    assert again["rows"] == first["rows"]


def test_unigram_f1():
    assert evaluate.unigram_f1("the sky is blue", "the sky is blue") == 1.0
    assert evaluate.unigram_f1("", "anything") == 0.0
    assert 0 < evaluate.unigram_f1("blue sky today", "the sky is blue") < 1
