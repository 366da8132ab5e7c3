"""malloc tuning for CPU runs: the CLI and the benchmarks re-execute themselves once, before any
heavy work, with
  - `LD_PRELOAD=libjemalloc.so.2` when that library is installed (Debian/Ubuntu `libjemalloc2`), else
  - `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` on glibc ≥ 2.35 with transparent huge pages in
    "madvise" or "always" mode (/sys/kernel/mm/transparent_hugepage/enabled): glibc then
    madvises its heap for 2 MiB pages.

XLA:CPU allocates and frees its large step buffers on every call; glibc's malloc hands them back
to the kernel and page-faults them in again, 4 KiB at a time. jemalloc's arenas keep them; huge
pages cut the number of faults 512-fold. Nothing requires either: `JAXDEFENSE_JEMALLOC=0` and
`JAXDEFENSE_HUGETLB=0` turn them off (a process with neither runs as it was started), and
`JAXDEFENSE_JEMALLOC=/path/libjemalloc.so.2` names the library file explicitly.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from jaxdefense.errors import ConfigError

ENV = "JAXDEFENSE_JEMALLOC"
HUGETLB_ENV = "JAXDEFENSE_HUGETLB"
HUGETLB_TUNABLE = "glibc.malloc.hugetlb=1"
THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"
MARKER = "_JAXDEFENSE_PRELOADED"
OFF = ("0", "off", "false", "no")
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
    if choice.lower() in OFF or "jemalloc" in env.get("LD_PRELOAD", ""):
        return None
    if choice.lower() not in ("", "auto", "1", "on", "true", "yes"):
        if not Path(choice).is_file():
            raise ConfigError(f"{ENV}={choice}: no such library file")
        return choice
    return next((c for c in candidates if Path(c).is_file()), None)


def hugetlb_tunable(env=None, thp_mode: str = THP_MODE, glibc=None) -> str | None:
    """GLIBC_TUNABLES with glibc.malloc.hugetlb=1 added, or None: when $JAXDEFENSE_HUGETLB is 0/off,
    GLIBC_TUNABLES already sets glibc.malloc.hugetlb, the C library is not glibc ≥ 2.35 (`glibc`:
    (name, version), default `platform.libc_ver()`), or transparent huge pages are off ("[never]")
    or absent in `thp_mode`."""
    import platform

    env = os.environ if env is None else env
    if env.get(HUGETLB_ENV, "auto").strip().lower() in OFF:
        return None
    tunables = env.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in tunables:
        return None
    name, version = platform.libc_ver() if glibc is None else glibc
    try:
        if name != "glibc" or tuple(int(x) for x in version.split(".")[:2]) < (2, 35):
            return None
        mode = Path(thp_mode).read_text()
    except (OSError, ValueError):
        return None
    if "[madvise]" not in mode and "[always]" not in mode:
        return None
    return f"{tunables}:{HUGETLB_TUNABLE}" if tunables else HUGETLB_TUNABLE


def tune_malloc(env=None) -> None:
    """Re-execute this interpreter once with jemalloc preloaded (`jemalloc_path`), or else with
    glibc's huge-page tunable (`hugetlb_tunable`), when either applies. Call before heavy work
    starts (the re-executed process runs from the beginning)."""
    env = dict(os.environ if env is None else env)
    if env.get(MARKER) or not sys.platform.startswith("linux"):
        return
    path = jemalloc_path(env)
    if path is not None:
        preload = env.get("LD_PRELOAD", "")
        env["LD_PRELOAD"] = f"{path}:{preload}" if preload else path
    else:
        tunables = hugetlb_tunable(env)
        if tunables is None:
            return
        env["GLIBC_TUNABLES"] = tunables
    env[MARKER] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, list(getattr(sys, "orig_argv", [sys.executable, *sys.argv])), env)


def jemalloc_loaded() -> bool:
    """Is jemalloc mapped into this process (/proc/self/maps)?"""
    try:
        return "libjemalloc" in Path("/proc/self/maps").read_text()
    except OSError:
        return False
