"""Chat tokenization, one place for generation, the build stage and training: which tokens are
a prompt, which are a training target, and what pads a batch.

Nothing here imports torch (transformers only when a tokenizer is loaded), so the driver and the
generation path tokenize without paying for it.
"""

from __future__ import annotations

import functools
from typing import Any

Messages = list[dict[str, str]]


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str, trust_remote_code: bool = False):
    """A model's tokenizer, loaded once per process. A model on object storage is read from a
    local copy of its tokenizer files only (its weights are not downloaded for this)."""
    from transformers import AutoTokenizer

    from ray_align.storage import local_model_path

    return AutoTokenizer.from_pretrained(local_model_path(path, tokenizer_only=True),
                                         trust_remote_code=trust_remote_code)


def pad_token_id(tokenizer) -> int:
    """The id batches are padded with: the pad token's, else end of sequence's (many chat models
    have no pad token). Compared to None, never by truth: 0 is a real id."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an end-of-sequence token")
    return pad


def _template_ids(tokenizer, messages: Messages, **kwargs: Any) -> list[int]:
    """Token ids of messages rendered by the chat template (transformers may return a dict)."""
    ids = tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)


def chat_prompt_ids(tokenizer, messages: Messages | str) -> list[int]:
    """Token ids of chat messages through the model's template, the assistant turn opened (a
    string: a raw completion prompt, see ``chat_prompt_ids_batch``)."""
    if isinstance(messages, str):
        return list(tokenizer(messages)["input_ids"])
    return _template_ids(tokenizer, messages, add_generation_prompt=True)


def chat_prompt_ids_batch(tokenizer, conversations: list[Messages | str]) -> list[list[int]]:
    """``chat_prompt_ids`` of many conversations at once: the template rendered in one call and
    the texts encoded in one batch (a fast tokenizer encodes it in Rust), about twice the rows
    per second of one call per row. The ids are the same: the template's text holds its special
    tokens, so none is added. A conversation given as a string is a raw completion prompt (a
    classifier's own format, ``judges.presets``): encoded as it is, with the tokenizer's usual
    special tokens (its BOS) and no chat template."""
    if not conversations:
        return []
    out: list[list[int] | None] = [None] * len(conversations)
    chats = [i for i, c in enumerate(conversations) if not isinstance(c, str)]
    raws = [i for i, c in enumerate(conversations) if isinstance(c, str)]
    if chats:
        texts = tokenizer.apply_chat_template([conversations[i] for i in chats], tokenize=False,
                                              add_generation_prompt=True)
        for i, ids in zip(chats, tokenizer(texts, add_special_tokens=False)["input_ids"], strict=True):
            out[i] = ids
    if raws:
        for i, ids in zip(raws, tokenizer([conversations[i] for i in raws])["input_ids"], strict=True):
            out[i] = ids
    return out  # type: ignore[return-value]


def _special_ids(tokenizer) -> set[int]:
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return set(tokenizer.all_special_ids) | {i for i, token in added.items() if token.special}


def _through_end_of_turn(tokenizer, ids: list[int]) -> tuple[list[int], bool]:
    """``ids`` cut after the chat template's end-of-turn token, and whether there is one.

    The end of turn is the last token once trailing whitespace is dropped, if it is a special
    token (SmolLM2's ``<|im_end|>``). The newline the template writes after it is dropped: it only
    separates this turn from a next one, and generation stops at the end of turn, so the model
    would never produce it. A template that ends a turn with plain text has no end-of-turn token.
    """
    special = _special_ids(tokenizer)
    end = len(ids)
    while end and ids[end - 1] not in special and not tokenizer.decode(ids[end - 1 : end]).strip():
        end -= 1
    return ids[:end], bool(end) and ids[end - 1] in special


def encode_sample(tokenizer, messages: Messages, target: str) -> tuple[list[int], int]:
    """Token ids of prompt + target + end of turn, and how many leading tokens are prompt.

    The whole conversation (the prompt and the target as the assistant's answer) goes through
    the chat template, so the target tokens, ending with the template's end-of-turn token, are
    exactly what the model must produce after the opened assistant turn that generation sends.
    A template that renders the prompt differently once it is answered (its ids are then no
    prefix of the conversation's) gets the target tokenized on its own, then the end-of-turn
    token; a template without one, the end-of-sequence token.
    """
    prompt_ids = chat_prompt_ids(tokenizer, messages)
    answered = [*messages, {"role": "assistant", "content": target}]
    conversation = _template_ids(tokenizer, answered, add_generation_prompt=False)
    full_ids, has_end = _through_end_of_turn(tokenizer, conversation)
    if full_ids[: len(prompt_ids)] == prompt_ids and len(full_ids) > len(prompt_ids):
        target_ids = full_ids[len(prompt_ids):]
    else:  # not prefix-stable: the target alone, then the template's own end of turn
        target_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
        target_ids = [*target_ids, full_ids[-1]] if has_end else list(target_ids)
    if not has_end and tokenizer.eos_token_id is not None:
        target_ids = [*target_ids, tokenizer.eos_token_id]
    return prompt_ids + target_ids, len(prompt_ids)
