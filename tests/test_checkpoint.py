import pytest

from patho_r1.checkpoint import (
    Manifest,
    atomic_directory,
    checkpoint_problem,
    config_hash,
    read_manifest,
    seal,
    write_manifest,
)


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
    assert read_manifest(tmp_path) is None
    m = Manifest(phase="sft", step=12, recipe_hash=config_hash({"a": 1}), parent="runs/cpt", complete=False)
    write_manifest(tmp_path, m)
    assert read_manifest(tmp_path) == m and not read_manifest(tmp_path).complete
    assert [p.name for p in tmp_path.iterdir()] == ["patho_manifest.json"]  # no temporary left behind
    assert config_hash({"a": 1, "b": 2}) == config_hash({"b": 2, "a": 1}) != config_hash({"a": 2})


def test_a_manifest_written_before_digests_and_lineage_still_reads(tmp_path):
    """The first manifests (before `files` and `parents`) had no digests: they read, with nothing to check."""
    (tmp_path / "patho_manifest.json").write_text(
        '{"phase": "cpt", "step": 40, "recipe_hash": "0123456789abcdef", "parent": "Qwen/Qwen2.5-VL-7B-Instruct",'
        ' "complete": true, "created": 1700000000.0, "metrics": {"train_loss": 1.5}, "extra": {"lora": false}}')
    m = read_manifest(tmp_path)
    assert (m.phase, m.step, m.parent, m.created, m.metrics) == ("cpt", 40, "Qwen/Qwen2.5-VL-7B-Instruct",
                                                                 1700000000.0, {"train_loss": 1.5})
    assert m.files == {} and m.parents == {} and checkpoint_problem(tmp_path) is None


def test_seal_writes_the_folder_and_its_manifest_in_one_rename(tmp_path):
    final = tmp_path / "model"
    seal(final, Manifest(phase="sft", step=3), lambda tmp: _weights(tmp, 1.0))
    assert sorted(p.name for p in final.iterdir()) == ["model.safetensors", "patho_manifest.json"]
    assert read_manifest(final).files.keys() == {"model.safetensors"} and checkpoint_problem(final) is None

    def dies(tmp):
        _weights(tmp, 2.0)
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        seal(final, Manifest(phase="sft", step=4), dies)
    assert read_manifest(final).step == 3 and [p.name for p in tmp_path.iterdir()] == ["model"]
    seal(tmp_path / "base", None, lambda tmp: _weights(tmp, 1.0))  # a base model: no manifest, no lineage
    assert read_manifest(tmp_path / "base") is None


def _weights(directory, value: float, name="model.safetensors"):
    import torch
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.full((64, 64), value)}, str(directory / name))
    return directory / name


def test_a_truncated_checkpoint_is_skipped_for_the_newest_intact_one(tmp_path, caplog):
    from types import SimpleNamespace

    from patho_r1.training import latest_checkpoint

    for step in (5, 10):
        _weights(tmp_path / f"checkpoints/checkpoint-{step}", float(step))
        (tmp_path / f"checkpoints/checkpoint-{step}/trainer_state.json").write_text("{}")
    newest = tmp_path / "checkpoints/checkpoint-10/model.safetensors"
    newest.write_bytes(newest.read_bytes()[:-100])  # a write cut short
    with caplog.at_level("WARNING"):
        found = latest_checkpoint(SimpleNamespace(output_dir=str(tmp_path)))
    assert found == str(tmp_path / "checkpoints/checkpoint-5")
    assert "checkpoint-10 is damaged (model.safetensors:" in caplog.text and "truncated" in caplog.text


def test_a_checkpoint_killed_while_its_trainer_state_was_written_is_skipped(tmp_path, caplog):
    """HF opens trainer_state.json, truncating it, then writes it: a kill in between leaves it empty (seen in CI)."""
    from types import SimpleNamespace

    from patho_r1.training import latest_checkpoint

    for step, state in ((5, '{"global_step": 5}'), (10, ""), (15, '{"global_st')):
        _weights(tmp_path / f"checkpoints/checkpoint-{step}", float(step))
        (tmp_path / f"checkpoints/checkpoint-{step}/trainer_state.json").write_text(state)
    with caplog.at_level("WARNING"):
        found = latest_checkpoint(SimpleNamespace(output_dir=str(tmp_path)))
    assert found == str(tmp_path / "checkpoints/checkpoint-5")
    assert "checkpoint-15 is damaged (trainer_state.json unreadable" in caplog.text
    assert "checkpoint-10 is damaged (trainer_state.json unreadable" in caplog.text


def test_a_sealed_final_model_that_changed_is_no_longer_complete(tmp_path):
    path = _weights(tmp_path, 1.0)
    write_manifest(tmp_path, Manifest(phase="sft", complete=True))
    assert read_manifest(tmp_path).files.keys() == {"model.safetensors"} and checkpoint_problem(tmp_path) is None
    _weights(tmp_path, 2.0)  # same size, other bytes
    assert "model.safetensors: changed since the phase completed" in checkpoint_problem(tmp_path)
    path.unlink()
    assert "model.safetensors: missing" in checkpoint_problem(tmp_path)


def test_a_phase_built_on_a_changed_parent_is_stale(tmp_path):
    from patho_r1.checkpoint import lineage_digest
    from patho_r1.launch.recipe import PlannedPhase
    from patho_r1.launch.runner import _why_redo

    parent, child = tmp_path / "rl/model", tmp_path / "eval"
    _weights(parent, 1.0)
    write_manifest(parent, Manifest(phase="rl", complete=True))
    child.mkdir()
    write_manifest(child, Manifest(phase="eval", complete=True, parents={str(parent): lineage_digest(parent)}))
    phase = PlannedPhase(spec=None, config=None, resources=None, final_dir=child)
    assert _why_redo(phase, read_manifest(child)) == (None, False)
    _weights(parent, 3.0)  # RL ran again
    write_manifest(parent, Manifest(phase="rl", complete=True))
    why, fresh = _why_redo(phase, read_manifest(child))
    assert f"its input {parent} changed since it ran" == why and fresh
