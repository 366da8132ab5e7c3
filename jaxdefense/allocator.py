"""Optional jemalloc for CPU runs: the CLI and the benchmarks re-execute themselves once with
`LD_PRELOAD=libjemalloc.so.2` when that library is installed (Debian/Ubuntu `libjemalloc2`).

XLA:CPU allocates and frees its large step buffers on every step; glibc's malloc hands them back
to the kernel and page-faults them in again, which jemalloc's arenas avoid. Nothing requires it:
without the library, or with `JAXDEFENSE_JEMALLOC=0`, the process runs as it was started.
`JAXDEFENSE_JEMALLOC=/path/libjemalloc.so.2` names the library file explicitly.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from jaxdefense.errors import ConfigError

ENV = "JAXDEFENSE_JEMALLOC"
MARKER = "_JAXDEFENSE_PRELOADED"
CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
    "/usr/lib64/libjemalloc.so.2",
    "/usr/local/lib/libjemalloc.so.2",
    "/usr/lib/libjemalloc.so.2",
)


def jemalloc_path(env=None, candidates=CANDIDATES) -> str | None:
    """The jemalloc library to preload: $JAXDEFENSE_JEMALLOC if it is a path (ConfigError if that
    file does not exist), None if it is 0/off or jemalloc is already preloaded, else the first
    installed candidate."""
    env = os.environ if env is None else env
    choice = env.get(ENV, "auto").strip()
    if choice.lower() in ("0", "off", "false", "no") or "jemalloc" in env.get("LD_PRELOAD", ""):
        return None
    if choice.lower() not in ("", "auto", "1", "on", "true", "yes"):
        if not Path(choice).is_file():
            raise ConfigError(f"{ENV}={choice}: no such library file")
        return choice
    return next((c for c in candidates if Path(c).is_file()), None)


def preload_jemalloc(env=None) -> None:
    """Re-execute this interpreter with jemalloc preloaded, once, when `jemalloc_path` finds it.
    Call before heavy work starts (the re-executed process runs from the beginning)."""
    env = dict(os.environ if env is None else env)
    if env.get(MARKER) or not sys.platform.startswith("linux"):
        return
    path = jemalloc_path(env)
    if path is None:
        return
    preload = env.get("LD_PRELOAD", "")
    env.update({MARKER: "1", "LD_PRELOAD": f"{path}:{preload}" if preload else path})
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, list(getattr(sys, "orig_argv", [sys.executable, *sys.argv])), env)


def jemalloc_loaded() -> bool:
    """Is jemalloc mapped into this process (/proc/self/maps)?"""
    try:
        return "libjemalloc" in Path("/proc/self/maps").read_text()
    except OSError:
        return False
