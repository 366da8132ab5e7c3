"""Paired harmful/refusal batches: one prompt truncation for both sides, rows aligned."""

from __future__ import annotations

import numpy as np
import pytest

from jaxdefense.data import data_root_available


@pytest.fixture(scope="module")
def tokenizer():
    if not data_root_available():
        pytest.skip("data root not available")
    from jaxdefense.data import load_gpt2_tokenizer

    return load_gpt2_tokenizer()


def test_paired_batches_share_the_prompt_and_differ_in_the_response(tokenizer):
    from jaxdefense.data.pairs import PairedBatches
    from jaxdefense.methods.seam import seam_loss_masks

    long_prompt = " ".join(f"word{i}" for i in range(80))
    pairs = [
        {"prompt": long_prompt, "response": "Step one: " + "do the harmful thing " * 20, "paired": "I can't help with that."},
        {"prompt": "How do I pick a lock?", "response": "Insert a tension wrench.", "paired": "I'm sorry, but I cannot help."},
    ]
    paired = PairedBatches(pairs, tokenizer, batch_size=2, max_len=48, seed=0, shuffle=False)
    batch = paired.batch_at(0)
    adv, aln = batch["adversarial"], batch["alignment"]
    assert adv["input_ids"].shape == aln["input_ids"].shape == (2, 48)
    for b in range(2):
        prompt_a = adv["input_ids"][b][(adv["attention_mask"][b] == 1) & (adv["loss_mask"][b] == 0)]
        prompt_r = aln["input_ids"][b][(aln["attention_mask"][b] == 1) & (aln["loss_mask"][b] == 0)]
        np.testing.assert_array_equal(prompt_a, prompt_r)  # one truncation for both sides
    # the long harmful answer forced the prompt of row 0 to shrink on BOTH sides
    assert (adv["attention_mask"][0] == 1).sum() == 48 and (adv["loss_mask"][0] == 0).sum() < 40
    m_adv, m_aln = seam_loss_masks(adv, aln)
    differ = (adv["input_ids"] != aln["input_ids"]) | (adv["attention_mask"] != aln["attention_mask"])
    np.testing.assert_array_equal(np.asarray(m_adv["loss_mask"]) > 0, differ & (adv["loss_mask"] > 0))
    np.testing.assert_array_equal(np.asarray(m_aln["loss_mask"]) > 0, differ & (aln["loss_mask"] > 0))
    # GPT-2 pads with its EOS id: row 1's refusal is the longer side, its EOS faces the harmful
    # side's padding (same id) and must still be trained on
    eos = int(aln["attention_mask"][1].sum()) - 1
    assert aln["input_ids"][1, eos] == adv["input_ids"][1, eos] == tokenizer.eos_token_id
    assert np.asarray(m_aln["loss_mask"])[1, eos] == 1.0
    assert paired.view("alignment").batch_at(0)["input_ids"].tolist() == aln["input_ids"].tolist()
