"""Tokenizers: transformers AutoTokenizer from a local directory or a GGUF file, offline.

A GGUF file carries no tokenizer.json, only llama.cpp's metadata. `tokenizer_from_gguf` rebuilds
a byte-level BPE tokenizer ("gpt2" model: SmolLM2, Llama 3, Qwen2/2.5/3) from it with the
`tokenizers` library and wraps it in transformers' `PreTrainedTokenizerFast`, so chat templates,
encode and decode work as for any HF tokenizer; no torch is imported. The construction follows
transformers' GGUF conversion (transformers.integrations.gguf.gguf_tokenizer_mapping):

    vocab     tokenizer.ggml.tokens (index = id), already spelled in GPT-2's byte alphabet
    merges    tokenizer.ggml.merges ("a b" pairs, rank = position)
    specials  token_type 3 (control) → special added tokens; 4 (user-defined) → plain added tokens
    split     tokenizer.ggml.pre selects the pre-tokenizer regex (llama.cpp's names); unknown → GPT-2's
    template  tokenizer.chat_template; tokenizer.ggml.add_bos_token / add_eos_token → post-processor

"smollm" follows llama.cpp's pre-tokenizer (every digit its own piece, then GPT-2's regex); with
SmolLM2's vocabulary, which has no multi-character digit tokens, it encodes as GPT-2's regex alone does.
Prompt formatting (chat template or PLAIN_TEMPLATE) and prompt encoding live in
`jaxdefense.data.formatting`.
"""

from __future__ import annotations

from pathlib import Path

from jaxdefense.errors import CheckpointError

BYTE_LEVEL_MODELS = ("gpt2",)  # tokenizer.ggml.model values built here
CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS = {  # tokenizer.ggml.pre → split regex (then byte-level, no regex of its own)
    "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
}
DIGIT_SPLIT_PRE = ("smollm",)  # individual digits, then GPT-2's regex


def load_tokenizer(path):
    """AutoTokenizer from a local directory or a .gguf file (its metadata), never touching the network."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return load_gguf_tokenizer(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: tokenizer directory does not exist")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot load a tokenizer ({err})") from err


def _pre_tokenizer(pre: str | None):
    from tokenizers import Regex, pre_tokenizers

    if pre in PRE_TOKENIZER_SPLITS:
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PRE_TOKENIZER_SPLITS[pre]), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre in DIGIT_SPLIT_PRE:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return byte_level


def tokenizer_from_gguf(meta: dict, path="GGUF"):
    """PreTrainedTokenizerFast of a byte-level BPE GGUF vocabulary (module docstring), from `read_gguf_metadata`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    kind = meta.get("tokenizer.ggml.model")
    if kind not in BYTE_LEVEL_MODELS:
        raise CheckpointError(f"{path}: tokenizer.ggml.model {kind!r}: only {BYTE_LEVEL_MODELS} is built without torch")
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
        if not isinstance(meta.get(key), list):
            raise CheckpointError(f"{path}: GGUF metadata {key}: missing")
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise CheckpointError(f"{path}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    vocab = {token: i for i, token in enumerate(tokens)}
    merges = []
    for i, merge in enumerate(meta["tokenizer.ggml.merges"]):
        pair = tuple(merge.split(" "))
        if len(pair) != 2:
            raise CheckpointError(f"{path}: tokenizer.ggml.merges[{i}] {merge!r} is not one pair 'a b'")
        merges.append(pair)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None,
                                   continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
                                   byte_fallback=False))
    backend.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre"))
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                for t, kind in zip(tokens, types) if kind == CONTROL])
    backend.add_tokens([AddedToken(t, normalized=False, special=False)
                        for t, kind in zip(tokens, types) if kind == USER_DEFINED])

    def token(key):
        index = meta.get(f"tokenizer.ggml.{key}")
        if index is None:
            return None
        if not 0 <= int(index) < len(tokens):
            raise CheckpointError(f"{path}: tokenizer.ggml.{key} {index} is outside the vocabulary ({len(tokens)})")
        return tokens[int(index)]

    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=token("bos_token_id"), eos_token=token("eos_token_id"),
        unk_token=token("unknown_token_id"), pad_token=token("padding_token_id"),
        chat_template=meta.get("tokenizer.chat_template"),
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        clean_up_tokenization_spaces=False)


def load_gguf_tokenizer(path):
    """transformers PreTrainedTokenizerFast from a GGUF file's tokenizer.ggml.* and chat template, offline.

    Byte-level BPE vocabularies ("gpt2") are built without torch (`models.tokenizer.tokenizer_from_gguf`);
    other tokenizer models use transformers' GGUF conversion, which needs torch.
    """
    import importlib.util

    from jaxdefense.models.gguf import read_gguf_metadata

    path = Path(path)
    meta = read_gguf_metadata(path)
    if meta.get("tokenizer.ggml.model") in BYTE_LEVEL_MODELS:
        return tokenizer_from_gguf(meta, path)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    except (OSError, ValueError, KeyError, ImportError) as err:
        hint = "" if importlib.util.find_spec("torch") else "; transformers' GGUF conversion imports torch: pip install torch"
        raise CheckpointError(f"{path}: cannot build a tokenizer from the GGUF metadata "
                              f"(tokenizer.ggml.model {meta.get('tokenizer.ggml.model')!r}: {err}){hint}") from err
