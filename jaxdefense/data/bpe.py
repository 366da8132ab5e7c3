"""Small tokenizers for tests and the demo, saved as transformers PreTrainedTokenizerFast directories.

`train_bpe_tokenizer` trains a byte-level BPE (GPT-2 style: every byte is in the base alphabet,
so any Unicode text round-trips exactly) with specials <pad>=0, <s>=1, </s>=2; `tokenizer(text)`
adds <s> in front (like Llama), `add_special_tokens=False` adds nothing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from jaxdefense.errors import ConfigError, DataError

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")


def _wrap(tokenizer_object, bos: str | None, eos: str, pad: str | None):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer_object, bos_token=bos, eos_token=eos, pad_token=pad, clean_up_tokenization_spaces=False
    )


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike):
    """Train a byte-level BPE on `texts`, save it to `out_dir` and return the loaded tokenizer.

    The vocabulary holds the 3 specials, the 256 byte symbols and up to vocab_size − 259 merges
    (fewer when the corpus runs out of pairs). Deterministic for the same texts in the same order.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    min_size = len(SPECIAL_TOKENS) + 256
    if vocab_size < min_size:
        raise ConfigError(f"vocab_size must be ≥ {min_size} (3 specials + 256 bytes), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator((t for t in texts if t), trainer=trainer)
    bos_id = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    wrapped = _wrap(tokenizer, "<s>", "</s>", "<pad>")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(str(out_dir))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(out_dir), local_files_only=True)


def load_gpt2_tokenizer(data_dir=None, out_dir: str | os.PathLike | None = None):
    """GPT-2's byte-level BPE from `<data root>/tokenizers/gpt2_bpe/{encoder.json, vocab.bpe}`.

    <|endoftext|> (id 50256) is bos, eos and pad. With `out_dir` the tokenizer is also saved there
    as a PreTrainedTokenizerFast directory.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from jaxdefense.data.root import resolve_data_root

    folder = resolve_data_root(data_dir) / "tokenizers" / "gpt2_bpe"
    vocab, merges = folder / "encoder.json", folder / "vocab.bpe"
    for path in (vocab, merges):
        if not path.is_file():
            raise DataError(f"GPT-2 tokenizer file {str(path)!r} not found")
    tokenizer = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    if tokenizer.token_to_id("<|endoftext|>") is None:
        raise DataError(f"{vocab}: no <|endoftext|> token")
    wrapped = _wrap(tokenizer, "<|endoftext|>", "<|endoftext|>", "<|endoftext|>")
    if out_dir is not None:
        wrapped.save_pretrained(str(out_dir))
    return wrapped
