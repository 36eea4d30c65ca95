"""Multi-process start-up: :func:`initialize` before anything touches a JAX device.

Every process of a multi-host run calls ``initialize()`` first thing (``scm-jax train`` and
``python -m scm_jax.main`` do). Where a process learns about the others, first match wins:

1. ``SCM_JAX_DISTRIBUTED=off`` (or ``0``): one process, whatever the environment says.
   ``SCM_JAX_DISTRIBUTED=jax``: call ``jax.distributed.initialize()`` with no arguments and let
   JAX detect everything it knows (Kubernetes with the ``kubernetes`` package, ...).
2. The explicit variables, all three or none: ``SCM_JAX_COORDINATOR`` (``host:port`` of process
   0), ``SCM_JAX_NUM_PROCESSES``, ``SCM_JAX_PROCESS_ID`` (0 .. N-1), and optionally
   ``SCM_JAX_LOCAL_DEVICE_IDS`` (``0,1,2,3``: the accelerators this process uses; default all).
   ``launch/local.sh`` and ``launch/k8s_jobset.yaml`` set them.
3. JAX's own detection: a SLURM step with more than one task (``srun``), Open MPI 4 with more
   than one rank (``mpirun``; JAX reads ``OMPI_MCA_orte_hnp_uri``), a Cloud TPU VM (all workers
   of a slice: the metadata server or GKE's ``TPU_WORKER_HOSTNAMES``). ``SCM_JAX_LOCAL_DEVICE_IDS``
   still applies (JAX's SLURM and MPI detection give each process one GPU, its local rank).
4. Nothing: one process, and ``jax.distributed`` is not called at all.

``jax.distributed.initialize`` must run before the XLA backend starts (any ``jax.devices()``,
array or jit call); :func:`initialize` raises a RuntimeError saying so when it is too late.
On CPU, cross-process collectives use gloo (``jax_cpu_collectives_implementation``), which
2-process runs of ``launch/local.sh`` on a laptop need.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping

import jax

ENV_MODE = "SCM_JAX_DISTRIBUTED"
ENV_COORDINATOR = "SCM_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "SCM_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "SCM_JAX_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "SCM_JAX_LOCAL_DEVICE_IDS"
EXPLICIT_VARS = (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)
# What JAX's SLURM detection reads (jax/_src/clusters/slurm_cluster.py, jax 0.10 and 0.11).
SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
              "SLURM_LOCALID")  # fmt: skip
# What JAX's Open MPI detection reads (set by Open MPI 4's mpirun; ompi_cluster.py).
OMPI_VARS = ("OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK")
METHODS = ("single", "explicit", "slurm", "ompi", "tpu", "jax")
_DESCRIPTION = {"explicit": "SCM_JAX_* environment", "slurm": "SLURM", "ompi": "Open MPI",
                "tpu": "Cloud TPU", "jax": "jax.distributed"}  # fmt: skip


class DistributedConfigError(ValueError):
    """The environment describes a multi-process run incompletely or inconsistently."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """How this process starts (from :func:`plan_from_env`; nothing has happened yet).

    Attributes:
      method: one of :data:`METHODS`; ``'single'`` means no ``jax.distributed`` call.
      coordinator: ``host:port`` of process 0 (None: JAX finds it).
      num_processes, process_id: None where JAX finds them.
      local_device_ids: accelerator ids this process uses (None: JAX's default).
      note: why a cluster environment still runs as a single process ('' otherwise).
    """

    method: str
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None
    note: str = ""

    @property
    def multi_process(self) -> bool:
        """Whether ``jax.distributed.initialize`` is called."""
        return self.method != "single"


@dataclasses.dataclass(frozen=True)
class DistributedInfo:
    """What :func:`initialize` set up (read from JAX afterwards).

    Attributes:
      process_index, process_count: ``jax.process_index()`` and ``jax.process_count()``.
      local_device_count, device_count: this process's and all processes' devices.
      platform: ``'cpu'``, ``'gpu'`` or ``'tpu'``.
      method: the :class:`Plan` method; coordinator: ``host:port`` or None (one process).
      note: as in :class:`Plan`.
    """

    process_index: int
    process_count: int
    local_device_count: int
    device_count: int
    platform: str
    method: str
    coordinator: str | None = None
    note: str = ""

    def summary(self) -> str:
        """One line: which process of how many, the devices, the coordinator."""
        if self.method == "single":
            why = f" ({self.note})" if self.note else ""
            return f"single process{why}: {self.device_count} {self.platform} devices"
        how = _DESCRIPTION.get(self.method, self.method) + (f", {self.note}" if self.note else "")
        return (
            f"process {self.process_index} of {self.process_count} ({how}, coordinator "
            f"{self.coordinator or '?'}): {self.local_device_count} local / {self.device_count} "
            f"global {self.platform} devices"
        )


def _int(environ: Mapping[str, str], name: str, minimum: int, hint: str) -> int:
    text = environ[name].strip()
    try:
        value = int(text)
    except ValueError:
        raise DistributedConfigError(f"{name}={text!r} is not an integer; {hint}") from None
    if value < minimum:
        raise DistributedConfigError(f"{name}={value} must be >= {minimum}; {hint}")
    return value


def parse_coordinator(text: str) -> str:
    """Check ``host:port`` (``[v6-address]:port`` too) and return it stripped.

    Raises:
      DistributedConfigError: no host, no port, or a port outside 1..65535.
    """
    text = text.strip()
    host, sep, port = text.rpartition(":")
    if not sep or not host.strip("[]") or not port.isdigit() or not 0 < int(port) < 65536:
        raise DistributedConfigError(
            f"{ENV_COORDINATOR}={text!r} is not host:port; set it to process 0's address and a "
            "free port reachable from every process, e.g. 10.0.0.1:12345 or localhost:12345"
        )
    return text


def parse_device_ids(text: str) -> tuple[int, ...]:
    """``'0,1,2'`` -> ``(0, 1, 2)``: distinct non-negative ints.

    Raises:
      DistributedConfigError: an empty list, a non-integer, a negative or repeated id.
    """
    parts = [p.strip() for p in text.split(",")]
    hint = f"set {ENV_LOCAL_DEVICE_IDS} to distinct device numbers like 0,1,2,3 (or unset it)"
    if not all(p.isdigit() for p in parts):
        raise DistributedConfigError(f"{ENV_LOCAL_DEVICE_IDS}={text!r}: {hint}")
    ids = tuple(int(p) for p in parts)
    if len(set(ids)) != len(ids):
        raise DistributedConfigError(f"{ENV_LOCAL_DEVICE_IDS}={text!r} repeats an id; {hint}")
    return ids


def _explicit(environ: Mapping[str, str], local_ids: tuple[int, ...] | None) -> Plan:
    missing = [v for v in EXPLICIT_VARS if not environ.get(v, "").strip()]
    if missing:
        given = [v for v in EXPLICIT_VARS if v not in missing]
        raise DistributedConfigError(
            f"{' and '.join(given)} {'is' if len(given) == 1 else 'are'} set but "
            f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not; a multi-process "
            f"start needs all three ({ENV_COORDINATOR}=host:port of process 0, "
            f"{ENV_NUM_PROCESSES}=N, {ENV_PROCESS_ID}=0..N-1), or none of them for one process"
        )
    coordinator = parse_coordinator(environ[ENV_COORDINATOR])
    n = _int(environ, ENV_NUM_PROCESSES, 1, "set it to the number of processes of the run")
    pid = _int(environ, ENV_PROCESS_ID, 0, "set it to this process's id, 0 for the coordinator")
    if pid >= n:
        raise DistributedConfigError(
            f"{ENV_PROCESS_ID}={pid} is out of range for {ENV_NUM_PROCESSES}={n}; process ids "
            f"run from 0 to {n - 1}"
        )
    return Plan("explicit", coordinator, n, pid, local_ids)


def _world_size(environ: Mapping[str, str], name: str) -> int:
    return _int(environ, name, 1, "it is set by the cluster launcher; check the job script")


def plan_from_env(environ: Mapping[str, str], *, on_tpu_vm: bool = False) -> Plan:
    """Decide how this process starts, from environment variables only (see the module doc).

    Args:
      environ: the environment (``os.environ``).
      on_tpu_vm: whether JAX found a Cloud TPU VM when it was imported.
    Returns:
      A :class:`Plan`; nothing is initialised.
    Raises:
      DistributedConfigError: a half-set or malformed ``SCM_JAX_*`` variable (one line naming
        it and the fix).
    """
    mode = environ.get(ENV_MODE, "").strip().lower()
    if mode not in ("", "auto", "off", "0", "jax"):
        raise DistributedConfigError(
            f"{ENV_MODE}={environ[ENV_MODE]!r}: use 'off' (one process), 'jax' (JAX's own "
            "detection) or leave it unset (SCM_JAX_* variables, SLURM, Open MPI, Cloud TPU)"
        )
    if mode in ("off", "0"):
        return Plan("single", note=f"{ENV_MODE}={environ[ENV_MODE].strip()}")
    ids_text = environ.get(ENV_LOCAL_DEVICE_IDS, "").strip()
    local_ids = parse_device_ids(ids_text) if ids_text else None
    if mode == "jax":
        return Plan("jax", local_device_ids=local_ids)
    if any(environ.get(v, "").strip() for v in EXPLICIT_VARS):
        return _explicit(environ, local_ids)
    if all(v in environ for v in SLURM_VARS):
        n = _world_size(environ, "SLURM_NTASKS")
        if n == 1:
            return Plan("single", note="a SLURM step of one task")
        pid = _int(environ, "SLURM_PROCID", 0, "it is set by srun; start the job with srun")
        return Plan("slurm", None, n, pid, local_ids)
    if all(v in environ for v in OMPI_VARS):
        n = _world_size(environ, "OMPI_COMM_WORLD_SIZE")
        if n == 1:
            return Plan("single", note="an Open MPI job of one rank")
        pid = _int(environ, "OMPI_COMM_WORLD_RANK", 0, "it is set by mpirun")
        return Plan("ompi", None, n, pid, local_ids)
    if on_tpu_vm:
        return Plan("tpu", local_device_ids=local_ids)
    return Plan("single")


def _on_tpu_vm() -> bool:
    """Whether ``import jax`` found a Cloud TPU VM (a private flag; False where it is absent)."""
    try:
        from jax._src import cloud_tpu_init
    except ImportError:
        return False
    return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def backend_initialized() -> bool | None:
    """Whether JAX's XLA backend has started (None: this jax cannot tell; then JAX checks)."""
    try:
        from jax._src import xla_bridge
    except ImportError:
        return None
    check = getattr(xla_bridge, "backends_are_initialized", None)
    return None if check is None else bool(check())


def _too_late(plan: Plan) -> RuntimeError:
    return RuntimeError(
        f"scm_jax.distributed.initialize() found a multi-process run ({plan.method}) but JAX's "
        "backend has already started in this process (something called jax.devices(), made an "
        "array or ran a jitted function first); call initialize() before any other JAX call"
    )


def _use_gloo_on_cpu() -> None:
    """Cross-process collectives on CPU devices: gloo, unless another one was chosen."""
    try:
        if jax.config.jax_cpu_collectives_implementation is None:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except AttributeError:  # a jax without the option: nothing to choose
        pass


def _coordinator_address(plan: Plan) -> str | None:
    """The coordinator JAX connected to (read back for auto-detected runs)."""
    if plan.coordinator is not None:
        return plan.coordinator
    try:
        from jax._src import distributed as jax_distributed
    except ImportError:
        return None
    return getattr(getattr(jax_distributed, "global_state", None), "coordinator_address", None)


def _print(line: str) -> None:
    print(line, flush=True)


def initialize(
    *, environ: Mapping[str, str] | None = None, log: Callable[[str], None] | None = _print,
    timeout_s: int = 300,
) -> DistributedInfo:  # fmt: skip
    """Join the multi-process run this process belongs to (or stay single), then summarise.

    Call before any other JAX call that touches devices. Calling it again, or after
    ``jax.distributed.initialize`` ran elsewhere, only returns the summary.

    Args:
      environ: the environment to read (default ``os.environ``).
      log: receives the one-line summary, on process 0 only (None: silent).
      timeout_s: how long to wait for all processes to connect to the coordinator.
    Returns:
      A :class:`DistributedInfo`.
    Raises:
      DistributedConfigError (a ValueError): a half-set or malformed ``SCM_JAX_*`` variable.
      RuntimeError: a multi-process run was found but JAX's backend had already started.
    """
    if jax.distributed.is_initialized():
        plan = Plan("jax", note="initialised before")
    else:
        plan = plan_from_env(os.environ if environ is None else environ, on_tpu_vm=_on_tpu_vm())
        if plan.multi_process:
            if backend_initialized():
                raise _too_late(plan)
            _use_gloo_on_cpu()
            explicit = plan.method == "explicit"
            try:
                jax.distributed.initialize(
                    coordinator_address=plan.coordinator,
                    num_processes=plan.num_processes,
                    process_id=plan.process_id,
                    local_device_ids=None if plan.local_device_ids is None
                    else list(plan.local_device_ids),
                    # Explicit: no auto-detection (SLURM's would pin one GPU per process).
                    cluster_detection_method="deactivate" if explicit
                    else {"slurm": "slurm", "ompi": "ompi"}.get(plan.method),
                    initialization_timeout=timeout_s,
                )  # fmt: skip
            except RuntimeError as e:
                if "backend" in str(e) and "before" in str(e):
                    raise _too_late(plan) from None
                raise
    devices = jax.devices()
    info = DistributedInfo(
        process_index=jax.process_index(), process_count=jax.process_count(),
        local_device_count=jax.local_device_count(), device_count=len(devices),
        platform=devices[0].platform, method=plan.method,
        coordinator=_coordinator_address(plan) if plan.multi_process else None, note=plan.note,
    )  # fmt: skip
    if log is not None and info.process_index == 0:
        log(info.summary())
    return info
