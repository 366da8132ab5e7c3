"""Multi-process start-up: `jax.distributed.initialize` from flags, our environment, or the cluster's.

Every process runs the same command; each builds the same global batch from
`stream.batch_at(step)` and feeds only its addressable shards, so results equal a
single-process run up to reduction order. On CPU the cross-process collectives use gloo.

Resolution order: explicit arguments (CLI --coordinator-address/--num-processes/--process-id),
then JAXDEFENSE_COORDINATOR / JAXDEFENSE_NUM_PROCESSES / JAXDEFENSE_PROCESS_ID, then a cluster
that jax detects by itself — an srun step of a SLURM job with more than one task, an Open MPI or
PMIx launch (mpirun) of more than one rank, a multi-host Cloud TPU slice — for which
`jax.distributed.initialize()` is called with no arguments and reads the coordinator, process
count and id from the scheduler's variables. JAXDEFENSE_DISTRIBUTED=0 disables the detection.
"""

from __future__ import annotations

import os

import jax

from jaxdefense.errors import ConfigError

ENV = {
    "coordinator_address": "JAXDEFENSE_COORDINATOR",
    "num_processes": "JAXDEFENSE_NUM_PROCESSES",
    "process_id": "JAXDEFENSE_PROCESS_ID",
}

# cluster → (variable whose presence names it, variable holding the process count, if any)
CLUSTERS = {
    "slurm": ("SLURM_PROCID", "SLURM_NTASKS"),  # SLURM_PROCID: inside an srun step
    "openmpi": ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_SIZE"),
    "pmix": ("PMIX_RANK", "PMIX_SIZE"),
    "tpu": ("TPU_WORKER_HOSTNAMES", None),
}

_initialized = False


def detected_cluster(env=None) -> str | None:
    """The multi-process cluster the environment describes ("slurm", "openmpi", "pmix", "tpu"),
    or None for a single process (a one-task SLURM job, one TPU host, a plain shell)."""
    env = os.environ if env is None else env
    if env.get("JAXDEFENSE_DISTRIBUTED", "").strip().lower() in ("0", "false", "no", "off"):
        return None
    for name, (marker, count) in CLUSTERS.items():
        if marker not in env:
            continue
        if count is not None:
            try:
                if int(env.get(count, "1")) > 1:
                    return name
            except ValueError:
                continue
        elif len([h for h in env[marker].split(",") if h.strip()]) > 1:
            return name
    return None


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: list[int] | None = None,
) -> bool:
    """Join a multi-process run; a no-op (returns False) when nothing is configured or detected.

    Values not given come from JAXDEFENSE_COORDINATOR, JAXDEFENSE_NUM_PROCESSES and
    JAXDEFENSE_PROCESS_ID; with none of them, from the cluster (`detected_cluster`). Must run
    before any JAX computation. Returns True once this process is part of a multi-process run."""
    global _initialized
    if _initialized:
        return True
    coordinator_address = coordinator_address or os.environ.get(ENV["coordinator_address"]) or None
    num_processes = num_processes if num_processes is not None else _env_int("num_processes")
    process_id = process_id if process_id is not None else _env_int("process_id")
    if coordinator_address is None and num_processes in (None, 1):
        if num_processes is None and process_id is None and detected_cluster() is not None:
            jax.distributed.initialize(local_device_ids=local_device_ids)
            _initialized = True
            return True
        return False
    if coordinator_address is None or num_processes is None or process_id is None:
        raise ConfigError(
            "multi-process: give all of --coordinator-address, --num-processes and --process-id "
            f"(or {', '.join(ENV.values())})"
        )
    if not 0 <= process_id < num_processes:
        raise ConfigError(f"--process-id: {process_id} is not in [0, {num_processes})")
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, KeyError, ValueError):  # option renamed/removed in a later jax
        pass
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
    )
    _initialized = True
    return True


def initialize_from_args(args) -> bool:
    return initialize(
        getattr(args, "coordinator_address", None),
        getattr(args, "num_processes", None),
        getattr(args, "process_id", None),
    )


def _env_int(name: str) -> int | None:
    raw = os.environ.get(ENV[name])
    if raw in (None, ""):
        return None
    try:
        return int(raw)
    except ValueError as e:
        raise ConfigError(f"{ENV[name]}: expected an integer, got {raw!r}") from e

