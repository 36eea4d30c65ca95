"""The benchmark suite (benchmarks/, docs/performance.md): every script's CPU version runs and
writes a sane record; the shared measurement helpers; the SD-VAE-sized decoder's size.

The scripts run as CI would run them by hand: in subprocesses (concurrently, one CPU device
each) with ``--cpu --quick --out`` into a temporary folder, so committed results are never
touched. ``--quick`` compiles without XLA's optimisations: the times are meaningless, the
records' structure and arithmetic are what is checked.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import pytest
from conftest import REPO

from scm_jax import bench
from scm_jax.networks.vae_decoder import SDVAEDecoder, init_random, raw_latents

SCRIPTS = ["jvp_overhead", "train_step", "sampling"]
HAS_TORCH = importlib.util.find_spec("torch") is not None
if HAS_TORCH:  # the PyTorch peer needs the torch extra
    SCRIPTS.append("peer_torch")


@pytest.fixture(scope="module")
def suite_runs(tmp_path_factory):
    """Run every suite script's CPU version at once; ``{name: (returncode, output, path)}``."""
    out = tmp_path_factory.mktemp("bench")
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    flags = env.get("XLA_FLAGS", "").split()  # one CPU device, not the tests' eight
    env["XLA_FLAGS"] = " ".join(f for f in flags if "device_count" not in f)
    procs = {}
    for name in SCRIPTS:
        path = out / f"{name}.json"
        cmd = [sys.executable, str(REPO / "benchmarks" / f"{name}.py"), "--cpu", "--quick",
               "--out", str(path), "--profile", str(out / "profiles" / name)]  # fmt: skip
        procs[name] = (subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True), path)  # fmt: skip
    t0 = time.time()
    results = {}
    for name, (proc, path) in procs.items():
        output, _ = proc.communicate(timeout=600)
        results[name] = (proc.returncode, output, path)
    print(f"suite CPU versions: {time.time() - t0:.0f} s")
    return results


def _record(suite_runs, name):
    code, output, path = suite_runs[name]
    assert code == 0, output[-3000:]
    data = json.loads(path.read_text())
    assert data["benchmark"] == name and data["complete"]
    meta = data["meta"]
    for key in ("platform", "device_kind", "jax", "python", "load_average", "time_utc"):
        assert key in meta
    assert data["rows"] and all(r["status"] == "ok" for r in data["rows"])
    assert "|---|" in output  # the markdown table is printed last
    return data


def _positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _mfu_ok(v):
    return v is None or 0 < v < 1


@pytest.mark.slow
def test_jvp_overhead_cpu_version(suite_runs):
    for r in _record(suite_runs, "jvp_overhead")["rows"]:
        assert _positive(r["forward_s"]) and _positive(r["jvp_s"])
        assert _positive(r["time_ratio_paired"])
        assert r["time_ratio"] == pytest.approx(r["jvp_s"] / r["forward_s"])
        # JAX's JVP with closed-over parameters: one extra product per layer (docs).
        assert 1.95 < r["model_flop_ratio"] < 2.2
        assert 1.8 < r["xla_flop_ratio"] < 2.4
        assert _mfu_ok(r["forward_mfu"]) and _mfu_ok(r["jvp_mfu"])


@pytest.mark.slow
def test_train_step_cpu_version(suite_runs):
    data = _record(suite_runs, "train_step")
    for r in data["rows"]:
        assert _positive(r["step_s"]) and _positive(r["images_per_s"])
        assert r["images_per_s"] == pytest.approx(r["global_batch"] / r["step_s"])
        assert r["loss_finite"]
        k = bench.OBJECTIVES[r["objective"]][2]
        assert r["convention_k"] == k
        # The convention's k F and the traced teacher + JVP + forward/backward agree.
        assert r["traced_gflops_per_sample"] == pytest.approx(r["model_gflops_per_sample"],
                                                              rel=0.05)  # fmt: skip
        assert r["xla_gflops_per_sample"] == pytest.approx(r["model_gflops_per_sample"], rel=0.3)
        assert r["alias_bytes"] > 0  # the state is donated
        assert _mfu_ok(r["mfu"])


@pytest.mark.slow
def test_sampling_cpu_version(suite_runs):
    data = _record(suite_runs, "sampling")
    kinds = {(r["kind"], r["steps"]) for r in data["rows"]}
    assert {("consistency", 1), ("consistency", 2), ("teacher", 0)} <= kinds
    assert ("consistency+decoder", 2) in kinds
    F = data["config"]["forward_gflops_per_sample"]
    for r in data["rows"]:
        assert _positive(r["median_s"]) and _positive(r["model_gflops"]) and _mfu_ok(r["mfu"])
        if r["kind"] in ("consistency", "teacher", "api"):  # traced: every step of the loop
            assert r["model_gflops"] == pytest.approx(
                r["nfe_per_sample"] * F * r["batch"], rel=0.02
            )
    teacher = next(r for r in data["rows"] if r["kind"] == "teacher")
    assert teacher["nfe_per_sample"] == 2 * data["config"]["teacher_nfe"]  # CFG: doubled
    assert data["speedups"]
    for s in data["speedups"]:
        assert _positive(s["speedup"])
        assert s["speedup"] == pytest.approx(s["teacher_s"] / s["consistency_s"])


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TORCH, reason="needs PyTorch (pip install 'scm-jax[torch]')")
def test_peer_torch_cpu_version(suite_runs):
    data = _record(suite_runs, "peer_torch")
    assert {r["variant"] for r in data["rows"]} == {"eager"}  # --quick: the eager step only
    for r in data["rows"]:
        # float32 parity of the two steps before timing: forward, loss, whole gradient
        assert r["check_ok"] and r["check_grad_tensors"] > 10
        assert r["check_forward_err"] < 1e-4 and r["check_loss_err"] < 1e-4
        assert r["check_grad_err"] < 1e-4
        assert _positive(r["jax_step_s"]) and _positive(r["torch_step_s"])
        assert r["speedup"] == pytest.approx(r["torch_step_s"] / r["jax_step_s"])
        assert r["torch_images_per_s"] == pytest.approx(r["batch"] / r["torch_step_s"])
        assert r["losses_finite"] and _positive(r["speedup_paired"])
        # closed-over parameters: JAX's JVP adds one product per layer, torch.func.jvp two
        assert 1.95 < r["jax_jvp_flop_ratio"] < 2.2 and 2.9 < r["torch_jvp_flop_ratio"] < 3.1
        assert r["jax_forward_gflops"] == pytest.approx(r["torch_forward_gflops"], rel=1e-3)
        assert _positive(r["jax_jvp_ratio"]) and _positive(r["torch_jvp_ratio"])


@pytest.mark.slow
def test_profiles_of_the_first_measurements_are_summarised(suite_runs, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from profile_summary import format_summary, summarize

    root = suite_runs["jvp_overhead"][2].parent / "profiles"
    for name in SCRIPTS:
        traces = sorted((root / name).rglob("*.trace.json.gz"))
        assert traces, f"{name} wrote no profile"
    s = summarize(traces[0])
    assert s["event_us"] > 0 and 0 < s["busy_us"] <= s["span_us"] * 1.001
    assert "by category" in format_summary(s)


@pytest.mark.slow
def test_report_prints_every_table(suite_runs):
    paths = [str(suite_runs[n][2]) for n in SCRIPTS]
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "report.py"), *paths],
                         cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    for name in SCRIPTS:
        assert f"### {name}:" in out


def test_peak_flops_and_mfu():
    assert bench.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert bench.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert bench.peak_flops("NVIDIA H200") == 989e12
    assert bench.peak_flops("cpu") is None
    assert bench.mfu(989e12 * 0.5, 1.0, kind="NVIDIA H200") == pytest.approx(0.5)
    assert bench.mfu(1e12, 1.0, devices=2, kind="NVIDIA H200") == pytest.approx(1 / 1978)
    assert bench.mfu(1e12, 1.0, kind="cpu") is None


def test_time_calls_counts_inner_calls():
    calls = []
    timing = bench.time_calls(lambda: calls.append(1) or jnp.zeros(()), warmup=2, reps=3, inner=4)
    assert len(calls) == 2 + 3 * 4
    assert timing["samples"] == 3 and timing["inner"] == 4
    assert 0 < timing["min_s"] <= timing["median_s"] <= timing["max_s"]
    assert timing["iqr_s"] == pytest.approx(timing["q3_s"] - timing["q1_s"])


def test_run_guarded_records_oom_and_reraises_the_rest():
    def oom():
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 8 GiB")

    assert bench.run_guarded(oom)["status"] == "oom"
    assert bench.run_guarded(lambda: {"x": 1}) == {"status": "ok", "x": 1}
    with pytest.raises(ValueError):
        bench.run_guarded(lambda: (_ for _ in ()).throw(ValueError("a bug")))


def test_results_are_rewritten_after_every_row(tmp_path):
    res = bench.Results(tmp_path / "r.json", "x", "cmd", {"a": 1})
    res.add({"v": 1})
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["rows"] == [{"v": 1}] and not data["complete"]
    res.finish(extra=2)
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["complete"] and data["extra"] == 2 and data["meta"]["devices"] >= 1


def test_suite_config_objectives():
    cfg = bench.suite_config("smoke", "scd")
    assert not cfg.model.guidance_input and cfg.teacher.guidance_max == 1.0
    assert cfg.model.dtype == "bfloat16" and cfg.model.param_dtype == "float32"
    cfg = bench.suite_config("smoke", "scd_cfg", dtype="float32", batch_size=4)
    assert cfg.model.guidance_input and cfg.teacher.guidance_max == 2.0 and cfg.batch_size == 4
    with pytest.raises(ValueError, match="unknown objective"):
        bench.suite_config("smoke", "dmd")


def test_sd_vae_decoder_has_the_released_size():
    """sd-vae-ft-mse's decoder + post_quant_conv: 49,490,199 parameters; 64x64x4 -> 512x512x3."""
    dec = SDVAEDecoder()
    z = jax.ShapeDtypeStruct((1, 64, 64, 4), jnp.float32)
    variables = jax.eval_shape(dec.init, jax.random.key(0), z)
    assert sum(a.size for a in jax.tree.leaves(variables)) == 49_490_199
    assert jax.eval_shape(dec.apply, variables, z).shape == (1, 512, 512, 3)


def test_sd_vae_decoder_runs_in_bf16_and_raw_latents_invert_the_normalisation():
    dec = SDVAEDecoder(block_out_channels=(32, 32), layers_per_block=1, dtype=jnp.bfloat16)
    z = jax.random.normal(jax.random.key(0), (2, 4, 4, 4))
    variables = init_random(dec, jax.random.key(1), latent_hw=4)
    y = jax.jit(dec.apply)(variables, z)
    assert y.shape == (2, 8, 8, 3) and y.dtype == jnp.bfloat16 and bool(jnp.isfinite(y).all())
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(variables))
    mean, std = (1.0, -1.0, 0.5, 0.0), (5.0, 4.0, 3.0, 2.0)
    latent = raw_latents(z, mean, std, 0.5)
    back = (latent - jnp.asarray(mean)) * 0.5 / jnp.asarray(std)
    assert jnp.allclose(back, z, atol=1e-5)


def test_dmd_critic_loop_times_both_versions(tmp_path):
    """``benchmarks/dmd_critic_loop.py --quick`` (the toy MLP) times the unrolled and the looped
    critic of DMD and rCM and records both (in this process: no device of its own needed)."""
    spec = importlib.util.spec_from_file_location(
        "dmd_critic_loop", REPO / "benchmarks" / "dmd_critic_loop.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "dmd_critic_loop.json"
    module.main(["--quick", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["benchmark"] == "dmd_critic_loop" and data["complete"]
    pairs = {(r["objective"], r["critic_updates"], r["critic"]) for r in data["rows"]}
    assert pairs == {("dmd", 2, "unrolled"), ("dmd", 2, "loop"), ("rcm", 4, "unrolled"),
                     ("rcm", 4, "loop")}  # fmt: skip
    assert all(_positive(r["median_s"]) and _positive(r["loop_over_this"]) for r in data["rows"])
