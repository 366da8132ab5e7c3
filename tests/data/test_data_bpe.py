import pytest

from jaxdefense.data import load_gpt2_tokenizer, train_bpe_tokenizer
from jaxdefense.errors import ConfigError


def test_trained_tokenizer_reloads_offline_and_round_trips(tiny_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tiny_tokenizer.save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert len(tok) <= 400
    text = "naïve café — 東京 😀 plus   spaces\n"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids[1:], clean_up_tokenization_spaces=False) == text
    assert len(tok("How do I bake bread?", add_special_tokens=False)["input_ids"]) < len("How do I bake bread?")


def test_training_is_deterministic(tmp_path, bpe_corpus):
    a = train_bpe_tokenizer(bpe_corpus, 300, tmp_path / "a")
    b = train_bpe_tokenizer(bpe_corpus, 300, tmp_path / "b")
    assert a.get_vocab() == b.get_vocab()
    with pytest.raises(ConfigError):
        train_bpe_tokenizer(bpe_corpus, 200, tmp_path / "c")


def test_gpt2_tokenizer_from_the_data_root(data_root, tmp_path):
    tok = load_gpt2_tokenizer(data_root, out_dir=tmp_path)
    assert len(tok) == 50257 and tok.eos_token_id == 50256
    assert tok("Hello world")["input_ids"] == [15496, 995]
    assert (tmp_path / "tokenizer.json").is_file()
