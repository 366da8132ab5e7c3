"""Tokenisation, loss masks, truncation and deterministic batching (tiny BPE tokenizer, no data root)."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxdefense.data import PLAIN_TEMPLATE, encode_example, make_batches, stream_seed, truncate
from jaxdefense.data.batching import pack_examples, prompt_ids, response_ids
from jaxdefense.errors import ConfigError, DataError


def _decode(tok, ids):
    return tok.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _masked(example):
    return [i for i, m in zip(example.input_ids, example.loss_mask) if m]


@pytest.mark.parametrize("prompt,response", [
    ("How do I bake bread?", "Mix flour and water."),
    ("Unicode? 東京 😀", "  naïve café — ½\n\ttabs "),
    ("literal specials", "text with </s> and <s> inside"),
    ("", "only a response"),
])
def test_loss_mask_covers_exactly_the_response_and_eos(tiny_tokenizer, prompt, response):
    tok = tiny_tokenizer
    example = encode_example(tok, prompt, response, 256, "plain")
    assert _decode(tok, _masked(example)) == response + tok.eos_token
    assert _masked(example)[-1] == tok.eos_token_id
    prompt_part = [i for i, m in zip(example.input_ids, example.loss_mask) if not m]
    assert _decode(tok, prompt_part) == tok.bos_token + PLAIN_TEMPLATE.format(prompt=prompt)
    assert list(example.loss_mask) == [0] * len(prompt_part) + [1] * len(_masked(example))
    assert example.input_ids.count(tok.eos_token_id) == 1  # the literal "</s>" stays text


def test_chat_template_supplies_its_own_specials(tiny_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    from jaxdefense.data import apply_chat

    tiny_tokenizer.save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    tok.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    example = encode_example(tok, "Bake bread?", "Knead it.", 128, "chat")
    head = [i for i, m in zip(example.input_ids, example.loss_mask) if not m]
    assert _decode(tok, head) == apply_chat(tok, "Bake bread?") == "<s>user: Bake bread?\nassistant: "
    assert head.count(tok.bos_token_id) == 1
    assert _decode(tok, _masked(example)) == "Knead it.</s>"


def test_truncate_rule_on_plain_lists():
    bos = 1
    prompt, response = [bos] + list(range(100, 120)), list(range(200, 206))
    # fits: untouched
    assert truncate(prompt, response, 64, bos) == (prompt, response)
    # prompt loses tokens from the left, BOS kept, response whole
    p, r = truncate(prompt, response, 16, bos)
    assert r == response and p == [bos] + list(range(111, 120)) and len(p) + len(r) == 16
    # long response: prompt keeps its last max_len // 4 tokens (BOS first), response cut from the right
    long_response = list(range(300, 340))
    p, r = truncate(prompt, long_response, 16, bos)
    assert p == [bos, 117, 118, 119] and r == long_response[:12]
    # without BOS the tail of the prompt is kept
    p, r = truncate(list(range(10)), [50, 51], 6)
    assert p == [6, 7, 8, 9] and r == [50, 51]


def test_long_prompt_is_cut_before_the_response(tiny_tokenizer):
    tok = tiny_tokenizer
    response = "Mix flour and water."
    example = encode_example(tok, "bread " * 200, response, 48, "plain")
    assert len(example.input_ids) == 48 and example.prompt_truncated and not example.response_truncated
    assert example.input_ids[0] == tok.bos_token_id
    assert _decode(tok, _masked(example)) == response + tok.eos_token
    assert _decode(tok, example.input_ids[: len(example.input_ids) - len(_masked(example))]).endswith("### Response:\n")


def test_long_response_is_cut_and_loses_its_eos(tiny_tokenizer):
    tok = tiny_tokenizer
    example = encode_example(tok, "Write.", "word " * 300, 32, "plain")
    full_response = response_ids(tok, "word " * 300)
    assert example.response_truncated and len(example.input_ids) == 32
    assert _masked(example) == full_response[: len(_masked(example))]
    assert tok.eos_token_id not in _masked(example)


class ByteTokenizer:
    """A tokenizer without BOS/EOS/pad: ids are UTF-8 bytes."""

    bos_token_id = eos_token_id = pad_token_id = None
    chat_template = None

    def __call__(self, text, add_special_tokens=True, split_special_tokens=False):
        return {"input_ids": list(text.encode("utf-8"))}


def test_records_that_cannot_be_encoded_raise_data_error_naming_them(tiny_tokenizer):
    with pytest.raises(DataError, match=r"record 3 .*'mysrc'.*empty prompt and empty response"):
        encode_example(tiny_tokenizer, " ", "", 32, record={"source": "mysrc", "id": "mysrc:7"}, index=3)
    # raw template, no BOS/EOS, empty prompt: the lone response token sits at position 0 → no target
    with pytest.raises(DataError, match="no response token left"):
        encode_example(ByteTokenizer(), "", "a", 8, "raw", index=0)
    records = [{"prompt": "a", "response": "b"}, {"prompt": "q", "source": "advbench", "id": "advbench:9"}]
    with pytest.raises(DataError, match=r"record 1 .*advbench.*no text 'response'"):
        make_batches(records, tiny_tokenizer, 2, 16)
    with pytest.raises(DataError, match="record 0"):
        make_batches([{"prompt": None, "response": "x"}], tiny_tokenizer, 2, 16)
    with pytest.raises(DataError):
        make_batches([], tiny_tokenizer, 2, 16)
    with pytest.raises(ConfigError):
        encode_example(tiny_tokenizer, "a", "b", 1)


RECORDS = [{"prompt": f"question {i} " * (1 + i % 3), "response": f"answer {i}" * (1 + i % 2), "source": "t", "id": f"t:{i}"}
           for i in range(10)]


def test_batches_have_contract_dtypes_and_right_padding(tiny_tokenizer):
    batch = make_batches(RECORDS, tiny_tokenizer, batch_size=4, max_len=40, seed=0).batch_at(0)
    assert set(batch) == {"input_ids", "attention_mask", "loss_mask"}
    assert batch["input_ids"].dtype == np.int32 and batch["attention_mask"].dtype == np.int32
    assert batch["loss_mask"].dtype == np.float32
    assert all(v.shape == (4, 40) for v in batch.values())
    lengths = batch["attention_mask"].sum(axis=1)
    for b, n in enumerate(lengths):
        assert batch["attention_mask"][b, :n].all() and not batch["attention_mask"][b, n:].any()
        assert (batch["input_ids"][b, n:] == tiny_tokenizer.pad_token_id).all()
    assert (batch["loss_mask"] <= batch["attention_mask"]).all() and not batch["loss_mask"][:, 0].any()


def test_batch_at_is_a_pure_function_of_seed_and_step(tiny_tokenizer):
    a = make_batches(RECORDS, tiny_tokenizer, 4, 32, seed=7)
    b = make_batches(list(RECORDS), tiny_tokenizer, 4, 32, seed=7)
    late = b.batch_at(5)
    for step in range(6):
        for key, value in a.batch_at(step).items():
            np.testing.assert_array_equal(value, b.batch_at(step)[key])
    np.testing.assert_array_equal(late["input_ids"], a.batch_at(5)["input_ids"])
    resumed = iter(make_batches(RECORDS, tiny_tokenizer, 4, 32, seed=7, start_step=3))
    np.testing.assert_array_equal(next(resumed)["input_ids"], a.batch_at(3)["input_ids"])
    np.testing.assert_array_equal(next(resumed)["input_ids"], a.batch_at(4)["input_ids"])
    other = make_batches(RECORDS, tiny_tokenizer, 4, 32, seed=8)
    assert any(a.indices_at(s) != other.indices_at(s) for s in range(5))


def test_each_epoch_visits_every_example_once(tiny_tokenizer):
    stream = make_batches(RECORDS, tiny_tokenizer, 4, 32, seed=3)
    slots = [i for step in range(5) for i in stream.indices_at(step)]  # 20 slots = 2 epochs of 10
    assert sorted(slots[:10]) == list(range(10)) and sorted(slots[10:]) == list(range(10))
    assert slots[:10] != slots[10:]
    unshuffled = make_batches(RECORDS, tiny_tokenizer, 4, 32, shuffle=False)
    assert [i for s in range(3) for i in unshuffled.indices_at(s)] == list(range(10)) + [0, 1]


def test_packing_keeps_every_target_token(tiny_tokenizer):
    stream = make_batches(RECORDS, tiny_tokenizer, 2, 64, seed=0, pack=True)
    singles = [stream.example(i) for i in range(len(RECORDS))]
    rows = stream._rows
    assert len(rows) < len(RECORDS) and all(len(r.input_ids) <= 64 for r in rows)
    assert sum(sum(r.loss_mask) for r in rows) == sum(sum(e.loss_mask) for e in singles)
    assert sorted(t for r in rows for t in r.input_ids) == sorted(t for e in singles for t in e.input_ids)
    assert pack_examples(singles[:2], 10_000)[0].input_ids == singles[0].input_ids + singles[1].input_ids
    batch = stream.batch_at(0)
    assert batch["input_ids"].shape == (2, 64)


def test_stream_seed_is_stable():
    assert stream_seed(0, "harmful_qa") == stream_seed(0, "harmful_qa") != stream_seed(0, "benign_instruct")
    assert stream_seed(0, "harmful_qa") == int.from_bytes(__import__("hashlib").sha256(b"0\0harmful_qa").digest()[:4], "big")


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=st.text(max_size=300), response=st.text(max_size=300), max_len=st.integers(2, 64),
       template=st.sampled_from(["plain", "raw", "qa"]))
def test_fuzzed_records_encode_or_raise_data_error(tiny_tokenizer, prompt, response, max_len, template):
    tok = tiny_tokenizer
    try:
        example = encode_example(tok, prompt, response, max_len, template)
    except DataError:
        assert not prompt.strip() and not response.strip()
        return
    ids, mask = example.input_ids, example.loss_mask
    assert 2 <= len(ids) <= max_len and len(mask) == len(ids) and mask[0] == 0 and sum(mask) >= 1
    full_response = response_ids(tok, response)
    assert _masked(example) == full_response[: sum(mask)]
    assert list(mask) == [0] * (len(ids) - sum(mask)) + [1] * sum(mask)
    full_prompt = prompt_ids(tok, prompt, template)
    head = list(ids[: len(ids) - sum(mask)])
    assert head == full_prompt or (head[0] == tok.bos_token_id and full_prompt[len(full_prompt) - len(head) + 1:] == head[1:])
    if not example.response_truncated:
        assert _decode(tok, _masked(example)) == response + tok.eos_token


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pairs=st.lists(st.tuples(st.text(max_size=80), st.text(max_size=80)), min_size=1, max_size=6),
       seed=st.integers(0, 2**31 - 1))
def test_fuzzed_record_lists_batch_or_raise(tiny_tokenizer, pairs, seed):
    records = [{"prompt": p, "response": r, "source": "fuzz"} for p, r in pairs]
    bad = [i for i, (p, r) in enumerate(pairs) if not p.strip() and not r.strip()]
    try:
        stream = make_batches(records, tiny_tokenizer, 3, 24, seed=seed)
    except DataError as err:
        assert bad and f"record {bad[0]}" in str(err)
        return
    assert not bad
    batch = stream.batch_at(1)
    assert batch["input_ids"].shape == (3, 24) and (batch["loss_mask"].sum(axis=1) >= 1).all()
