"""Memory of the training step under each rematerialisation policy and micro-batch count.

  python benchmarks/memory_levers.py          # writes benchmarks/results/memory_levers.json

Two measurements (docs/training.md#memory-levers):

* ``residual_mib``: what the backward pass keeps of the forward, per device: the bytes of the
  residuals of ``jax.vjp`` of the loss on one device's micro-batch (B / devices / k samples),
  read from abstract shapes. It is what ``model.remat`` changes and it does not depend on a
  compiler's scheduling. Computed for a CIFAR-sized U-Net and for ImageNet-512 XL and XXL at
  32 samples per device (a 2048 batch on 64 devices, or on 8 with micro_batches=8).
* ``temp_mib``: XLA:CPU's compiled scratch memory per device (``memory_analysis()``) of the whole
  jitted sCT train step on 8 simulated CPU devices. XLA:CPU's scheduler may run a recomputation
  early, so its numbers show less of the remat saving than the residuals; GPUs and TPUs
  schedule for memory.
* ``step_gflops``: model FLOPs of the whole step over all devices (``scm_jax.flops``, read from
  the traced program: recomputation and every micro-batch included), the cost of the levers.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import json
import platform
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax

from scm_jax.config import defaults
from scm_jax.flops import count_flops
from scm_jax.losses import sct_loss
from scm_jax.networks import REMAT_POLICIES, NetworkDef, build_network
from scm_jax.run.state import abstract_state, init_state
from scm_jax.sharding import batch_sharding, make_mesh
from scm_jax.train.step import make_train_step

OUT = Path(__file__).resolve().parent / "results" / "memory_levers.json"
MIB = 2**20
DEVICES = 8
GLOBAL_BATCH = 128  # 16 per device
MICRO_BATCHES = (1, 2, 4)
# A CIFAR-10-sized U-Net (32x32x3, 10 classes): big enough that activations dominate.
MID_MODEL = {
    "arch": "edm2_unet", "img_resolution": 32, "img_channels": 3, "num_classes": 10,
    "model_channels": 32, "channel_mult": (1, 2, 2), "num_blocks": 2, "attn_resolutions": (16,),
    "channels_per_head": 32, "sigma_d": 0.5,
}  # fmt: skip
EMA = {"power_std": (0.05,), "halflife_kimg": 0.0}


def residual_bytes(nd: NetworkDef, batch: int) -> int:
    """Bytes of the residuals ``jax.vjp`` keeps for the sCT loss of ``batch`` samples."""
    params = jax.eval_shape(nd.init, jax.random.key(0))
    shape = (batch, *nd.sample_shape)

    def residuals(p: Any) -> list[jax.Array]:
        x0, t = jnp.zeros(shape), jnp.full((batch,), 0.5)
        labels = jnp.zeros((batch,), jnp.int32) if nd.num_classes else None
        guidance = jnp.ones((batch,)) if nd.guidance_input else None

        def loss(p: Any) -> jax.Array:
            return sct_loss(nd.apply_fn, nd.weight_fn, p, x0, x0, t, sigma_d=0.5, step=1,
                            labels=labels, guidance=guidance, key=jax.random.key(1))[0]  # fmt: skip

        return jax.tree.leaves(jax.vjp(loss, p)[1])

    return sum(a.size * a.dtype.itemsize for a in jax.eval_shape(residuals, params))


def compiled_step(remat: str, micro_batches: int) -> dict[str, float]:
    """Compile the mid-size sCT train step on the 8-device mesh; memory and FLOPs per device."""
    nd = build_network({**MID_MODEL, "remat": remat})
    mesh = make_mesh(data=DEVICES, fsdp=1)
    tx = optax.adam(1e-3)

    def make_state(key: jax.Array, init_net: Any) -> Any:
        return init_state(nd, tx, key, **EMA, init_net=init_net)

    abstract, shardings = abstract_state(make_state, mesh, jax.random.key(0), None)
    state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    xs = batch_sharding(mesh)
    x0 = jax.ShapeDtypeStruct((GLOBAL_BATCH, *nd.sample_shape), jnp.float32, sharding=xs)
    labels = jax.ShapeDtypeStruct((GLOBAL_BATCH,), jnp.int32, sharding=xs)
    step = make_train_step(
        nd, tx, lambda s: 1e-3, objective="sct", sigma_d=0.5, P_mean=-1.0, P_std=1.4,
        batch_size=GLOBAL_BATCH, **EMA, micro_batches=micro_batches, batch_sharding=xs,
    )  # fmt: skip
    t0 = time.time()
    exe = jax.jit(step).lower(state, x0, labels, None).compile()
    seconds = time.time() - t0
    mem = exe.memory_analysis()
    return {
        "temp_mib": mem.temp_size_in_bytes / MIB,
        "argument_mib": mem.argument_size_in_bytes / MIB,
        "step_gflops": count_flops(step, state, x0, labels, None) / 1e9,
        "compile_s": round(seconds, 1),
    }


def main() -> None:
    rows = []
    per_device = GLOBAL_BATCH // DEVICES
    for remat in REMAT_POLICIES:
        nd = build_network({**MID_MODEL, "remat": remat})
        for k in MICRO_BATCHES:
            row = {"model": "cifar_mid", "remat": remat, "micro_batches": k,
                   "samples_per_device_per_micro_batch": per_device // k,
                   "residual_mib": residual_bytes(nd, per_device // k) / MIB}  # fmt: skip
            row.update(compiled_step(remat, k))
            rows.append(row)
            print(json.dumps(row), flush=True)
    big = []
    for size in ("xl", "xxl"):
        model = defaults.load_config(f"imagenet512:size={size},objective=sct").model
        for remat in REMAT_POLICIES:
            nd = build_network({**model, "remat": remat})
            t0 = time.time()
            row = {"model": f"imagenet512_{size}", "remat": remat, "samples_per_device": 32,
                   "residual_gib": residual_bytes(nd, 32) / 2**30,
                   "seconds": round(time.time() - t0, 1)}  # fmt: skip
            big.append(row)
            print(json.dumps(row), flush=True)
    meta = {
        "command": "python benchmarks/memory_levers.py",
        "jax": jax.__version__,
        "python": platform.python_version(),
        "device": f"{DEVICES} simulated CPU devices (XLA:CPU), data-parallel mesh",
        "mid_model": MID_MODEL,
        "global_batch": GLOBAL_BATCH,
        "objective": "sct",
        "note": "residual_mib: bytes jax.vjp keeps for the backward pass (per device); temp_mib: "
        "XLA:CPU scratch memory of the compiled step per device; step_gflops: model FLOPs of the "
        "step (all devices, recomputation included)",
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"meta": meta, "mid": rows, "imagenet512": big}, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
