"""The output-folder rule, for every command that writes a folder: never write over what it did not write.

A command may write into a path that does not exist, an empty folder, or a folder that is its own output (finished,
to be skipped or replaced, or unfinished, to be resumed; the command says which by `ours`).  It refuses a path that
is a file, and a folder holding anything else, unless the user passed `--overwrite`: replacing a folder deletes
what is in it, and `--out` naming the wrong folder is an easy slip.
"""

from __future__ import annotations

import os
from pathlib import Path

from patho_r1.errors import ConfigError


def check_output_folder(path: str | Path, command: str, *, ours: bool, overwrite: bool = False) -> None:
    """Raise a one-line ConfigError if `command` must not write the folder `path`: it, or a folder above it, exists
    and is not a folder; or it is a folder that holds files, is not `ours`, and `overwrite` is off."""
    path = Path(path)
    blocker = _not_a_folder(path)
    if blocker is not None:
        raise ConfigError(f"{blocker}: exists and is not a folder; {command} writes a folder at {path}, so give "
                          "another --out (a file is never replaced)")
    if ours or overwrite or not path.is_dir():
        return
    with os.scandir(path) as entries:
        first = next(entries, None)
    if first is not None:
        raise ConfigError(f"{path}: holds files that are not an output of {command} (such as {first.name!r}); give "
                          f"a new or empty folder, the folder a {command} run wrote to skip or resume it, or "
                          "--overwrite to replace this one (deleting what it holds)")


def check_output_file(path: str | Path, option: str) -> None:
    """Raise a one-line ConfigError if the file `path` cannot be written: it is a folder, or a folder above it is a
    file."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{option} {path}: is a folder; give the path of the file to write")
    blocker = _not_a_folder(path.parent)
    if blocker is not None:
        raise ConfigError(f"{option} {path}: {blocker} exists and is not a folder")


def _not_a_folder(path: Path) -> Path | None:
    """The nearest of `path` and the folders above it that exists, when it is not a folder (else None)."""
    for p in (path, *path.parents):
        if p.is_dir():
            return None
        if p.exists() or p.is_symlink():
            return p
    return None
