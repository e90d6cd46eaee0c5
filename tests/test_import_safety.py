"""`curate import` against hostile or broken input (issue 32): image references that leave the image folder, bad
images, an output path that holds other files, repeated ids, empty sources and runaway text fields.  Each ends in a
one-line error naming file, row and field, or (with on_error skip) in rejects.jsonl with its reason."""

from __future__ import annotations

import csv
import json
import os
import re
import struct
import zlib
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from patho_r1.curate.config import DedupStage, GenerateStage, ImportStage
from patho_r1.curate.pipeline import run_stage
from patho_r1.data import MAX_TEXT_CHARS
from patho_r1.errors import ConfigError, DataError
from patho_r1.fixtures.public_formats import arch, jpeg, png


def _import(fmt: str, src: Path, out: Path, on_error: str = "skip", **source):
    stage = ImportStage(sources=[{"format": fmt, "path": str(src), **source}], on_error=on_error)
    return run_stage(stage, None, out)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _stored(out: Path) -> set[bytes]:
    return {p.read_bytes() for p in (out / "images").rglob("*.*")}


def _caption_csv(path: Path, files: list[str]) -> Path:
    """A generic caption CSV, one row per image file name (rows are lines 2, 3, ...)."""
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "text"])
        w.writerows([name, f"Caption {i}: glands."] for i, name in enumerate(files))
    return path


# ----------------------------------------------------------------------------------------------------------------------
# Image references that resolve outside the source's image folder
# ----------------------------------------------------------------------------------------------------------------------

@pytest.fixture
def outside(tmp_path) -> Path:
    """A folder beside the source's, with images that must not get in: out1.png .. out4.png."""
    folder = tmp_path / "outside"
    (folder / "deep").mkdir(parents=True)
    for i in range(1, 4):
        (folder / f"out{i}.png").write_bytes(png(100 + i))
    (folder / "deep" / "out4.png").write_bytes(png(104))
    return folder


def test_image_files_outside_the_image_folder_are_refused_unless_allowed(tmp_path, outside):
    images = tmp_path / "src" / "images"
    images.mkdir(parents=True)
    (images / "good.png").write_bytes(png(1))
    (images / "target.png").write_bytes(png(2))
    os.symlink(images / "target.png", images / "alias.png")  # a link that stays inside: fine
    os.symlink(outside / "out3.png", images / "link.png")  # a link in the folder that points out of it
    os.symlink(outside / "deep", images / "sub")  # a folder link on the way
    names = ["good.png", "../../outside/out1.png", str(outside / "out2.png"), "link.png", "sub/out4.png", "alias.png"]
    src = _caption_csv(tmp_path / "src" / "rows.csv", names)
    spec = {"kind": "caption", "columns": {"caption": "text", "images": "file"}, "images": str(images)}

    manifest = _import("csv", src, tmp_path / "out", **spec)
    assert manifest.counts["kinds"] == {"caption": 2}
    rejects = _rows(tmp_path / "out" / "rejects.jsonl")
    assert [(r["row"], r["field"]) for r in rejects] == [(3, "file[0]"), (4, "file[0]"), (5, "file[0]"),
                                                          (6, "file[0]")]
    assert all("outside the image folder" in r["reason"] and "--allow-outside-images" in r["reason"]
               for r in rejects)
    outside_bytes = {p.read_bytes() for p in outside.rglob("*.png")}
    assert not _stored(tmp_path / "out") & outside_bytes  # not one byte of them in the store

    with pytest.raises(DataError, match=r"rows.csv:3: field 'file\[0\]': image .*out1.png resolves to "):
        _import("csv", src, tmp_path / "out-raise", on_error="raise", **spec)

    allowed = _import("csv", src, tmp_path / "out-allowed", allow_outside_images=True, **spec)
    assert allowed.counts["kinds"] == {"caption": 6}
    assert outside_bytes <= _stored(tmp_path / "out-allowed")


def _quilt(root: Path, outside: Path) -> Path:  # a relative name that climbs out (the case)
    (root / "images").mkdir(parents=True)
    path = root / "quilt_1M_lookup.csv"
    path.write_text("Unnamed: 0,caption,image_path\n0,A caption.,../../outside/out1.png\n")
    return path


def _arch(root: Path, outside: Path) -> Path:  # a symbolic link in the images folder
    (root / "images").mkdir(parents=True)
    os.symlink(outside / "out1.png", root / "images" / "u0.png")
    (root / "captions.json").write_text(json.dumps({"0": {"uuid": "u0", "caption": "A caption."}}))
    return root


def _pmc_oa(root: Path, outside: Path) -> Path:  # an absolute path elsewhere
    (root / "images").mkdir(parents=True)
    (root / "pmc_oa.jsonl").write_text(json.dumps({"image": str(outside / "out1.png"), "caption": "A caption."}))
    return root / "pmc_oa.jsonl"


@pytest.mark.parametrize("fmt,write", [("quilt-1m", _quilt), ("arch", _arch), ("pmc-oa", _pmc_oa)])
def test_every_format_goes_through_the_one_path_guard(fmt, write, tmp_path, outside):
    src = write(tmp_path / "src", outside)
    manifest = _import(fmt, src, tmp_path / "out")
    assert manifest.counts["kinds"] == {} and manifest.counts["sources"][fmt]["rejected"] == 1
    assert "outside the image folder" in _rows(tmp_path / "out" / "rejects.jsonl")[0]["reason"]
    assert not (tmp_path / "out" / "images").exists() or not _stored(tmp_path / "out")
    assert _import(fmt, src, tmp_path / "allowed", allow_outside_images=True).counts["kinds"] == {"caption": 1}


@pytest.mark.timeout(30)  # before the fix, opening the FIFO blocked for ever
def test_a_fifo_or_a_folder_named_like_an_image_is_rejected_not_waited_on(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    os.mkfifo(images / "pipe.png")
    (images / "dir.png").mkdir()
    src = _caption_csv(tmp_path / "rows.csv", ["pipe.png", "dir.png"])
    _import("csv", src, tmp_path / "out", kind="caption", columns={"caption": "text", "images": "file"},
            images=str(images))
    reasons = [r["reason"] for r in _rows(tmp_path / "out" / "rejects.jsonl")]
    assert len(reasons) == 2 and "not a regular file" in reasons[0] and "a folder" in reasons[1]


# ----------------------------------------------------------------------------------------------------------------------
# Bad images
# ----------------------------------------------------------------------------------------------------------------------

def _chunk(kind: bytes, data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")


def _png_claiming(width: int, height: int) -> bytes:
    """A small, well-formed PNG whose header claims width x height pixels (a decompression bomb's shape)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _chunk(b"IEND", b""))


def _gif(seed: int) -> bytes:
    import io

    buf = io.BytesIO()
    Image.open(io.BytesIO(png(seed))).convert("P").save(buf, format="GIF")
    return buf.getvalue()


def test_bad_images_are_rejected_with_reasons_and_never_stored(tmp_path):
    good = {"good.png": png(1), "good.jpg": jpeg(2), "trailing.png": png(3) + b"8 bytes!", "good.gif": _gif(4)}
    flipped = bytearray(png(5))
    flipped[flipped.index(b"IDAT") + 8] ^= 0xFF
    bad = {  # name -> (bytes, a word its reason must hold)
        "text.png": (b"\x89PNG\r\n\x1a\n" + b"this is a text file, not an image\n" * 3, "not a PNG"),
        "text.jpg": (b"\xff\xd8\xff" + b"this is a text file, not an image\n", "not a JPEG"),
        "truncated.png": (png(6)[: len(png(6)) // 2], "truncated PNG"),
        "bomb.png": (_png_claiming(100_000, 100_000), "10,000,000,000 pixels"),
        "flipped.png": (bytes(flipped), "fails its CRC"),
        "truncated.jpg": (jpeg(7)[:-40], "truncated JPEG"),
        # PIL reads the text's bytes as its screen size: 26740 x 29545 pixels
        "text.gif": (b"GIF89a" + b"this is a text file, not an image\n", "over the pixel limit"),
        "cut.gif": (_gif(8)[:-20], "not a readable image"),
        "empty.png": (b"", "not a readable image"),
    }
    images = tmp_path / "images"
    images.mkdir()
    for name, data in {**good, **{k: v[0] for k, v in bad.items()}}.items():
        (images / name).write_bytes(data)
    src = _caption_csv(tmp_path / "rows.csv", [*good, *bad])
    manifest = _import("csv", src, tmp_path / "out", kind="caption", columns={"caption": "text", "images": "file"},
                       images=str(images))
    assert manifest.counts["kinds"] == {"caption": len(good)}
    reasons = [r["reason"] for r in _rows(tmp_path / "out" / "rejects.jsonl")]
    assert len(reasons) == len(bad)
    for (name, (_, word)), reason in zip(bad.items(), reasons, strict=True):
        assert word in reason, (name, reason)
    assert _stored(tmp_path / "out") == set(good.values())  # checked before the store, not cleaned up after


def test_the_image_check_refuses_every_cut_of_a_png_or_jpeg_and_every_flipped_png_byte():
    """The structure walk in place of PIL for the two common formats: a file cut anywhere, or (PNG, whose chunks
    carry CRCs) with any one byte changed, is refused; the whole files pass."""
    from patho_r1.curate.store import image_problem

    limit = Image.MAX_IMAGE_PIXELS
    for whole in (png(11), jpeg(12)):
        assert image_problem(whole, limit) is None
        assert all(image_problem(whole[:cut], limit) for cut in range(len(whole)))
    whole = png(13)
    for i in range(len(whole)):
        flipped = bytearray(whole)
        flipped[i] ^= 0x10
        assert image_problem(bytes(flipped), limit), i


# ----------------------------------------------------------------------------------------------------------------------
# The output folder
# ----------------------------------------------------------------------------------------------------------------------

def test_an_output_path_holding_other_files_or_a_file_is_refused_and_kept(tmp_path, capsys):
    from patho_r1.launch.cli import main

    src, _ = arch(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = ["curate", "import", "--format", "arch", str(src), "--on-error", "skip", "--out"]
    assert main([*args, str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert f"{out}: holds files that are not an output of curate import" in err and "--overwrite" in err
    assert (out / "notes.txt").read_text() == "mine"

    a_file = tmp_path / "report.txt"
    a_file.write_text("keep me")
    for target in (a_file, a_file / "sub"):
        assert main([*args, str(target)]) == 2
        assert f"{a_file}: exists and is not a folder" in capsys.readouterr().err
    assert a_file.read_text() == "keep me"

    assert main([*args, str(out), "--overwrite"]) == 0  # asked for: replaced
    assert not (out / "notes.txt").exists() and (out / "manifest.json").is_file()
    assert main([*args, str(out)]) == 0  # its own output: skipped, as before
    assert "up to date" in capsys.readouterr().out

    # every stage that writes a folder: dedup into another stage's folder, generate into a folder of notes
    assert main(["curate", "dedup", str(out), "--out", str(out)]) == 2
    assert "not an output of curate dedup" in capsys.readouterr().err
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "a.txt").write_text("mine")
    stage = GenerateStage(endpoint={"base_url": "http://127.0.0.1:9/v1", "model": "m"})
    with pytest.raises(ConfigError, match="not an output of curate generate"):
        run_stage(stage, out, notes)  # refused before a request is sent
    with pytest.raises(ConfigError, match="not an output of curate dedup"):
        run_stage(DedupStage(), out, notes)
    assert (notes / "a.txt").read_text() == "mine"


# ----------------------------------------------------------------------------------------------------------------------
# Repeated ids
# ----------------------------------------------------------------------------------------------------------------------

def _quilt_with_ids(root: Path, ids: list[int]) -> Path:
    (root / "images").mkdir(parents=True)
    path = root / "quilt_1M_lookup.csv"
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["Unnamed: 0", "caption", "image_path"])
        for i, row_id in enumerate(ids):
            (root / "images" / f"f{i}.png").write_bytes(png(200 + i))
            w.writerow([row_id, f"Caption of frame {i}.", f"f{i}.png"])
    return path


def test_rows_that_share_an_id_are_named_and_imported_once(tmp_path, monkeypatch):
    from patho_r1.curate import importer

    monkeypatch.setattr(importer, "CHUNK_ROWS", 2)  # the repeats fall in other chunks than their first row
    src = _quilt_with_ids(tmp_path / "src", [0, 1, 2, 1, 3, 1])  # `Unnamed: 0` 1 three times: lines 3, 5 and 7
    with pytest.raises(DataError, match=rf"quilt_1M_lookup.csv:5: field 'id': duplicate id 'quilt-1m:1': "
                                        rf"{re.escape(str(src))}:3 has it already"):
        _import("quilt-1m", src, tmp_path / "raise", on_error="raise")
    manifest = _import("quilt-1m", src, tmp_path / "out")
    rows = _rows(tmp_path / "out" / "caption.jsonl")
    assert [r["id"] for r in rows] == ["quilt-1m:0", "quilt-1m:1", "quilt-1m:2", "quilt-1m:3"]
    assert rows[1]["caption"] == "Caption of frame 1."  # the first row keeps the id
    rejects = _rows(tmp_path / "out" / "rejects.jsonl")
    assert [(r["row"], r["field"]) for r in rejects] == [(5, "id"), (7, "id")]
    assert all(f"{src}:3 has it already" in r["reason"] for r in rejects)
    assert manifest.counts["sources"]["quilt-1m"]["rejected"] == 2


def test_seen_ids_finds_every_repeat_in_a_chunk_and_across_merged_runs():
    from patho_r1.curate.importer import ConvertedChunk, SeenIds, id_key

    seen, taken, repeats = SeenIds(), [], []
    for start in range(0, 3000, 100):  # 30 chunks, whose runs merge as they grow
        # every 7th id from the 50th repeats the one 50 rows before it: in the same chunk, or in an earlier one
        ids = [f"id{n - 50 if n % 7 == 0 and n >= 50 else n}" for n in range(start, start + 100)]
        text = "".join(json.dumps({"id": i, "caption": "a\nb"}) + "\n" for i in ids)
        chunk = ConvertedChunk(100, {"caption": text}, Counter(caption=100), ["caption"] * 100, ["f.csv"] * 100,
                               list(range(start, start + 100)), b"".join(map(id_key, ids)))
        lines, counts, duplicates = seen.admit(chunk)
        assert counts["caption"] == lines.get("caption", "").count("\n") == 100 - len(duplicates)
        taken += [json.loads(line)["id"] for line in lines.get("caption", "").splitlines()]
        repeats += [(d.row, d.message) for d in duplicates]
    assert len(taken) == len(set(taken)) == 3000 - len(repeats)
    assert repeats[0] == (56, "duplicate id 'id6': f.csv:6 has it already (each id is imported once)")
    assert len(repeats) == len([n for n in range(50, 3000) if n % 7 == 0])


# ----------------------------------------------------------------------------------------------------------------------
# Empty sources and runaway text
# ----------------------------------------------------------------------------------------------------------------------

def test_an_empty_or_header_only_source_is_an_error_naming_the_file(tmp_path, capsys):
    from patho_r1.launch.cli import main

    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "header.csv").write_text("Unnamed: 0,caption,image_path\n")
    for name, why in (("empty.csv", "the file is empty"), ("header.csv", "a header line and no rows under it")):
        with pytest.raises(DataError, match=rf"{name}: no rows to import: {why}"):
            _import("quilt-1m", tmp_path / name, tmp_path / f"out-{name}")
        assert main(["curate", "import", "--format", "quilt-1m", str(tmp_path / name), "--on-error", "skip",
                     "--out", str(tmp_path / f"cli-{name}")]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and str(tmp_path / name) in err
        assert not (tmp_path / f"cli-{name}").exists()


def test_a_text_field_over_the_limit_is_rejected_with_the_limit_and_why(tmp_path, capsys):
    from patho_r1.launch.cli import main

    src = _quilt_with_ids(tmp_path / "quilt", [0, 1])
    text = src.read_text().replace("Caption of frame 1.", "x" * 1_000_000)  # a 1 MB caption
    src.write_text(text)
    _import("quilt-1m", src, tmp_path / "out")
    (reject,) = _rows(tmp_path / "out" / "rejects.jsonl")
    assert reject["row"] == 3 and reject["field"] == "caption"
    assert f"1,000,000 characters, over the {MAX_TEXT_CHARS:,} one text field may hold (about 25k tokens" in \
        reject["reason"]

    (tmp_path / "mcq.jsonl").write_text(json.dumps({"question": "Which?", "answer": "A", "answer_type": "mcq",
                                                    "options": {"A": "short", "B": "y" * (MAX_TEXT_CHARS + 1)}}))
    with pytest.raises(DataError, match=rf"mcq.jsonl:1: field 'options.B': {MAX_TEXT_CHARS + 1:,} characters, over"):
        _import("jsonl", tmp_path / "mcq.jsonl", tmp_path / "mcq", on_error="raise", kind="mcq")

    with pytest.raises(SystemExit):
        main(["curate", "import", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"more than {MAX_TEXT_CHARS:,} characters (about 25k tokens" in help_text
    assert "--allow-outside-images" in help_text and "Image.MAX_IMAGE_PIXELS" in help_text

