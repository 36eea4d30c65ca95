"""The mesh and FSDP-sharded initialisation on 8 simulated CPU devices."""

from __future__ import annotations

import jax
import pytest
from jax.sharding import AxisType, PartitionSpec

from scm_jax.networks import build_network
from scm_jax.sharding import batch_sharding, fsdp_spec, make_mesh, sharded_init, state_shardings


def test_mesh_fills_and_validates():
    assert len(jax.devices()) == 8
    mesh = make_mesh(data=2, fsdp=-1)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
    assert all(t == AxisType.Auto for t in mesh.axis_types)
    assert dict(make_mesh(devices=jax.devices()[:1]).shape) == {"data": 1, "fsdp": 1}
    with pytest.raises(ValueError, match="cannot be split into data=3"):
        make_mesh(data=3, fsdp=-1)
    with pytest.raises(ValueError, match="does not match 8 devices"):
        make_mesh(data=2, fsdp=2)
    assert batch_sharding(mesh).spec == PartitionSpec(("data", "fsdp"))


def test_fsdp_rule():
    assert fsdp_spec((3, 3, 64, 128), 8) == PartitionSpec(None, None, None, "fsdp")
    assert fsdp_spec((3, 3, 96, 12), 8) == PartitionSpec(None, None, "fsdp", None)
    assert fsdp_spec((5, 3), 8) == PartitionSpec()  # nothing divisible: replicated
    assert fsdp_spec((), 8) == PartitionSpec()
    assert fsdp_spec((64, 64), 1) == PartitionSpec()


@pytest.mark.slow
def test_sharded_init_never_materialises_the_full_state():
    nd = build_network(dict(arch="edm2_unet", img_resolution=16, img_channels=4, num_classes=10,
                            model_channels=32, channel_mult=(1, 2), num_blocks=1,
                            attn_resolutions=(8,), channels_per_head=32))  # fmt: skip
    mesh = make_mesh(data=1, fsdp=8)
    key = jax.random.key(0)
    abstract = jax.eval_shape(nd.init_per_leaf, key)
    total = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(abstract))
    shardings = state_shardings(abstract, mesh)
    compiled = jax.jit(nd.init_per_leaf, out_shardings=shardings).lower(key).compile()
    mem = compiled.memory_analysis()
    if mem is not None:  # per-device buffers of the init program (quoted in docs/method.md)
        out, temp = mem.output_size_in_bytes, mem.temp_size_in_bytes
        print(f"state {total} B; per device: outputs {out} B, temporaries {temp} B")
        assert out + temp < total / 2
    params = sharded_init(nd.init_per_leaf, key, mesh)
    n_sharded = 0
    for leaf, sharding in zip(jax.tree.leaves(params), jax.tree.leaves(shardings), strict=True):
        assert leaf.sharding.spec == sharding.spec
        if "fsdp" in sharding.spec:
            n_sharded += 1
            assert all(s.data.size == leaf.size // 8 for s in leaf.addressable_shards)
    assert n_sharded >= 0.8 * sum(1 for a in jax.tree.leaves(abstract) if a.ndim >= 2)
