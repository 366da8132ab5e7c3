import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from jaxdefense.errors import ConfigError
from jaxdefense.models import forward, init_params, named_config, param_axes
from jaxdefense.train import batch_sharding, logical_to_spec, make_mesh, param_shardings, param_specs
from jaxdefense.train.sharding import RULES, state_shardings
from train_helpers import TINY, CountingStream, tiny_params


def test_mesh_is_auto_with_named_axes():
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert all(t == AxisType.Auto for t in mesh.axis_types)
    with pytest.raises(ConfigError, match="only 8 devices"):
        make_mesh(fsdp=16)


def test_param_specs_follow_rules():
    mesh = make_mesh(fsdp=4, tensor=2)
    specs = param_specs(tiny_params(), mesh)
    assert specs["embed"] == P("tensor", "fsdp")
    assert specs["final_norm"] == P()
    layers = specs["layers"]
    assert layers["wq"] == layers["wk"] == layers["w_gate"] == P(None, "fsdp", "tensor")
    assert layers["wo"] == layers["w_down"] == P(None, "tensor", "fsdp")
    assert layers["attn_norm"] == P()
    untied = jax.eval_shape(lambda: init_params(
        named_config("tiny", tie_embeddings=False, qkv_bias=True, family="qwen2"), jax.random.key(0)))
    specs = param_specs(untied, mesh)
    assert specs["lm_head"] == P("fsdp", "tensor")
    assert specs["layers"]["bq"] == P(None, "tensor")
    # batch over (data, fsdp)
    assert batch_sharding(make_mesh(data=2, fsdp=4)).spec == P(("data", "fsdp"))


@pytest.mark.parametrize("cfg", [named_config("tiny-qwen2", tie_embeddings=False), named_config("tiny-qwen3")])
def test_name_rules_agree_with_the_weight_table(cfg):
    """param_specs (by leaf name) equals the spec of each leaf's param_axes entry, for every weight."""
    mesh = make_mesh(fsdp=4, tensor=2)
    abstract = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    from_table = jax.tree.map(lambda ax, p: logical_to_spec(ax, p.shape, mesh), param_axes(cfg), abstract,
                              is_leaf=lambda x: isinstance(x, tuple))
    specs = param_specs(abstract, mesh)
    assert specs == from_table
    assert specs["layers"]["wv"] == P(None, "fsdp", "tensor")
    if cfg.qk_norm:
        assert specs["layers"]["q_norm"] == P()
    else:
        assert specs["layers"]["bk"] == P(None, "tensor") and specs["lm_head"] == P("fsdp", "tensor")


def test_indivisible_dims_fall_back_to_replication():
    mesh = make_mesh(fsdp=8)
    odd = {"embed": np.zeros((510, 60), np.float32), "layers": {"wq": np.zeros((2, 64, 12), np.float32)},
           "mystery": np.zeros((8, 8), np.float32)}
    specs = param_specs(odd, mesh)
    assert specs["embed"] == P()  # 60 % 8 != 0
    assert specs["layers"]["wq"] == P(None, "fsdp")
    assert specs["mystery"] == P()  # unknown names are replicated
    # LoRA factors follow their base weight: a [L, in, r], b [L, r, out]
    lora = {"layers": {"wq": {"a": np.zeros((2, 64, 4)), "b": np.zeros((2, 4, 64))}}}
    mesh2 = make_mesh(fsdp=4, tensor=2)
    assert param_specs(lora, mesh2)["layers"]["wq"] == {"a": P(None, "fsdp"), "b": P(None, None, "tensor")}


def test_colliding_physical_axes_raise():
    rules = {**RULES, "vocab": ("fsdp",)}
    with pytest.raises(ConfigError, match="'vocab' and 'embed' both map to mesh axis 'fsdp'"):
        logical_to_spec(("vocab", "embed"), (512, 64), make_mesh(fsdp=8), rules)
    with pytest.raises(ConfigError, match="no rule"):
        logical_to_spec(("nonsense",))


def test_optimizer_state_follows_params():
    import optax

    mesh = make_mesh(fsdp=8)
    shard = param_shardings(tiny_params(), mesh)
    state = jax.eval_shape(optax.adamw(1e-3).init, tiny_params())
    out = state_shardings(state, tiny_params(), shard, mesh)
    assert out[0].mu == shard and out[0].nu == shard
    assert out[0].count.spec == P()


@pytest.mark.parametrize("shape", [dict(fsdp=8), dict(data=2, fsdp=2, tensor=2)])
def test_sharded_forward_equals_single_device(shape):
    mesh = make_mesh(**shape)
    batch = CountingStream(seq_len=16).batch_at(0)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    mask[:2, :3] = 0  # left padding on two rows
    fwd = jax.jit(lambda p, i, m: forward(TINY, p, i, attention_mask=m))
    ref = fwd(tiny_params(), ids, mask)
    p_shard = param_shardings(tiny_params(), mesh)
    params = jax.device_put(tiny_params(), p_shard)
    ids_s, mask_s = jax.device_put((ids, mask), batch_sharding(mesh))
    with jax.set_mesh(mesh):  # the activation constraints apply under a mesh
        out = jax.jit(lambda p, i, m: forward(TINY, p, i, attention_mask=m))(params, ids_s, mask_s)
    assert out.sharding.mesh.shape == mesh.shape
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)
    assert float(jnp.max(jnp.abs(out - ref))) < 1e-4


def test_cluster_detection_from_scheduler_variables():
    """Only a launch of more than one process counts as a cluster; JAXDEFENSE_DISTRIBUTED=0 opts out."""
    from jaxdefense.train.distributed import detected_cluster

    assert detected_cluster({}) is None
    assert detected_cluster({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}) is None  # salloc shell, no srun step
    assert detected_cluster({"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) is None
    assert detected_cluster({"SLURM_JOB_ID": "7", "SLURM_PROCID": "3", "SLURM_NTASKS": "4"}) == "slurm"
    assert detected_cluster({"OMPI_COMM_WORLD_SIZE": "2"}) == "openmpi"
    assert detected_cluster({"TPU_WORKER_HOSTNAMES": "t0"}) is None
    assert detected_cluster({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}) == "tpu"
    assert detected_cluster({"OMPI_COMM_WORLD_SIZE": "2", "JAXDEFENSE_DISTRIBUTED": "0"}) is None
