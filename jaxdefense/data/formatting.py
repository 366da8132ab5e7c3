"""Prompt formatting: the tokenizer's chat template or a plain template, and prompt encoding.

`apply_chat` uses the tokenizer's chat template when it has one, else `PLAIN_TEMPLATE`:

    ### Instruction:
    {prompt}

    ### Response:
    {response}<eos>

The prompt part (response=None) always is a prefix of the full text, so a loss mask over
the response is the tokens after the prompt's tokens.

`template` values accepted by `format_prompt` / `encode_example`:
  "chat"   — `apply_chat` (the tokenizer's chat template, else PLAIN_TEMPLATE);
  "plain"  — PLAIN_TEMPLATE even when the tokenizer has a chat template;
  "qa"     — "Question: {prompt}\\nAnswer: " (the tiny-scale pilot's format);
  "raw"    — the prompt text unchanged;
  a str containing "{prompt}" — formatted with the prompt; or a callable prompt -> str.
"""

from __future__ import annotations

from typing import Callable, Union

import numpy as np

from jaxdefense.errors import ConfigError

PLAIN_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"
QA_TEMPLATE = "Question: {prompt}\nAnswer: "

Template = Union[str, Callable[[str], str]]


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
    """Left-padded (ids, mask) int32 arrays [B, T] of already formatted prompt texts, for generation.

    Chat-formatted text already carries its special tokens, so none are added; plain text
    gets the tokenizer's own (e.g. BOS). pad_id defaults to the tokenizer's pad, else eos, else 0.
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


def uses_chat_template(tokenizer, template: Template) -> bool:
    """True when the formatted prompt carries the tokenizer's own special tokens (no BOS to add)."""
    return template == "chat" and has_chat_template(tokenizer)


def format_prompt(tokenizer, prompt: str, template: Template = "chat") -> str:
    """Prompt text up to where the response starts (the generation prompt)."""
    if callable(template):
        return template(prompt)
    if template == "chat":
        return apply_chat(tokenizer, prompt)
    if template == "plain":
        return PLAIN_TEMPLATE.format(prompt=prompt)
    if template == "qa":
        return QA_TEMPLATE.format(prompt=prompt)
    if template == "raw":
        return prompt
    if isinstance(template, str) and "{prompt}" in template:
        return template.replace("{prompt}", prompt)
    raise ConfigError(f"template must be 'chat', 'plain', 'qa', 'raw', a string with '{{prompt}}' or a callable, got {template!r}")
