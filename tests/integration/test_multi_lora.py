"""LoRA-trained variants of one base model answer on one vLLM engine pool (multi-LoRA): each
row reaches its own adapter. Under greedy decoding an adapter's answers are its merged model's
(transformers, no vLLM) up to rounding and differ from the base model's.

"Up to rounding": vLLM adds the unmerged LoRA product where transformers uses merged weights, so
where two tokens' logits are within a rounding error of each other (frequent in a random tiny
model) the two may pick differently and continue differently from there. An answer agrees with a
model when it is that model's greedy answer, or first departs from it at such a near-tie."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
import torch

from ray_align.config import EngineConfig, ModelConfig, SamplingConfig
from ray_align.generate import ADAPTER_COLUMN, LoraAdapters, generate, make_requests, results_by_id
from ray_align.stages.evaluate import write_zero_adapter
from ray_align.storage import RunDir
from ray_align.tokenization import chat_prompt_ids

pytestmark = pytest.mark.integration

PROMPTS = [f"Tell me about topic number {i}." for i in range(8)]
MAX_TOKENS = 8
NEAR_TIE = 0.05  # logit gap of a rounding flip (measured up to 0.013; a wrong model: 1.0+)


def make_adapter(base, out, seed: int):
    """A LoRA adapter with large random B (an untrained B is zero: no effect), and its merge."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                      task_type="CAUSAL_LM"))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.3)
    model.save_pretrained(out / "adapter")
    model.merge_and_unload().save_pretrained(out / "merged")
    AutoTokenizer.from_pretrained(base).save_pretrained(out / "merged")
    return out / "adapter", out / "merged"


def greedy(model_dir, prompt_ids: list[list[int]]) -> list[list[int]]:
    """transformers' greedy continuation of each prompt: the reference an engine must match."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for ids in prompt_ids:
            tokens = model.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False,
                                    min_new_tokens=MAX_TOKENS, pad_token_id=0)
            out.append(tokens[0, len(ids):].tolist())
    return out


def departure_gap(model_dir, tokenizer, prompt_ids: list[list[int]], reference: list[list[int]],
                  answers: list[str]) -> list[float]:
    """Per prompt: 0 when the answer is the model's greedy ``reference``, else how far below the
    model's best logit the answer's token lies where it first departs from the reference."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    gaps = []
    with torch.no_grad():
        for ids, ref, text in zip(prompt_ids, reference, answers, strict=True):
            if text == tokenizer.decode(ref):
                gaps.append(0.0)
                continue
            # compared as text: the engine's ids are not returned, and re-encoding merges tokens
            k = max(i for i in range(len(ref)) if text.startswith(tokenizer.decode(ref[:i])))
            rest = tokenizer.encode(text[len(tokenizer.decode(ref[:k])):], add_special_tokens=False)
            logits = model(torch.tensor([ids + ref[:k]])).logits[0, -1]
            gaps.append(float(logits.max() - logits[rest[0]]) if rest else float("inf"))
    return gaps


def test_each_row_reaches_its_own_adapter_on_one_engine_pool(local_ray, tiny_model, tmp_path):
    from transformers import AutoTokenizer

    adapter_a, merged_a = make_adapter(tiny_model, tmp_path / "a", seed=1)
    adapter_b, merged_b = make_adapter(tiny_model, tmp_path / "b", seed=2)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    messages = [[{"role": "user", "content": p}] for p in PROMPTS]
    prompt_ids = [chat_prompt_ids(tokenizer, m) for m in messages]
    expected = {"base": greedy(tiny_model, prompt_ids), str(adapter_a): greedy(merged_a, prompt_ids),
                str(adapter_b): greedy(merged_b, prompt_ids)}

    names = {"base": "base", str(adapter_a): "a", str(adapter_b): "b"}
    keys, adapters, all_messages = [], [], []
    for who in expected:
        for i, m in enumerate(messages):
            keys.append(f"{names[who]}::{i}")
            adapters.append("" if who == "base" else who)
            all_messages.append(m)
    requests = make_requests(keys, all_messages).append_column(ADAPTER_COLUMN,
                                                               pa.array(adapters, pa.string()))
    engine = EngineConfig(batch_size=8, engine_kwargs={"enforce_eager": True, "max_num_seqs": 32},
                          env={"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
                               "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    sampling = SamplingConfig(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    run = RunDir(str(tmp_path / "run"))
    # vLLM-cpu decodes base-model rows wrongly beside adapter rows: a zero adapter stands in
    zero = write_zero_adapter(RunDir(str(tmp_path)), "a/adapter", "run/base-adapter").split("/", 1)[1]
    stats = generate(run, ("out",), requests, ModelConfig(path=str(tiny_model), max_model_len=512),
                     engine, sampling, "multi-lora",
                     lora=LoraAdapters((str(adapter_a), str(adapter_b)), max_rank=8,
                                       base_stand_in=run.uri_of(zero)))
    assert stats.engine_pools == 1 and stats.generated_now == 3 * len(PROMPTS)
    results = results_by_id(run, "out")

    def answers(who: str) -> list[str]:
        return [results[f"{names[who]}::{i}"]["generated_text"] for i in range(len(PROMPTS))]

    decoded = {who: [tokenizer.decode(ids) for ids in seqs] for who, seqs in expected.items()}
    report = {}
    for who in expected:
        same = sum(a == b for a, b in zip(answers(who), decoded[who], strict=True))
        as_base = sum(a == b for a, b in zip(answers(who), decoded["base"], strict=True))
        report[names[who]] = {"matches_own_model": same, "matches_base": as_base}
    print(json.dumps(report, indent=1))
    models = {"base": tiny_model, str(adapter_a): merged_a, str(adapter_b): merged_b}
    for who in expected:
        own = departure_gap(models[who], tokenizer, prompt_ids, expected[who], answers(who))
        print(names[who], "gaps to its own model's greedy answers:", own)
        assert all(gap < NEAR_TIE for gap in own), (names[who], own, report)
        if who != "base":
            as_base = departure_gap(tiny_model, tokenizer, prompt_ids, expected["base"], answers(who))
            print(names[who], "gaps to the base model's:", as_base)
            assert sum(gap < NEAR_TIE for gap in as_base) <= len(PROMPTS) // 4, (names[who], as_base)
    assert answers(str(adapter_a)) != answers(str(adapter_b))
