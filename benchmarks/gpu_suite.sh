#!/usr/bin/env bash
# The full GPU benchmark suite on one H100 / H200 in about 8 minutes (docs/performance.md#gpu-suite).
#
#   bash benchmarks/gpu_suite.sh [OUT_DIR]      # default: $OUT if set, else benchmarks/results
#
# Parts, each a script with its own wall-clock budget (seconds, overridable by the variables
# below): it starts no measurement that would not fit, and `timeout` stops it 20 s after the
# budget in any case, so a slow part cannot eat the others' time. Every script rewrites its JSON
# after each row, so a stopped part keeps what it measured ("complete": false).
#
#   jvp_overhead  JVP_BUDGET_S    (70)   forward vs jax.jvp, sizes s, xl, xxl, ... bf16 (+ f32)
#   train_step    TRAIN_BUDGET_S  (200)  the real donated train step, S and XL first, MFU
#   sampling      SAMPLE_BUDGET_S (120)  XXL 1/2-step vs the teacher's Heun (NFE 63 x 2 CFG),
#                                        batch 1/64/256, with the SD-VAE-sized decoder
#   peer_torch    PEER_BUDGET_S   (60)   the PyTorch peer: JAX vs PyTorch sCD step, S then XL;
#                                        60 s holds little of it (compiles, parity check): for
#                                        its full plan run it alone, PARTS=peer_torch
#                                        PEER_BUDGET_S=540 (docs/performance.md)
#
# PARTS="sampling train_step" runs only those parts; XLA_FLAGS from the environment are kept
# (and recorded in every result's meta), so a flag is compared by running the suite twice.
# EXTRA_ARGS are added to every part's command line. ALLOW_CPU=1 EXTRA_ARGS=--quick: a dry run
# of the driver on a CPU machine (each script's CPU version).
#
# Results: OUT_DIR/<part>_gpu.json, OUT_DIR/gpu_suite.log (with a summary of where the device
# time goes in the first measurement of each part: jax.profiler traces, benchmarks/
# profile_summary.py), OUT_DIR/profiles.tgz (the traces, for xprof) and OUT_DIR/report.md (the
# markdown tables, printed last). Python packages the GPU image lacks (ml-collections) are installed from
# wheels in .whl/ when that folder exists (docs/performance.md says how to fetch them).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-benchmarks/results}}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_suite.log"
PROFILES=/tmp/scm_jax_profiles
rm -rf "$PROFILES"
PY="${PYTHON:-python3}"

if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/scm_jax_site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/scm_jax_site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# The training launchers' XLA settings (launch/xla_flags.sh), and more of the GPU's memory
# for the XL train step without rematerialisation.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
. launch/xla_flags.sh

"$PY" - <<'EOF' 2>&1 | tee "$LOG" || exit 1
import os
import jax, ml_collections, flax, optax  # noqa: F401  (fails early if a package is missing)
d = jax.devices()[0]
print(f"jax {jax.__version__} on {jax.device_count()} x {d.device_kind} ({d.platform})")
if d.platform != "gpu" and os.environ.get("ALLOW_CPU") != "1":
    raise SystemExit("gpu_suite.sh needs a GPU (ALLOW_CPU=1: a dry run of the CPU versions)")
EOF

part() { # name budget_s script [args...]
    local name=$1 budget=$2
    shift 2
    echo "== $name (budget ${budget} s) ==" | tee -a "$LOG"
    # shellcheck disable=SC2086  # EXTRA_ARGS: several words
    timeout --kill-after=5 $((budget + 20)) "$PY" "$@" --budget-s "$budget" \
        --out "$OUT_DIR/${name}_gpu.json" --profile "$PROFILES/$name" ${EXTRA_ARGS:-} 2>&1 |
        tee -a "$LOG"
    echo "== $name: exit ${PIPESTATUS[0]} ==" | tee -a "$LOG"
}

for name in ${PARTS:-jvp_overhead train_step sampling peer_torch}; do
    case $name in
    jvp_overhead) part "$name" "${JVP_BUDGET_S:-70}" benchmarks/jvp_overhead.py ;;
    train_step) part "$name" "${TRAIN_BUDGET_S:-200}" benchmarks/train_step.py ;;
    sampling) part "$name" "${SAMPLE_BUDGET_S:-120}" benchmarks/sampling.py ;;
    peer_torch)
        part "$name" "${PEER_BUDGET_S:-60}" benchmarks/peer_torch.py
        ;;
    *) echo "unknown part $name (jvp_overhead, train_step, sampling, peer_torch)" | tee -a "$LOG" ;;
    esac
done

if [ -d "$PROFILES" ]; then
    "$PY" benchmarks/profile_summary.py "$PROFILES" --top 20 2>&1 | tee -a "$LOG"
    # The Chrome traces (small) always; the XProf .xplane.pb files too while under 15 MB.
    tar czf "$OUT_DIR/profiles.tgz" -C "$PROFILES" . 2>/dev/null
    if [ "$(stat -c %s "$OUT_DIR/profiles.tgz")" -gt 15000000 ]; then
        (cd "$PROFILES" && find . -name '*.trace.json.gz' -print0 |
            tar czf "$OUT_DIR/profiles.tgz" --null -T -)
    fi
fi
"$PY" benchmarks/report.py "$OUT_DIR"/*_gpu.json | tee "$OUT_DIR/report.md"
