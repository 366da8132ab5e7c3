"""Data: named sources (hub id or local files), streams split by prompt, chat formatting, batching.

    records = load_stream("harmful_qa", "train")            # list of dicts, fixed order
    batches = make_batches(records, tokenizer, batch_size=8, max_len=128, seed=0)
    batch = batches.batch_at(step)                            # pure in (seed, step)

The data root resolves from `data_dir`, then $JAXDEFENSE_DATA_DIR, then ../shared/data.
"""

from jaxdefense.data.batching import (
    BatchStream,
    Encoded,
    batches_at,
    collate,
    encode_example,
    make_batches,
    pack_examples,
    stream_seed,
    truncate,
)
from jaxdefense.data.bpe import load_gpt2_tokenizer, train_bpe_tokenizer
from jaxdefense.data.formatting import PLAIN_TEMPLATE, apply_chat, encode_prompts, format_prompt
from jaxdefense.data.root import data_root_available, resolve_data_root
from jaxdefense.data.sources import SOURCES, Source, get_source, is_refusal, load_source, normalize_text, register_source
from jaxdefense.data.streams import (
    SPLIT_RATIOS,
    SPLITS,
    STREAMS,
    clear_cache,
    hash_split,
    list_sources,
    list_streams,
    load_stream,
    prompt_bucket,
    split_sizes,
)
from jaxdefense.data.tasks import TASKS, accuracy, gsm8k_final_number, mc_accuracy, mc_pairs

__all__ = [
    "BatchStream", "Encoded", "PLAIN_TEMPLATE", "SOURCES", "SPLITS", "SPLIT_RATIOS", "STREAMS", "Source", "TASKS",
    "accuracy", "apply_chat", "batches_at", "clear_cache", "collate", "data_root_available", "encode_example",
    "encode_prompts", "format_prompt", "get_source", "gsm8k_final_number", "hash_split", "is_refusal",
    "list_sources", "list_streams", "load_gpt2_tokenizer", "load_source", "load_stream", "make_batches",
    "mc_accuracy", "mc_pairs", "normalize_text", "pack_examples", "prompt_bucket", "register_source",
    "resolve_data_root", "split_sizes", "stream_seed", "train_bpe_tokenizer", "truncate",
]
