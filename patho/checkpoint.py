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


def write_manifest(directory: str | Path, manifest: Manifest) -> Path:
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
    manifest = read_manifest(directory)
    return manifest is not None and manifest.complete


def save_checkpoint(model, processor, directory: str | Path, manifest: Manifest) -> Path:
    """`save_pretrained` model + processor + manifest into `directory`, atomically."""
    with atomic_directory(directory) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if processor is not None:
            processor.save_pretrained(tmp)
        write_manifest(tmp, manifest)
    return Path(directory)


def config_hash(data: dict | str) -> str:
    """Stable short hash of a recipe or config (its canonical JSON)."""
    text = data if isinstance(data, str) else json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
