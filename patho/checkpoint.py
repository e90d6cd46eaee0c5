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
from collections.abc import Iterator
from pathlib import Path

from pydantic import BaseModel, Field

MANIFEST_NAME = "patho_manifest.json"


class Manifest(BaseModel):
    phase: str
    step: int = 0
    recipe_hash: str | None = None
    parent: str | None = None  # the checkpoint this one was trained from (path or hub id)
    complete: bool = True
    created: float = Field(default_factory=time.time)
    metrics: dict[str, float] = Field(default_factory=dict)
    extra: dict = Field(default_factory=dict)
    # sha256 of each weight file, recorded when the directory is sealed; checked before a resume trusts it
    files: dict[str, str] = Field(default_factory=dict)
    # the checkpoints this one was made from, with the digest each had then: a changed parent makes this one stale
    parents: dict[str, str | None] = Field(default_factory=dict)


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
    path = Path(directory) / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(manifest.model_dump_json(indent=2) + "\n")
    os.replace(tmp, path)
    return path


def read_manifest(directory: str | Path) -> Manifest | None:
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        return None
    return Manifest.model_validate_json(path.read_text())


def is_complete(directory: str | Path) -> bool:
    """Marked complete, and still whole (see `checkpoint_problem`)."""
    manifest = read_manifest(directory)
    return manifest is not None and manifest.complete and checkpoint_problem(directory) is None


def save_checkpoint(model, processor, directory: str | Path, manifest: Manifest, state_dict=None) -> Path:
    """`save_pretrained` model + processor + manifest into `directory`, atomically.  `state_dict`: the weights to
    write instead of the model's own (a ZeRO-3 model's own are partitions; its gathered state dict is given)."""
    with atomic_directory(directory) as tmp:
        model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        if processor is not None:
            processor.save_pretrained(tmp)
        write_manifest(tmp, manifest)
    return Path(directory)


def config_hash(data: dict | str) -> str:
    """Stable short hash of a recipe or config (its canonical JSON)."""
    text = data if isinstance(data, str) else json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
