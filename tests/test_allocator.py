"""`jaxdefense.allocator`: which jemalloc is preloaded or which glibc tunable is set, and that the CLI
really re-executes under it."""

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
    proc = _probe_cli(code, env)
    assert proc.returncode == 0, proc.stderr
    assert "loaded True" in proc.stdout


def test_hugetlb_tunable_follows_glibc_thp_and_the_environment(tmp_path):
    from jaxdefense.allocator import HUGETLB_ENV, HUGETLB_TUNABLE, hugetlb_tunable

    madvise, never = tmp_path / "madvise", tmp_path / "never"
    madvise.write_text("always [madvise] never\n")
    never.write_text("always madvise [never]\n")
    glibc = ("glibc", "2.36")
    assert hugetlb_tunable({}, str(madvise), glibc) == HUGETLB_TUNABLE
    assert hugetlb_tunable({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, str(madvise), glibc) == (
        "glibc.malloc.arena_max=2:" + HUGETLB_TUNABLE)
    assert hugetlb_tunable({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, str(madvise), glibc) is None
    assert hugetlb_tunable({HUGETLB_ENV: "0"}, str(madvise), glibc) is None
    assert hugetlb_tunable({}, str(never), glibc) is None
    assert hugetlb_tunable({}, str(tmp_path / "absent"), glibc) is None
    assert hugetlb_tunable({}, str(madvise), ("glibc", "2.31")) is None
    assert hugetlb_tunable({}, str(madvise), ("", "")) is None


def _probe_cli(code: str, env: dict):
    plugin = ("import sys; from jaxdefense import cli; cli.register('probe', 'probe', add_arguments=lambda p: None, "
              f"run=lambda a: exec({code!r}))")
    return subprocess.run([sys.executable, "-c", plugin + "; sys.argv=['jaxdefense','probe']; sys.exit(cli.main())"],
                          env=env, capture_output=True, text=True, timeout=120)


def test_the_cli_reexecutes_with_glibc_huge_pages_without_jemalloc():
    from jaxdefense.allocator import HUGETLB_TUNABLE, hugetlb_tunable

    env = {k: v for k, v in os.environ.items() if k not in ("_JAXDEFENSE_PRELOADED", "LD_PRELOAD", "GLIBC_TUNABLES")}
    env[ENV] = "0"
    if hugetlb_tunable(env) is None:
        pytest.skip("glibc < 2.35 or transparent huge pages off: the tunable does not apply here")
    proc = _probe_cli("import os; print('tunables', os.environ.get('GLIBC_TUNABLES'))", env)
    assert proc.returncode == 0, proc.stderr
    assert f"tunables {HUGETLB_TUNABLE}" in proc.stdout
    proc = _probe_cli("import os; print('tunables', os.environ.get('GLIBC_TUNABLES'))", {**env, "JAXDEFENSE_HUGETLB": "0"})
    assert "tunables None" in proc.stdout
