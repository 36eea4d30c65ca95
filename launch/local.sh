#!/usr/bin/env bash
# Run a multi-process JAX job on this machine, each process with its own simulated CPU devices.
#
#   launch/local.sh NUM_PROCESSES COMMAND [ARGS...]
#   launch/local.sh 2 .venv/bin/scm-jax train --config mnist:smoke --workdir runs/two_procs
#
# Starts NUM_PROCESSES copies of COMMAND with the explicit start-up variables that
# scm_jax.distributed.initialize() reads (SCM_JAX_COORDINATOR=127.0.0.1:<free port>,
# SCM_JAX_NUM_PROCESSES, SCM_JAX_PROCESS_ID=0..N-1), JAX_PLATFORMS=cpu and
# --xla_force_host_platform_device_count in XLA_FLAGS (replacing any such flag already there).
# Every output line (stdout and stderr) is prefixed with [p<i>]. Waits for all; if one fails,
# the others get SIGTERM, then SIGKILL after a grace period, and the launcher exits with the
# first failure's status. Ctrl-C / SIGTERM to the launcher is forwarded to every process
# (scm-jax train checkpoints and stops on the first, stops at once on the second); a third
# one sends SIGKILL. Forwarding needs the launcher in the foreground of a terminal or started
# by a program: a shell script's `launch/local.sh ... &` ignores SIGINT (use SIGTERM then).
#
# Environment:
#   SCM_JAX_CPU_DEVICES  CPU devices per process (default 4)
#   SCM_JAX_PORT         coordinator port (default: a free one)
#   SCM_JAX_KILL_GRACE   seconds between SIGTERM and SIGKILL after a failure (default 10)
#   JAX_PLATFORMS        default cpu (what this launcher is for)
set -euo pipefail

die() {
    echo "launch/local.sh: $*" >&2
    exit 2
}
[[ $# -ge 2 ]] || die "usage: launch/local.sh NUM_PROCESSES COMMAND [ARGS...]"
num=$1
shift
[[ $num =~ ^[1-9][0-9]*$ ]] || die "NUM_PROCESSES must be a positive integer, got '$num'"
devices=${SCM_JAX_CPU_DEVICES:-4}
[[ $devices =~ ^[1-9][0-9]*$ ]] || die "SCM_JAX_CPU_DEVICES must be a positive integer, got '$devices'"
grace=${SCM_JAX_KILL_GRACE:-10}
[[ $grace =~ ^[0-9]+$ ]] || die "SCM_JAX_KILL_GRACE must be a number of seconds, got '$grace'"

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
if [[ -n ${SCM_JAX_PORT:-} ]]; then
    port=$SCM_JAX_PORT
    [[ $port =~ ^[0-9]+$ ]] && ((port > 0 && port < 65536)) || die "SCM_JAX_PORT must be 1..65535, got '$port'"
else
    for _ in $(seq 50); do
        port=$((20000 + RANDOM % 40000))
        port_in_use "$port" || break
    done
fi

# XLA_FLAGS without an inherited device count (pytest's conftest sets 8), plus ours.
flags=$(printf '%s' "${XLA_FLAGS:-}" | sed -E 's/--xla_force_host_platform_device_count=[^ ]*//g')
export XLA_FLAGS="${flags} --xla_force_host_platform_device_count=${devices}"
export XLA_FLAGS=${XLA_FLAGS# }
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
export SCM_JAX_COORDINATOR="127.0.0.1:${port}" SCM_JAX_NUM_PROCESSES=$num
export PYTHONUNBUFFERED=1 # lines appear as they are printed, not when a buffer fills

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "[launch] $num processes x $devices $JAX_PLATFORMS devices, coordinator $SCM_JAX_COORDINATOR" >&2

prefix() { # copy stdin to stdout, each line prefixed, as soon as it arrives (awk may buffer)
    local line
    while IFS= read -r line || [[ -n $line ]]; do
        printf '%s%s\n' "$1" "$line"
    done
}

pids=()
prefixers=()
set -m # each process in its own process group: a terminal's Ctrl-C reaches only this script
for ((i = 0; i < num; i++)); do
    mkfifo "$tmp/p$i"
    # The prefixer ignores INT/TERM so that it prints the lines written while a process stops.
    (trap '' INT TERM && prefix "[p$i] " <"$tmp/p$i") &
    prefixers+=($!)
    SCM_JAX_PROCESS_ID=$i "$@" >"$tmp/p$i" 2>&1 &
    pids+=($!)
done
set +m

signal_all() { # signal the process groups that are still running
    local pid
    for pid in "${pids[@]}"; do
        [[ -n $pid ]] && kill -s "$1" -- "-$pid" 2>/dev/null || true
    done
}
forwarded=0 # after a forwarded signal, non-zero exits are the processes stopping as asked
forward() { # the third signal kills (a process blocked in a collective cannot react)
    forwarded=$((forwarded + 1))
    if ((forwarded >= 3)); then
        echo "[launch] third signal: SIGKILL" >&2
        signal_all KILL
    else
        signal_all "$1"
    fi
}
trap 'forward INT' INT
trap 'forward TERM' TERM

status=0
running=$num
failed_at=""
while ((running > 0)); do
    for i in "${!pids[@]}"; do
        pid=${pids[$i]}
        [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null || continue
        rc=0
        wait "$pid" || rc=$?
        pids[i]=""
        running=$((running - 1))
        if ((rc != 0 && status == 0)); then
            status=$rc
            if ((forwarded == 0)); then
                failed_at=$SECONDS
                echo "[launch] process $i exited with status $rc; stopping the others" >&2
                signal_all TERM
            fi
        fi
    done
    if [[ -n $failed_at ]] && ((running > 0 && SECONDS - failed_at >= grace)); then
        echo "[launch] $running process(es) still running ${grace} s after SIGTERM: SIGKILL" >&2
        signal_all KILL
        failed_at=""
    fi
    ((running > 0)) && sleep 0.2
done
wait "${prefixers[@]}" 2>/dev/null || true
exit "$status"
