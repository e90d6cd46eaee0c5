"""Checkpoint directories: written atomically, described by a small manifest that records lineage.

A checkpoint is an ordinary Hugging Face `save_pretrained` directory (safetensors weights, processor files) plus
`patho_manifest.json`.  Readers can trust that a directory with a manifest whose `complete` is true was fully written:
the directory only appears under its final name after everything in it is on disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ClassVar, Self

from pydantic import BaseModel, Field

MANIFEST_NAME = "patho_manifest.json"


class SealedManifest(BaseModel):
    """What every sealed folder's manifest records, whatever wrote the folder: where it came from, whether it is whole,
    when it was written, and the sha256 of the files that matter; read and written under the subclass's `FILE` name.
    A checkpoint's `Manifest` adds the phase, step and lineage; a curated dataset's `StageManifest` (curate/store.py)
    adds the stage, its config and counts.  Every field has a default, so a manifest written before a field existed
    still reads (and one with a field since dropped: pydantic ignores unknown keys)."""

    FILE: ClassVar[str]

    parent: str | None = None  # what this folder was made from (a checkpoint path or hub id; a stage folder)
    complete: bool = True
    created: float = Field(default_factory=time.time)
    files: dict[str, str] = Field(default_factory=dict)  # relative name -> sha256, recorded when sealed

    def write_to(self, directory: str | Path) -> Path:
        """Write this manifest into `directory` in one rename (a reader never sees half of it)."""
        path = Path(directory) / self.FILE
        tmp = path.with_name(f".{self.FILE}.tmp")
        tmp.write_text(self.model_dump_json(indent=2) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def read_from(cls, directory: str | Path) -> Self | None:
        """The folder's manifest, or None where it has none (a malformed one raises pydantic's ValidationError)."""
        path = Path(directory) / cls.FILE
        if not path.is_file():
            return None
        return cls.model_validate_json(path.read_text())


class Manifest(SealedManifest):
    """A checkpoint's manifest (`patho_manifest.json`); `files` holds the digest of each weight file and is checked
    before a resume or a later phase trusts the checkpoint."""

    FILE: ClassVar[str] = MANIFEST_NAME

    phase: str
    step: int = 0
    recipe_hash: str | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    extra: dict = Field(default_factory=dict)
    # the checkpoints this one was made from, with the digest each had then: a changed parent makes this one stale
    parents: dict[str, str | None] = Field(default_factory=dict)

    @classmethod
    def of_phase(cls, cfg, phase: str, step: int, **fields) -> Manifest:
        """A phase's final checkpoint, complete, with its lineage from the phase config (`recipe_hash`; `parent`,
        else the model it started from, with that one's digest now)."""
        parent = cfg.parent or cfg.model
        return cls(phase=phase, step=step, recipe_hash=cfg.recipe_hash, parent=parent,
                   parents={parent: lineage_digest(parent)}, complete=True, **fields)


@contextlib.contextmanager
def atomic_directory(final: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `final` in one rename.

    A crash mid-write leaves only a `.tmp-*` sibling, never a half-written `final`.  An existing `final` is moved
    aside first and removed only after the new one is in place, so no data is lost if the swap fails.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if final.exists():
            old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def file_digests(directory: str | Path) -> dict[str, str]:
    """sha256 of every weight file in a checkpoint directory (relative name -> hex digest)."""
    directory = Path(directory)
    return {path.relative_to(directory).as_posix(): file_sha256(path) for path in sorted(directory.rglob("*"))
            if path.is_file() and path.suffix in WEIGHT_SUFFIXES}


def lineage_digest(directory: str | Path) -> str | None:
    """One digest for what a checkpoint holds (its manifest's file digests); None without a manifest (a hub id,
    the tiny base model)."""
    manifest = read_manifest(directory) if Path(directory).is_dir() else None
    if manifest is None or not manifest.files:
        return None
    return config_hash(manifest.files)


def safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file is not whole (its header must parse and its size match the header), or None."""
    try:
        with path.open("rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
    except (OSError, ValueError) as exc:
        return f"{path.name}: unreadable header ({type(exc).__name__})"
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    size = path.stat().st_size
    if size != 8 + n + end:
        return f"{path.name}: {size} bytes, but its header describes {8 + n + end} (truncated or overwritten)"
    return None


def checkpoint_problem(directory: str | Path) -> str | None:
    """Why a checkpoint directory cannot be trusted, or None: every safetensors file whole, and every file the
    manifest recorded present with its recorded digest."""
    directory = Path(directory)
    for path in sorted(directory.rglob("*.safetensors")):
        problem = safetensors_problem(path)
        if problem:
            return problem
    manifest = read_manifest(directory)
    if manifest is not None and manifest.files:
        now = file_digests(directory)
        for name, digest in manifest.files.items():
            if now.get(name) != digest:
                return f"{name}: {'missing' if name not in now else 'changed since the phase completed'}"
    return None


def write_manifest(directory: str | Path, manifest: Manifest, *, seal: bool = True) -> Path:
    """Write the manifest; `seal` first records the digest of every weight file beside it."""
    if seal and not manifest.files:
        manifest = manifest.model_copy(update={"files": file_digests(directory)})
    return manifest.write_to(directory)


def read_manifest(directory: str | Path) -> Manifest | None:
    return Manifest.read_from(directory)


def seal(final: str | Path, manifest: Manifest | None, write: Callable[[Path], object]) -> Path:
    """Write a final folder: `write(tmp)` fills a temporary sibling, the manifest goes in last (with the sha256 of
    every weight file: see `write_manifest`), and one rename puts the folder under `final` (`atomic_directory`).
    `manifest` None: a folder with no lineage to record (the tiny fixtures' base models)."""
    with atomic_directory(final) as tmp:
        write(tmp)
        if manifest is not None:
            write_manifest(tmp, manifest)
    return Path(final)


def save_checkpoint(model, processor, directory: str | Path, manifest: Manifest, state_dict=None) -> Path:
    """`save_pretrained` model + processor + manifest into `directory`, atomically.  `state_dict`: the weights to
    write instead of the model's own (a ZeRO-3 model's own are partitions; its gathered state dict is given)."""

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        if processor is not None:
            processor.save_pretrained(tmp)

    return seal(directory, manifest, write)


def config_hash(data: dict | str) -> str:
    """Stable short hash of a recipe or config (its canonical JSON)."""
    text = data if isinstance(data, str) else json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
