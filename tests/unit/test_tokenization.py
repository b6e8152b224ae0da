"""Chat tokenization: prompts through the template, targets ending with its end-of-turn token,
loss on target tokens only, the pad id, and no torch imported for any of it."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest

from ray_align.assets import MODEL_NAME, asset_home
from ray_align.tokenization import (
    chat_prompt_ids,
    chat_prompt_ids_batch,
    encode_sample,
    load_tokenizer,
    pad_token_id,
)

QUESTION = [{"role": "user", "content": "Why is the sky blue?"}]
TARGET = "Rayleigh scattering."

# Renders an answered assistant turn differently from the opened one ("assistant answer" vs
# "assistant"): the prompt's ids are no prefix of the conversation's.
UNSTABLE_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant answer\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# Ends turns with plain text, no special token.
PLAIN_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}")


@pytest.fixture
def smol():
    """A fresh SmolLM2 tokenizer (not the cached one: some tests change it)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(asset_home() / MODEL_NAME)


def test_importing_tokenization_imports_no_torch():
    code = "import sys, ray_align.tokenization; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("messages", [
    QUESTION,
    [{"role": "system", "content": "Be brief."}, *QUESTION],
    [*QUESTION, {"role": "assistant", "content": "Light."}, {"role": "user", "content": "More?"}],
])
def test_smollm2_prompt_ids_are_a_prefix_of_the_answered_conversation(smol, messages):
    prompt = chat_prompt_ids(smol, messages)
    answered = smol.apply_chat_template([*messages, {"role": "assistant", "content": TARGET}],
                                        tokenize=True, add_generation_prompt=False)["input_ids"]
    assert list(answered[: len(prompt)]) == prompt
    ids, prompt_len = encode_sample(smol, messages, TARGET)
    assert ids == list(answered[:-1])  # the conversation, less the newline after <|im_end|>


def test_the_target_ends_with_the_templates_end_of_turn(smol):
    ids, prompt_len = encode_sample(smol, QUESTION, TARGET)
    assert ids[:prompt_len] == chat_prompt_ids(smol, QUESTION)
    assert smol.convert_ids_to_tokens(ids[-1]) == "<|im_end|>"
    assert smol.decode(ids[prompt_len:]) == TARGET + "<|im_end|>"
    assert "Why is the sky blue?" in smol.decode(ids[:prompt_len])


def test_the_end_of_turn_is_the_templates_not_end_of_sequence(smol):
    """A model whose end of sequence differs from its template's end of turn (as many base
    models' do) still learns to end its turn the way generation expects."""
    smol.eos_token = "<|endoftext|>"
    ids, prompt_len = encode_sample(smol, QUESTION, TARGET)
    assert smol.decode(ids[prompt_len:]) == TARGET + "<|im_end|>"
    assert smol.eos_token_id not in ids


def test_loss_falls_on_the_target_tokens_only(smol):
    from ray_align.training.core import IGNORE_INDEX, collate

    ids, prompt_len = encode_sample(smol, QUESTION, TARGET)
    labels = collate([(ids, prompt_len), (ids[:-3], prompt_len)], pad_token_id(smol))["labels"]
    assert [i for i, v in enumerate(labels[0].tolist()) if v != IGNORE_INDEX] == \
        list(range(prompt_len, len(ids)))
    assert smol.decode([v for v in labels[0].tolist() if v != IGNORE_INDEX]) == TARGET + "<|im_end|>"
    assert (labels[1, len(ids) - 3:] == IGNORE_INDEX).all()  # padding


def test_a_template_that_is_not_prefix_stable_tokenizes_the_target_alone(smol):
    smol.chat_template = UNSTABLE_TEMPLATE
    ids, prompt_len = encode_sample(smol, QUESTION, TARGET)
    assert ids[:prompt_len] == chat_prompt_ids(smol, QUESTION)
    assert smol.decode(ids[:prompt_len]).endswith("<|im_start|>assistant\n")
    target = smol(TARGET, add_special_tokens=False)["input_ids"]
    assert ids[prompt_len:] == [*target, smol.convert_tokens_to_ids("<|im_end|>")]


def test_a_template_without_an_end_of_turn_token_ends_with_end_of_sequence(smol):
    smol.chat_template = PLAIN_TEMPLATE
    smol.eos_token = "<|endoftext|>"
    ids, prompt_len = encode_sample(smol, QUESTION, TARGET)
    assert ids[-1] == smol.eos_token_id
    assert smol.decode(ids[prompt_len:-1]).strip() == TARGET


def test_pad_id_falls_back_to_end_of_sequence_but_keeps_a_pad_id_of_zero():
    assert pad_token_id(SimpleNamespace(pad_token_id=0, eos_token_id=2)) == 0
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=2)) == 2
    with pytest.raises(ValueError, match="neither a pad nor an end-of-sequence"):
        pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=None))


def test_a_tokenizer_is_loaded_once_and_from_object_storage_without_weights(monkeypatch):
    import ray_align.storage

    asked = []

    def local_copy(path, *, tokenizer_only=False):
        asked.append((path, tokenizer_only))
        return str(asset_home() / MODEL_NAME)

    monkeypatch.setattr(ray_align.storage, "local_model_path", local_copy)
    load_tokenizer.cache_clear()
    try:
        first = load_tokenizer("s3://bucket/models/smol", False)
        assert load_tokenizer("s3://bucket/models/smol", False) is first
        assert asked == [("s3://bucket/models/smol", True)]
    finally:
        load_tokenizer.cache_clear()


def test_prompts_tokenized_in_one_batch_equal_one_at_a_time(smol):
    conversations = [
        QUESTION,
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <|im_end|>"}],
        [{"role": "user", "content": "Où est la gare ? 東京 🚉"},
         {"role": "assistant", "content": "Tout droit."}, {"role": "user", "content": "Merci"}],
        [{"role": "user", "content": ""}],
    ]
    assert chat_prompt_ids_batch(smol, conversations) == [chat_prompt_ids(smol, c) for c in conversations]
    assert chat_prompt_ids_batch(smol, []) == []
