"""Curvature functions on FSDP-sharded params equal their single-device results."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxdefense.curvature import cosine_grad, hessian_top_eigs, hvp, lookahead_grad, unrolled_grad


def assert_partitioned(x, mesh, spec=None):
    """x lies on all of `mesh`'s devices with no replication: each device holds exactly one
    shard of x.size / n elements, the shards' index ranges are disjoint and tile x, and each
    shard's data is x at its index. With `spec`, also x's sharding is NamedSharding(mesh, spec)."""
    n = mesh.devices.size
    shards = x.addressable_shards
    assert {s.device for s in shards} == set(mesh.devices.flat) and len(shards) == n
    assert all(s.data.size * n == x.size for s in shards), [s.data.shape for s in shards]
    covered = np.zeros(x.shape, np.int32)
    full = np.asarray(x)
    for s in shards:
        covered[s.index] += 1
        np.testing.assert_array_equal(np.asarray(s.data), full[s.index])
    assert (covered == 1).all()
    if spec is not None:
        assert x.sharding.is_equivalent_to(NamedSharding(mesh, spec), x.ndim), (x.sharding, spec)


@pytest.fixture
def mesh():
    if jax.device_count() < 8:
        pytest.skip("needs the 8 simulated CPU devices from tests/conftest.py")
    return jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
@pytest.mark.slow


def test_sharded_params_match_single_device(mesh, mlp):
    params = mlp.make_params(jax.random.key(0), jnp.float32, d_in=8, d_hidden=16, d_out=8)
    batch_a = mlp.make_batch(jax.random.key(1), jnp.float32, n=16, d_in=8, d_out=8)
    batch_b = mlp.make_batch(jax.random.key(2), jnp.float32, n=16, d_in=8, d_out=8, shift=0.7)
    spec = lambda x: P("fsdp", None) if x.ndim == 2 else P()
    sharded = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, spec(x))), params)
    for name in ("w1", "w2"):  # rows split over the 8 devices in mesh order
        assert_partitioned(sharded[name], mesh, P("fsdp", None))
        rows = sharded[name].shape[0] // 8
        for i, device in enumerate(mesh.devices.flat):
            (shard,) = [s for s in sharded[name].addressable_shards if s.device == device]
            assert shard.data.shape == (rows, sharded[name].shape[1])
            np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(params[name])[i * rows:(i + 1) * rows])
    with pytest.raises(AssertionError):  # the check rejects a replicated array
        assert_partitioned(jax.device_put(params["w1"], NamedSharding(mesh, P())), mesh)
    with pytest.raises(AssertionError):  # and one sharded along the other axis, when a spec is asked
        assert_partitioned(jax.device_put(params["w1"], NamedSharding(mesh, P(None, "fsdp"))), mesh, P("fsdp", None))
    inner = jax.tree.map(lambda x: jnp.stack([x, x[::-1]]), batch_a)

    @jax.jit
    def everything(p, v):
        loss = mlp.loss
        return {
            "hvp": hvp(loss, p, batch_a, v),
            "cos_exact": cosine_grad(loss, batch_a, loss, batch_b, p)[1],
            "cos_forward": cosine_grad(loss, batch_a, loss, batch_b, p, estimator="forward", eps=1e-2)[1],
            "lookahead": lookahead_grad(loss, batch_b, loss, batch_a, p, 0.1, normalize=True, order="exact")[1],
            "unrolled": unrolled_grad(loss, batch_b, loss, inner, p, steps=2, lr=0.1, optimizer="adam")[1],
            "eigs": hessian_top_eigs(loss, p, batch_a, 2, jax.random.key(3), num_iters=6)[0],
        }

    single = everything(params, params)
    multi = everything(sharded, sharded)
    # parameter-shaped results of the matrices stay split 8 ways (never gathered onto each device);
    # XLA picks the split axis (today w1's results come back P(None, "fsdp"))
    for name in ("hvp", "cos_exact", "cos_forward", "lookahead", "unrolled"):
        for leaf in ("w1", "w2"):
            assert_partitioned(multi[name][leaf], mesh)
    for name in single:
        a = np.concatenate([np.ravel(x) for x in jax.tree.leaves(single[name])])
        b = np.concatenate([np.ravel(x) for x in jax.tree.leaves(multi[name])])
        # finite differences amplify reduction-order rounding by 1/ε
        tol = 2e-3 if name == "cos_forward" else 1e-4
        assert np.linalg.norm(a - b) <= tol * np.linalg.norm(a), name
