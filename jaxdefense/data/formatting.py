"""Prompt formatting for SFT examples: the tokenizer's chat template or a plain template.

`template` values accepted by `format_prompt` / `encode_example`:
  "chat"   — `jaxdefense.models.apply_chat` (the tokenizer's chat template, else PLAIN_TEMPLATE);
  "plain"  — PLAIN_TEMPLATE even when the tokenizer has a chat template;
  "qa"     — "Question: {prompt}\\nAnswer: " (the tiny-scale pilot's format);
  "raw"    — the prompt text unchanged;
  a str containing "{prompt}" — formatted with the prompt; or a callable prompt -> str.
"""

from __future__ import annotations

from typing import Callable, Union

from jaxdefense.errors import ConfigError

PLAIN_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"
QA_TEMPLATE = "Question: {prompt}\nAnswer: "

Template = Union[str, Callable[[str], str]]


def _has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _apply_chat_fallback(tokenizer, prompt: str) -> str:
    if _has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return PLAIN_TEMPLATE.format(prompt=prompt)


def _apply_chat(tokenizer, prompt: str) -> str:
    """`jaxdefense.models.apply_chat` (imported on first use: it pulls in JAX), else the local fallback."""
    try:
        from jaxdefense.models.tokenizer import apply_chat
    except ImportError:  # pragma: no cover - only while the models package is absent
        apply_chat = _apply_chat_fallback
    return apply_chat(tokenizer, prompt)


def uses_chat_template(tokenizer, template: Template) -> bool:
    """True when the formatted prompt carries the tokenizer's own special tokens (no BOS to add)."""
    return template == "chat" and _has_chat_template(tokenizer)


def format_prompt(tokenizer, prompt: str, template: Template = "chat") -> str:
    """Prompt text up to where the response starts (the generation prompt)."""
    if callable(template):
        return template(prompt)
    if template == "chat":
        return _apply_chat(tokenizer, prompt)
    if template == "plain":
        return PLAIN_TEMPLATE.format(prompt=prompt)
    if template == "qa":
        return QA_TEMPLATE.format(prompt=prompt)
    if template == "raw":
        return prompt
    if isinstance(template, str) and "{prompt}" in template:
        return template.replace("{prompt}", prompt)
    raise ConfigError(f"template must be 'chat', 'plain', 'qa', 'raw', a string with '{{prompt}}' or a callable, got {template!r}")
