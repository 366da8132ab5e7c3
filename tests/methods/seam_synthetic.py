"""Synthetic SEAM streams for tests: token sequences with the structure of the real ones.

Harmful and refusal rows share a prompt (tokens from one range) and differ in the response
(harmful: a random bigram chain; refusal: one of a few fixed refusal strings); benign rows
use another prompt range and another bigram chain. Right padding, loss_mask on responses.
"""

from __future__ import annotations

import numpy as np

PAD = 0


def _chain(rng, vocab_lo, vocab_hi, table, length, start):
    out = [start]
    for _ in range(length - 1):
        out.append(vocab_lo + int(rng.choice(vocab_hi - vocab_lo, p=table[out[-1] - vocab_lo])))
    return out


def _table(rng, n, concentration=0.05):
    return rng.dirichlet(np.full(n, concentration), size=n)


class SyntheticSEAM:
    """Deterministic batches: `batches(step)` gives SEAM's three streams; `split` picks rows."""

    def __init__(self, vocab=512, seq_len=32, batch_size=8, seed=0):
        self.vocab, self.T, self.B = vocab, seq_len, batch_size
        rng = np.random.default_rng(seed)
        self.harm_table = _table(rng, 128)
        self.benign_table = _table(rng, 128)
        self.refusals = [list(rng.integers(400, 512, size=rng.integers(6, 12))) for _ in range(4)]

    def _row(self, prompt, response):
        ids = np.full(self.T, PAD, np.int32)
        seq = ([1] + prompt + response)[: self.T]
        ids[: len(seq)] = seq
        attn = (np.arange(self.T) < len(seq)).astype(np.int32)
        loss = np.zeros(self.T, np.float32)
        loss[1 + len(prompt): len(seq)] = 1.0
        return ids, attn, loss

    def _batch(self, rows):
        ids, attn, loss = map(np.stack, zip(*rows))
        return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}

    def batches(self, step: int, held_out: bool = False) -> dict:
        rng = np.random.default_rng((1 + held_out) * 100_003 + step)
        adv, aln, ben = [], [], []
        for _ in range(self.B):
            plen = int(rng.integers(5, 9))
            prompt = list(rng.integers(3, 130, size=plen))
            rlen = self.T - 1 - plen - int(rng.integers(0, 6))
            harmful = _chain(rng, 130, 258, self.harm_table, rlen, 130 + int(rng.integers(128)))
            refusal = self.refusals[int(rng.integers(len(self.refusals)))]
            adv.append(self._row(prompt, harmful))
            aln.append(self._row(prompt, refusal))
            bprompt = list(rng.integers(3, 130, size=plen))
            benign = _chain(rng, 258, 386, self.benign_table, rlen, 258 + int(rng.integers(128)))
            ben.append(self._row(bprompt, benign))
        return {"adversarial": self._batch(adv), "alignment": self._batch(aln), "benign": self._batch(ben)}


class StreamView:
    """A train-loop stream (`batch_at(step)`) over one of SyntheticSEAM's streams."""

    def __init__(self, data: SyntheticSEAM, name: str):
        self.data, self.name = data, name

    def batch_at(self, step: int) -> dict:
        return self.data.batches(step)[self.name]
