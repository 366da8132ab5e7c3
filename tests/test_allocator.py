"""`jaxdefense.allocator`: which jemalloc is preloaded, and that the CLI really runs under it."""

import os
import subprocess
import sys

import pytest

from jaxdefense.allocator import CANDIDATES, ENV, jemalloc_path
from jaxdefense.errors import ConfigError


def test_jemalloc_path_follows_the_environment(tmp_path):
    lib = tmp_path / "libjemalloc.so.2"
    lib.write_bytes(b"")
    assert jemalloc_path({}, candidates=(str(tmp_path / "absent.so"), str(lib))) == str(lib)
    assert jemalloc_path({}, candidates=(str(tmp_path / "absent.so"),)) is None
    assert jemalloc_path({ENV: "0"}, candidates=(str(lib),)) is None
    assert jemalloc_path({"LD_PRELOAD": "/x/libjemalloc.so.2"}, candidates=(str(lib),)) is None
    assert jemalloc_path({ENV: str(lib)}, candidates=()) == str(lib)
    with pytest.raises(ConfigError, match=ENV):
        jemalloc_path({ENV: str(tmp_path / "missing.so")})


def test_a_missing_explicit_library_is_a_one_line_error_exit_2(tmp_path):
    env = {**os.environ, ENV: str(tmp_path / "missing.so")}
    env.pop("_JAXDEFENSE_PRELOADED", None)
    proc = subprocess.run([sys.executable, "-m", "jaxdefense", "demo", "--help"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and ENV in proc.stderr


@pytest.mark.skipif(not any(os.path.isfile(c) for c in CANDIDATES) and not os.environ.get(ENV),
                    reason="jemalloc is not installed (optional: Debian/Ubuntu libjemalloc2)")
def test_the_cli_reexecutes_under_jemalloc():
    code = "from jaxdefense.allocator import jemalloc_loaded; print('loaded', jemalloc_loaded())"
    env = {k: v for k, v in os.environ.items() if k not in ("_JAXDEFENSE_PRELOADED", "LD_PRELOAD")}
    plugin = ("import sys; from jaxdefense import cli; cli.register('probe', 'probe', add_arguments=lambda p: None, "
              f"run=lambda a: exec({code!r}))")
    proc = subprocess.run([sys.executable, "-c", plugin + "; sys.argv=['jaxdefense','probe']; sys.exit(cli.main())"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "loaded True" in proc.stdout
