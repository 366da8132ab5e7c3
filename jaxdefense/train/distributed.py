"""Multi-process start-up: `jax.distributed.initialize` from flags or environment.

Every process runs the same command; each builds the same global batch from
`stream.batch_at(step)` and feeds only its addressable shards, so results equal a
single-process run up to reduction order. On CPU the cross-process collectives use gloo.
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

_initialized = False


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: list[int] | None = None,
) -> bool:
    """Join a multi-process run; a no-op (returns False) when nothing is configured.

    Values not given come from JAXDEFENSE_COORDINATOR, JAXDEFENSE_NUM_PROCESSES and
    JAXDEFENSE_PROCESS_ID. Must run before any JAX computation."""
    global _initialized
    if _initialized:
        return True
    coordinator_address = coordinator_address or os.environ.get(ENV["coordinator_address"]) or None
    num_processes = num_processes if num_processes is not None else _env_int("num_processes")
    process_id = process_id if process_id is not None else _env_int("process_id")
    if coordinator_address is None and num_processes in (None, 1):
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

