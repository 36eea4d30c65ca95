# XLA and NCCL settings for NVIDIA H100 and A100 GPUs: the one place where they are chosen.
#
#   . launch/xla_flags.sh          # bash or zsh; slurm.sbatch and k8s_jobset.yaml source it
#
# Every setting is a default: a flag already in XLA_FLAGS, or a variable already set, wins, and
# sourcing twice adds nothing. SCM_JAX_XLA_FLAGS=0 skips the file (to measure without it).
# The list is deliberately short: only flags that NVIDIA's JAX containers or JAX's GPU
# performance guide use widely. XLA aborts on a flag it does not know ("Unknown flag in
# XLA_FLAGS"), so every flag here must exist in jaxlib 0.10 and 0.11; tests/distributed_test.py
# starts JAX with them to check. On CPU and TPU the GPU flags are parsed and ignored.
#
# H100 (SM90) and A100 (SM80) take the same settings. What differs is left at NCCL's defaults:
# on HGX H100 (NVSwitch gen 3) NCCL >= 2.17 runs all-reduces with NVLink SHARP ("NVLS"), which
# reserves some GPU memory per communicator; if memory is tight, NCCL_NVLS_ENABLE=0 turns it
# off. A100 has no NVLS. Network settings are the cluster's business and are not set here:
# NCCL_SOCKET_IFNAME (the interface for bootstrap and socket traffic), NCCL_IB_HCA (which
# InfiniBand adapters), and on GKE the NCCL_* variables of the GPUDirect-TCPX(O) plugin images.

if [ "${SCM_JAX_XLA_FLAGS:-1}" != "0" ]; then
    _scm_jax_xla_flag() { # add --name=value unless XLA_FLAGS already sets --name
        case " ${XLA_FLAGS:-} " in
        *" --${1}="*) ;;
        *) XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--${1}=${2}" ;;
        esac
    }
    # Overlap communication with computation: the scheduler moves the FSDP all-gathers,
    # reduce-scatters and data-parallel all-reduces so that they run while independent kernels
    # compute. The one flag NVIDIA's JAX containers set by default.
    _scm_jax_xla_flag xla_gpu_enable_latency_hiding_scheduler true
    # Combine collectives of up to 128 MiB into one: the U-Nets have hundreds of small leaves
    # (gains, biases, 3x3 kernels), and one NCCL call per leaf is latency-bound. Larger values
    # launch fewer, bigger collectives but leave the scheduler less to overlap and cost memory.
    _scm_jax_xla_flag xla_gpu_all_gather_combine_threshold_bytes 134217728
    _scm_jax_xla_flag xla_gpu_reduce_scatter_combine_threshold_bytes 134217728
    _scm_jax_xla_flag xla_gpu_all_reduce_combine_threshold_bytes 134217728
    unset -f _scm_jax_xla_flag
    export XLA_FLAGS

    # JAX preallocates this fraction of each GPU's memory (JAX's default 0.75): a training job
    # owns its GPUs, and the XXL state needs the room. Lower it when sharing a GPU.
    export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}"
    # NCCL prints nothing by default; WARN shows the problems worth knowing (a network
    # fallback from InfiniBand to sockets, a failed communicator) without per-call noise.
    export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
fi
