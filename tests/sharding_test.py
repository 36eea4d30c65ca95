"""Meshes, sharding rules, sharded train steps and restores across meshes (8 simulated devices).

The golden file ``tests/golden/xxl_partition_specs.json`` holds the XXL parameters'
PartitionSpecs on 64-device meshes, computed from abstract shapes; after an intended change of
the rules or the network regenerate it with ``python tests/sharding_test.py`` and review the diff.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from scm_jax.config import defaults
from scm_jax.networks import build_network
from scm_jax.sharding import (
    DEFAULT_RULES,
    activation_rules,
    batch_sharding,
    check_batch,
    check_rules,
    describe_specs,
    fsdp_spec,
    logical_to_spec,
    make_mesh,
    mesh_from_config,
    sharded_init,
    state_shardings,
    tree_specs,
)

GOLDEN = Path(__file__).parent / "golden" / "xxl_partition_specs.json"
GOLDEN_MESHES = {"data8_fsdp8": {"data": 8, "fsdp": 8, "tensor": 1},
                 "data4_fsdp8_tensor2": {"data": 4, "fsdp": 8, "tensor": 2}}  # fmt: skip
P = PartitionSpec


def test_mesh_fills_and_validates():
    assert len(jax.devices()) == 8
    mesh = make_mesh(data=2, fsdp=-1)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert all(t == AxisType.Auto for t in mesh.axis_types)
    assert dict(make_mesh(2, 2, -1).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(make_mesh(devices=jax.devices()[:1]).shape) == {"data": 1, "fsdp": 1, "tensor": 1}
    with pytest.raises(ValueError, match="cannot be split into ICI mesh data=3"):
        make_mesh(data=3, fsdp=-1)
    with pytest.raises(ValueError, match="has 4 devices but there are 8"):
        make_mesh(data=2, fsdp=2)
    with pytest.raises(ValueError, match="at most one ICI mesh axis may be -1"):
        make_mesh(-1, -1)
    assert batch_sharding(mesh).spec == P(("data", "fsdp"))


def test_dcn_mesh_needs_as_many_processes_as_slices():
    with pytest.raises(ValueError, match=r"needs 2 processes but the devices span 1"):
        make_mesh(-1, 1, dcn={"data": 2})
    with pytest.raises(ValueError, match="unknown DCN mesh axes"):
        make_mesh(dcn={"model": 2})


def test_rules_map_logical_names_with_fallbacks():
    sizes = {"data": 2, "fsdp": 4, "tensor": 2}
    conv = ("kh", "kw", "in", "out")
    assert logical_to_spec(conv, (3, 3, 64, 128), sizes) == P(None, None, "fsdp", "tensor")
    # C_in = 2 is not divisible by fsdp: the FSDP fallback takes the largest dimension left.
    assert logical_to_spec(conv, (3, 3, 2, 128), sizes) == P(None, None, None, "tensor")
    assert logical_to_spec(conv, (3, 3, 2, 128), {"fsdp": 4}) == P(None, None, None, "fsdp")
    assert logical_to_spec(None, (5, 12), sizes) == P(None, "fsdp")  # unannotated: fallback
    assert logical_to_spec(("batch", None), (16, 3), sizes) == P(("data", "fsdp"))
    assert logical_to_spec(("batch", None), (6, 3), sizes) == P("data")  # 6 % 8: drop fsdp
    assert logical_to_spec((), (), sizes) == P()
    # The first applicable rule wins; a used axis is skipped.
    rules = (("a", "fsdp"), ("b", "fsdp"), ("b", "tensor"))
    assert logical_to_spec(("a", "b"), (8, 8), sizes, rules) == P("fsdp", "tensor")
    assert fsdp_spec((3, 3, 64, 128), 8) == P(None, None, None, "fsdp")
    assert fsdp_spec((5, 3), 8) == P()


def test_bad_rules_are_refused():
    with pytest.raises(ValueError, match="names the mesh axis \\['model'\\]"):
        check_rules([("out", "model")])
    with pytest.raises(ValueError, match="expected \\(logical name"):
        check_rules([("out",)])
    cfg = defaults.load_config("mnist:smoke")
    with cfg.unlocked():
        cfg.mesh.rules = (("out", "model"),)
    with pytest.raises(ValueError, match="mesh axes are data, fsdp, tensor"):
        mesh_from_config(cfg.mesh)


def test_bad_mesh_and_batch_fail_before_compiling(tmp_path):
    from scm_jax.train.loop import train

    cases = [({"mesh.data": 3, "mesh.fsdp": -1}, "cannot be split into ICI mesh data=3"),
             ({"mesh.data": 2, "mesh.fsdp": 2}, "has 4 devices but there are 8"),
             ({"mesh.fsdp": 8, "batch_size": 12}, "batch_size 12 is not divisible by data x fsdp"),
             ({"mesh.rules": (("out", "model"),)}, "names the mesh axis")]  # fmt: skip
    for over, message in cases:
        cfg = defaults.load_config("mnist:smoke")
        with cfg.unlocked():
            for k, v in over.items():
                section, _, name = k.rpartition(".")
                (cfg[section] if section else cfg)[name] = v
        with pytest.raises(ValueError, match=message):
            train(cfg, tmp_path / "run", log=lambda _: None)
        assert not (tmp_path / "run").exists()  # nothing written
    mesh = make_mesh(2, 2, 2)
    check_batch(8, mesh)  # tensor does not split the batch
    with pytest.raises(ValueError, match="2 micro-batches x data x fsdp"):
        check_batch(12, mesh, micro_batches=2)


def xxl_specs() -> dict[str, dict[str, str]]:
    cfg = defaults.load_config("imagenet512:size=xxl,objective=scd")
    abstract = build_network(cfg.model).abstract_params()
    return {name: describe_specs(tree_specs(abstract, sizes, DEFAULT_RULES))
            for name, sizes in GOLDEN_MESHES.items()}  # fmt: skip


def test_xxl_partition_specs_match_the_golden_file():
    """Computed abstractly (no 64 devices needed); regenerate: python tests/sharding_test.py."""
    golden = json.loads(GOLDEN.read_text())
    specs = xxl_specs()
    for name in GOLDEN_MESHES:
        changed = {k: (golden[name].get(k), v) for k, v in specs[name].items()
                   if golden[name].get(k) != v}  # fmt: skip
        missing = sorted(set(golden[name]) - set(specs[name]))
        assert not changed and not missing, (name, list(changed.items())[:5], missing[:5])
    big = [k for k, v in specs["data8_fsdp8"].items() if "fsdp" not in v]
    assert all("gain" in k or "weight']['linear" in k for k in big), big  # every matrix split


# --------------------------------------------------------------------- sharded train step


def _step_setup():
    from helpers import tiny_unet

    from scm_jax.optim import make_optimizer
    from scm_jax.run.state import init_state
    from scm_jax.train.step import make_train_step

    nd = tiny_unet(guidance_input=False, channel_mult=(1,), attn_resolutions=())
    tx, schedule = make_optimizer(name="adam", lr=1e-2, lr_ref_kimg=0, batch_size=8)
    step = make_train_step(
        nd, tx, schedule, objective="sct", sigma_d=0.5, P_mean=-0.4, P_std=1.6, batch_size=8,
        power_std=(0.1,), halflife_kimg=0.0,
    )  # fmt: skip
    state = init_state(nd, tx, jax.random.key(0), power_std=(0.1,), halflife_kimg=0.0)
    rng = np.random.default_rng(0)
    x0 = jnp.asarray(rng.standard_normal((8, 8, 8, 3)) * 0.5, jnp.float32)
    labels = jnp.asarray(rng.integers(0, 5, 8), jnp.int32)
    return step, state, x0, labels


@pytest.fixture(scope="module")
def one_device_step():
    """The sCT step's inputs and its result on one device."""
    step, state, x0, labels = _step_setup()
    ref = jax.jit(step)(jax.device_put(state, jax.devices()[0]), x0, labels, None)
    return step, state, x0, labels, ref


@pytest.mark.parametrize("shape", [(1, 8, 1), (2, 4, 1), (2, 2, 2)], ids=str)
def test_sharded_train_step_equals_one_device(shape, one_device_step):
    """fsdp=8, data=2 x fsdp=4 and data=2 x fsdp=2 x tensor=2 give one device's step."""
    step, state, x0, labels, (ref_state, ref_values) = one_device_step
    mesh = make_mesh(*shape)
    shardings = state_shardings(state, mesh).replace(
        step=NamedSharding(mesh, P()), rng=NamedSharding(mesh, P())
    )
    placed = jax.device_put(state, shardings)
    xs = jax.device_put((x0, labels), batch_sharding(mesh))
    with activation_rules(mesh):
        new, values = jax.jit(step, out_shardings=(shardings, None))(placed, *xs, None)
    if shape[2] > 1:
        assert any("tensor" in str(s.spec) for s in jax.tree.leaves(shardings))
    np.testing.assert_allclose(values["loss"], ref_values["loss"], rtol=2e-5)
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(ref_state.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=2e-6)


# ------------------------------------------------------------------- restore across meshes


@pytest.mark.parametrize("target", [(1, 4, 1), (2, 2, 1)], ids=str)
def test_restore_on_another_mesh_is_bit_exact(tmp_path, target):
    """Saved FSDP-sharded on 8 devices, restored on 4 devices (fsdp=4; data=2 x fsdp=2)."""
    from scm_jax.run.checkpoint import Checkpointer
    from scm_jax.run.state import state_shardings as train_shardings
    from scm_jax.run.state import with_shardings

    _, state, _, _ = _step_setup()
    state = state.replace(params=jax.tree.map(lambda p: p + 0.1234567, state.params))
    mesh8 = make_mesh(1, 8)
    saved = jax.device_put(state, train_shardings(state, mesh8))
    ckpt = Checkpointer(tmp_path)
    ckpt.save(saved, {"step": 0, "batch_size": 8})
    ckpt.close()
    mesh4 = make_mesh(*target, devices=jax.devices()[:4])
    abstract = jax.eval_shape(lambda: state)
    ckpt = Checkpointer(tmp_path, read_only=True)
    restored = ckpt.restore(with_shardings(abstract, train_shardings(abstract, mesh4)))
    ckpt.close()
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        assert a.sharding.mesh.devices.size == 4
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # bit-exact


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


if __name__ == "__main__":  # regenerate the golden file
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(xxl_specs(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}", file=sys.stderr)
