"""Tokenizers: transformers AutoTokenizer from a local directory or a GGUF file, offline.

Prompt formatting (chat template or PLAIN_TEMPLATE) and prompt encoding live in
`jaxdefense.data.formatting`.
"""

from __future__ import annotations

from pathlib import Path

from jaxdefense.errors import CheckpointError


def load_tokenizer(path):
    """AutoTokenizer from a local directory or a .gguf file (its metadata), never touching the network."""
    from transformers import AutoTokenizer

    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        from jaxdefense.models.gguf import load_gguf_tokenizer

        return load_gguf_tokenizer(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: tokenizer directory does not exist")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot load a tokenizer ({err})") from err
