"""Local tokenizers and text generation end to end (a byte-level BPE made here)."""

import jax
import numpy as np
import pytest

from jaxdefense.data.formatting import apply_chat, encode_prompts
from jaxdefense.errors import CheckpointError
from jaxdefense.models import generate, generate_text, init_params, load_tokenizer, named_config

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def _make_tokenizer(path, chat_template=None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", "<|end|>", "<|user|>", "<|assistant|>"]
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["how do I bake bread", "instruction response hello world"] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    return load_tokenizer(_make_tokenizer(tmp_path_factory.mktemp("tok") / "chat", CHAT_TEMPLATE))


def test_missing_tokenizer_dir(tmp_path):
    with pytest.raises(CheckpointError, match="nope"):
        load_tokenizer(tmp_path / "nope")


def test_chat_template_is_loaded(chat):
    assert chat.chat_template == CHAT_TEMPLATE and chat.eos_token == "</s>" and chat.pad_token_id == 0


def test_generate_text_decodes_generated_tokens(chat):
    cfg = named_config("tiny", eos_token_id=chat.eos_token_id, pad_token_id=chat.pad_token_id)
    params = jax.tree.map(lambda x: 4 * x, init_params(cfg, jax.random.key(0)))
    texts = generate_text(cfg, params, chat, ["hello", "how do I bake bread"], max_new_tokens=8)
    ids, mask = encode_prompts(chat, [apply_chat(chat, p) for p in ["hello", "how do I bake bread"]])
    tokens = np.asarray(generate(cfg, params, ids, mask, max_new_tokens=8, stop_tokens=(chat.eos_token_id,)))
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    for text, row in zip(texts, tokens):
        row = row[: np.flatnonzero(row == chat.eos_token_id)[0]] if (row == chat.eos_token_id).any() else row
        assert text == chat.decode(row.tolist(), skip_special_tokens=True)
