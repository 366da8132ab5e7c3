"""Where the real data lives: `--data-dir`, then `$JAXDEFENSE_DATA_DIR`, then `../shared/data`."""

from __future__ import annotations

import os
from pathlib import Path

from jaxdefense.errors import DataError

ENV_VAR = "JAXDEFENSE_DATA_DIR"


def default_roots() -> list[Path]:
    """Fallback roots, in order: `shared/data` beside the repo checkout, then `cwd/../shared/data`.

    With the repo at /work/main the package file is /work/main/jaxdefense/__init__.py, so
    `parents[2]` is /work and the first candidate is /work/shared/data.
    """
    import jaxdefense

    package_file = Path(jaxdefense.__file__).resolve()
    candidates = [
        package_file.parents[2] / "shared" / "data",
        Path.cwd().resolve().parent / "shared" / "data",
    ]
    unique: list[Path] = []
    for path in candidates:
        if path not in unique:
            unique.append(path)
    return unique


def resolve_data_root(data_dir: str | os.PathLike | None = None) -> Path:
    """The data root: explicit `data_dir`, else `$JAXDEFENSE_DATA_DIR`, else `default_roots()`.

    An explicit directory or the environment variable is taken as given (no fallback): if it does
    not exist, DataError names it. Without either, the first existing default root wins.
    """
    if data_dir is not None and str(data_dir) != "":
        path = Path(data_dir).expanduser()
        if not path.is_dir():
            raise DataError(f"data root {str(path)!r} (from --data-dir) is not a directory")
        return path.resolve()
    env = os.environ.get(ENV_VAR, "")
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise DataError(f"data root {str(path)!r} (from ${ENV_VAR}) is not a directory")
        return path.resolve()
    tried = default_roots()
    for path in tried:
        if path.is_dir():
            return path
    raise DataError(
        "no data root found: tried "
        + ", ".join(repr(str(p)) for p in tried)
        + f"; pass --data-dir or set ${ENV_VAR}"
    )


def data_root_available(data_dir: str | os.PathLike | None = None) -> bool:
    """True when `resolve_data_root(data_dir)` would succeed."""
    try:
        resolve_data_root(data_dir)
    except DataError:
        return False
    return True
