import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdefense.errors import CheckpointError, ConfigError, NonFiniteError
from jaxdefense.train import (Checkpointer, abstract_tree, batch_sharding, make_mesh, param_shardings,
                              read_metrics, train)
from jaxdefense.train import loop as loop_mod
from jaxdefense.train.loop import compute_grads
from train_helpers import (ADAMW, SFT, TINY, CountingStream, PoisonedStream, ToyStream, tiny_grads_jit,
                           tiny_params, toy_problem)


def _losses(result):
    return np.array([r["loss"] for r in result.history])


def _run(steps, mesh=None, streams=None, **kw):
    kw.setdefault("log_every", 1)
    kw.setdefault("progress", False)
    streams = streams or {"train": CountingStream()}
    return train(tiny_params(), SFT, streams, ADAMW, steps=steps, mesh=mesh, **kw)


@pytest.fixture(scope="module")
def single_30():
    return _run(30)


def test_loss_falls_over_30_steps(single_30):
    losses = _losses(single_30)
    assert losses.shape == (30,) and single_30.step == 30
    # Step 0's loss is the loss at the initial params on batch 0.
    _, ref = tiny_grads_jit()(tiny_params(), {"train": CountingStream().batch_at(0)})
    assert losses[0] == pytest.approx(float(ref["loss"]), rel=1e-6)
    assert losses[0] == pytest.approx(np.log(TINY.vocab_size), abs=0.3)
    assert losses[-5:].mean() < 0.5 * losses[:5].mean()
    # The caller's params are copied, not donated.
    assert np.isfinite(np.asarray(tiny_params()["embed"])).all()


@pytest.mark.parametrize("shape", [dict(fsdp=8), dict(fsdp=4, tensor=2)])
def test_sharded_run_equals_single_device(single_30, shape):
    mesh = make_mesh(**shape)
    result = _run(5, mesh=mesh)
    np.testing.assert_allclose(_losses(result), _losses(single_30)[:5], rtol=2e-5)
    specs = jax.tree.map(lambda x: x.sharding.spec, result.params)
    wq = ("fsdp", "tensor") if "tensor" in shape else ("fsdp",)
    assert tuple(specs["layers"]["wq"]) == (None, *wq)
    assert specs["embed"][-1] == "fsdp" and specs["layers"]["w_down"][-1] == "fsdp"
    assert result.params["layers"]["wq"].sharding.mesh.shape == mesh.shape
    mu = result.opt_state[0].mu  # AdamW moments keep the params' sharding
    assert jax.tree.map(lambda x: x.sharding.spec, mu) == specs
    step_fn = next(f for k, f in loop_mod._JIT_CACHE.items()
                   if k[0] == "step" and k[1] is SFT and k[-1].mesh.shape == mesh.shape)
    assert step_fn._cache_size() == 1  # compiled once for all steps
    # Grads come back sharded like the params and equal the single-device grads.
    batches = {"train": CountingStream().batch_at(0)}
    p_shard = param_shardings(tiny_params(), mesh)
    grads, _ = jax.jit(lambda p, b: compute_grads(SFT, p, b, jax.random.key(0), None, p_shard))(
        jax.device_put(tiny_params(), p_shard), jax.device_put(batches, batch_sharding(mesh)))
    assert jax.tree.map(lambda g: g.sharding.spec, grads) == specs
    ref, _ = tiny_grads_jit()(tiny_params(), batches)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)


def test_bf16_compute_keeps_fp32_master(single_30):
    result = _run(5, compute_dtype="bfloat16")
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(result.params))
    np.testing.assert_allclose(_losses(result), _losses(single_30)[:5], rtol=2e-2)
    assert not np.array_equal(_losses(result), _losses(single_30)[:5])


def test_nan_stops_run_and_last_checkpoint_is_good(tmp_path):
    with pytest.raises(NonFiniteError, match=r"'loss'.* at step 3") as err:
        _run(8, streams={"train": PoisonedStream(bad_step=3)}, run_dir=tmp_path, ckpt_every=1, log_every=4)
    assert "gradient" in str(err.value)
    with Checkpointer(tmp_path / "checkpoints") as ckpt:
        assert ckpt.latest_step() == 3  # state after steps 0..2, before the bad step
        params, _, meta = ckpt.restore(None, abstract_tree(tiny_params()))
    assert meta["step"] == 3
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
    assert [r["step"] for r in read_metrics(tmp_path)] == [0]


def test_resume_is_bit_identical(tmp_path):
    full = _run(6, run_dir=tmp_path / "full", ckpt_every=3)
    _run(3, run_dir=tmp_path / "part", ckpt_every=3)
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        _run(6, run_dir=tmp_path / "part", ckpt_every=3)
    resumed = _run(6, run_dir=tmp_path / "part", ckpt_every=3, resume=True)
    assert len(resumed.history) == 3
    a = [r["loss"] for r in read_metrics(tmp_path / "full")]
    b = [r["loss"] for r in read_metrics(tmp_path / "part")]
    assert a == b and len(a) == 6
    for x, y in zip(jax.tree.leaves(full.params), jax.tree.leaves(resumed.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_nonfinite_gradient_is_named():
    params, grad_fn = toy_problem()

    def bad_grad_fn(params, batches, key, frozen):
        grads, metrics = grad_fn(params, batches, key, frozen)
        return {**grads, "b": grads["b"] * jnp.inf}, metrics

    with pytest.raises(NonFiniteError, match=r"non-finite gradient of \['b'\] at step 0"):
        train(params, bad_grad_fn, {"toy": ToyStream()}, optax.sgd(0.1), steps=2, progress=False)


def test_rng_key_is_fold_in_of_step_and_sgd_converges():
    params, grad_fn = toy_problem()
    seen = []
    result = train(params, grad_fn, {"toy": ToyStream()}, optax.sgd(0.1), steps=60, seed=7,
                   log_every=1, progress=False, callbacks=[seen.append])
    expected = [float(jax.random.uniform(jax.random.fold_in(jax.random.key(7), i))) for i in range(3)]
    assert [r["u"] for r in seen[:3]] == pytest.approx(expected, abs=0)
    np.testing.assert_allclose(result.params["w"], [1.0, -2.0, 0.5, 3.0], atol=1e-2)
    assert float(result.params["b"]) == pytest.approx(1.0, abs=1e-2)


def test_batch_not_divisible_by_mesh_is_config_error():
    with pytest.raises(ConfigError, match="batch_size: 6"):
        _run(1, mesh=make_mesh(fsdp=4), streams={"train": CountingStream(batch_size=6)})


def test_equal_objectives_share_one_compiled_step():
    """Two equal (frozen dataclass) objectives bound separately hit the same cached step."""
    from jaxdefense.methods import SFT
    from jaxdefense.train import loop

    stream = {"train": CountingStream(batch_size=4, seq_len=16)}
    first, second = SFT(first_token_weight=0.5).bind(TINY), SFT(first_token_weight=0.5).bind(TINY)
    assert first is not second and first.grad != second.grad  # Python compares bound methods' self by identity
    train(tiny_params(), first.grad, stream, ADAMW, steps=1, progress=False)
    steps_cached = [k for k in loop._JIT_CACHE if k[0] == "step"]
    train(tiny_params(), second.grad, stream, ADAMW, steps=1, progress=False)
    assert [k for k in loop._JIT_CACHE if k[0] == "step"] == steps_cached
    third = SFT(first_token_weight=0.25).bind(TINY)
    train(tiny_params(), third.grad, stream, ADAMW, steps=1, progress=False)
    assert len([k for k in loop._JIT_CACHE if k[0] == "step"]) == len(steps_cached) + 1
