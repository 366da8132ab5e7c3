from pathlib import Path

import pytest

import jaxdefense
from jaxdefense.data import load_stream, root
from jaxdefense.errors import DataError


def test_explicit_dir_beats_env_and_env_beats_default(tmp_path, monkeypatch):
    explicit, env = tmp_path / "explicit", tmp_path / "env"
    explicit.mkdir()
    env.mkdir()
    monkeypatch.setenv(root.ENV_VAR, str(env))
    assert root.resolve_data_root(explicit) == explicit.resolve()
    assert root.resolve_data_root() == env.resolve()
    monkeypatch.delenv(root.ENV_VAR)
    monkeypatch.setattr(root, "default_roots", lambda: [tmp_path / "absent", explicit])
    assert root.resolve_data_root() == explicit


def test_missing_explicit_root_names_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="nowhere"):
        root.resolve_data_root(missing)


def test_missing_env_root_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv(root.ENV_VAR, str(tmp_path / "gone"))
    with pytest.raises(DataError, match=r"gone.*JAXDEFENSE_DATA_DIR"):
        root.resolve_data_root()


def test_no_root_at_all_lists_every_path_tried(tmp_path, monkeypatch):
    monkeypatch.delenv(root.ENV_VAR, raising=False)
    tried = [tmp_path / "a" / "shared" / "data", tmp_path / "b" / "shared" / "data"]
    monkeypatch.setattr(root, "default_roots", lambda: tried)
    with pytest.raises(DataError) as info:
        root.resolve_data_root()
    assert all(str(p) in str(info.value) for p in tried)
    assert not root.data_root_available()
    with pytest.raises(DataError):
        load_stream("harmful_qa", "train")


def test_default_root_is_shared_data_beside_the_checkout():
    repo = Path(jaxdefense.__file__).resolve().parents[1]
    assert root.default_roots()[0] == repo.parent / "shared" / "data"


def test_root_without_a_source_file_names_the_file(tmp_path):
    from jaxdefense.data import load_source

    with pytest.raises(DataError, match="advbench/harmful_behaviors.csv"):
        load_source("advbench", tmp_path)
