"""Tokenizers (transformers AutoTokenizer, local and offline) and prompt formatting.

`apply_chat` uses the tokenizer's chat template when it has one, else `PLAIN_TEMPLATE`:

    ### Instruction:
    {prompt}

    ### Response:
    {response}<eos>

The prompt part (response=None) always is a prefix of the full text, so a loss mask over
the response is the tokens after the prompt's tokens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxdefense.errors import CheckpointError

PLAIN_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"


def load_tokenizer(path):
    """AutoTokenizer from a local directory, never touching the network."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: tokenizer directory does not exist")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot load a tokenizer ({err})") from err


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def apply_chat(tokenizer, prompt: str, response: str | None = None) -> str:
    """Text of a one-turn conversation: the prompt ready for generation, or prompt + response + end.

    With a chat template: the user turn plus the assistant header; with a response, the
    template's full two-turn rendering when it extends the prompt text, else prompt text +
    response + eos. Without a template: PLAIN_TEMPLATE, then response + eos.
    """
    if has_chat_template(tokenizer):
        head = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        if response is None:
            return head
        full = tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                              {"role": "assistant", "content": response}], tokenize=False)
        if full.startswith(head) and response in full[len(head):]:
            return full
        return head + response + (tokenizer.eos_token or "")
    head = PLAIN_TEMPLATE.format(prompt=prompt)
    return head if response is None else head + response + (tokenizer.eos_token or "")


def encode_prompts(tokenizer, texts, *, chat: bool = True, pad_id: int | None = None):
    """Left-padded (ids, mask) int32 arrays [B, T] for generation.

    Chat-formatted text already carries its special tokens, so none are added; plain text
    gets the tokenizer's own (e.g. BOS).
    """
    add_special = not (chat and has_chat_template(tokenizer))
    rows = [tokenizer(t, add_special_tokens=add_special)["input_ids"] for t in texts]
    if pad_id is None:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for b, row in enumerate(rows):
        if row:
            ids[b, width - len(row):] = row
            mask[b, width - len(row):] = 1
    return ids, mask
