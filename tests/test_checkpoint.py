import pytest

from patho_r1.checkpoint import Manifest, atomic_directory, config_hash, is_complete, read_manifest, write_manifest


def test_atomic_directory_replaces_only_on_success(tmp_path):
    final = tmp_path / "ckpt"
    with atomic_directory(final) as tmp:
        (tmp / "a.txt").write_text("v1")
    assert (final / "a.txt").read_text() == "v1"
    with pytest.raises(RuntimeError):
        with atomic_directory(final) as tmp:
            (tmp / "a.txt").write_text("v2")
            raise RuntimeError("killed mid-write")
    assert (final / "a.txt").read_text() == "v1"  # old checkpoint intact
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary left behind
    with atomic_directory(final) as tmp:
        (tmp / "b.txt").write_text("v3")
    assert not (final / "a.txt").exists() and (final / "b.txt").read_text() == "v3"


def test_manifest_round_trip_and_hash(tmp_path):
    assert read_manifest(tmp_path) is None and not is_complete(tmp_path)
    m = Manifest(phase="sft", step=12, recipe_hash=config_hash({"a": 1}), parent="runs/cpt", complete=False)
    write_manifest(tmp_path, m)
    assert read_manifest(tmp_path) == m and not is_complete(tmp_path)
    assert config_hash({"a": 1, "b": 2}) == config_hash({"b": 2, "a": 1}) != config_hash({"a": 2})
