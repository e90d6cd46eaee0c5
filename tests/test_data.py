import base64
import io
import json
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from patho_r1.data import (
    CaptionRecord,
    DataError,
    MCQRecord,
    iter_records,
    iter_vlmeval_tsv,
    load_image,
    load_records,
)


def _png(path, seed=0):
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (28, 28, 3), dtype=np.uint8)).save(path)
    return path


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _mcq(**over):
    row = {"question": "Which?", "options": {"A": "x", "B": "y", "C": "z", "D": "w"}, "answer": "B",
           "images": ["tile.png"]}
    row.update(over)
    return row


@pytest.fixture
def folder(tmp_path):
    _png(tmp_path / "tile.png")
    (tmp_path / "notes.png").write_text("this is not an image")
    return tmp_path


@pytest.mark.parametrize(
    "kind,rows,row,field,message",
    [
        ("mcq", [_mcq(), _mcq(images=["missing.png"])], 2, "images[0]", "image not found"),
        ("mcq", [_mcq(answer="G")], 1, "answer", "'G' is not among the options"),
        ("mcq", [_mcq(), _mcq(), _mcq(options={"A": "x", "C": "y"}, answer="A")], 3, "options", "consecutive letters"),
        ("caption", [{"images": ["tile.png"], "caption": "ok"}, {"images": ["tile.png"], "caption": "   "}], 2,
         "caption", "caption is empty"),
        ("caption", [{"images": ["notes.png"], "caption": "x"}], 1, "images[0]", "not a readable image"),
        ("caption", [{"caption": "x"}], 1, "images", "Field required"),
        ("conversation", [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}],
         1, "messages.1", "empty assistant turn"),
        ("conversation", [{"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]},
                                        {"role": "assistant", "content": "a"}], "images": []}],
         1, "images", "1 image placeholders but 0 images"),
        ("embed_pair", [{"query": {"text": " "}, "positive": {"text": "t"}}], 1, "query",
         "needs text, images or frames"),
        ("mcq", [_mcq(options={"A": "x", "B": " ", "C": "z"})], 1, "options.B", "empty option text"),
        ("mcq", [_mcq(options={"A": "glands", "B": "Glands", "C": "z"})], 1, "options.A", "same text as another"),
        ("mcq", [_mcq(answer="", answer_type="open", options={})], 1, "answer", "at least 1 character"),
        ("mcq", [_mcq(answer=["B"])], 1, "answer", "valid string"),
        ("conversation", [{"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "a"}]}],
         1, "messages.0", "empty user turn"),
    ],
)
def test_bad_input_names_file_row_and_field(folder, kind, rows, row, field, message):
    path = _jsonl(folder / "data.jsonl", rows)
    with pytest.raises(DataError) as info:
        load_records(path, kind)
    err = info.value
    assert (err.path, err.row, err.field) == (str(path), row, field)
    assert message in str(err)
    assert str(err).startswith(f"{path}:{row}: field '{field}'")


def test_invalid_json_line_is_located(folder):
    path = folder / "data.jsonl"
    path.write_text(json.dumps(_mcq()) + "\n{not json\n")
    with pytest.raises(DataError, match=r"data.jsonl:2: invalid JSON"):
        load_records(path, "mcq")


def test_image_forms_path_base64_datauri_bytes_dict(folder):
    raw = (folder / "tile.png").read_bytes()
    b64 = base64.b64encode(raw).decode()
    for ref in ["tile.png", str(folder / "tile.png"), b64, "data:image/png;base64," + b64, raw,
                {"bytes": raw, "path": None}]:
        img = load_image(ref, folder)
        assert img.size == (28, 28) and img.mode == "RGB"
    with pytest.raises(ValueError):
        load_image(b"not an image")


def test_relative_paths_become_absolute(folder):
    rec = load_records(_jsonl(folder / "d.jsonl", [_mcq()]), "mcq")[0]
    assert rec.images[0] == str((folder / "tile.png").resolve())
    assert isinstance(rec, MCQRecord) and "A. x" in rec.prompt_text()


def test_parquet_and_datasets_directory(folder):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    raw = (folder / "tile.png").read_bytes()
    rows = [{"images": [{"bytes": raw, "path": None}], "caption": f"cap {i}"} for i in range(5)]
    pq.write_table(pa.Table.from_pylist(rows), folder / "c.parquet")
    recs = load_records(folder / "c.parquet", "caption")
    assert [r.caption for r in recs] == [f"cap {i}" for i in range(5)]
    Dataset.from_list(rows).save_to_disk(str(folder / "hf"))
    recs = load_records(folder / "hf", "caption")
    assert len(recs) == 5 and isinstance(recs[0], CaptionRecord)
    bad = rows[:2] + [{"images": [{"bytes": raw, "path": None}], "caption": ""}]
    pq.write_table(pa.Table.from_pylist(bad), folder / "bad.parquet")
    with pytest.raises(DataError, match=r"bad.parquet:3: field 'caption'"):
        load_records(folder / "bad.parquet", "caption")


def test_streaming_100k_rows_does_not_load_the_file(tmp_path):
    """Iterating a 100k-row JSONL keeps memory far below the file size, and the first row arrives before the rest
    is read."""
    _png(tmp_path / "tile.png")
    path = tmp_path / "big.jsonl"
    line = json.dumps({"images": ["tile.png"], "caption": "dense pink stroma with sparse nuclei " * 8}) + "\n"
    with path.open("w") as fh:
        for _ in range(100_000):
            fh.write(line)
    size = path.stat().st_size
    assert size > 30_000_000
    tracemalloc.start()
    n = 0
    for _ in iter_records(path, "caption", check_images=False):
        n += 1
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert n == 100_000
    assert peak < size / 20, f"peak {peak} bytes while streaming a {size}-byte file"
    it = iter_records(path, "caption")
    assert next(it).caption.startswith("dense")


def test_vlmeval_tsv_reading(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (28, 28), (200, 100, 150)).save(buf, format="PNG")
    b64 = base64.b64encode(buf.getvalue()).decode()
    path = tmp_path / "X.tsv"
    path.write_text("index\timage\tquestion\tA\tB\tC\tanswer\tcategory\n"
                    f"0\t{b64}\tWhich?\tx\ty\tz\tC\tcat1\n"
                    f"1\t{b64}\tIs it?\t\t\t\tYes\tcat2\n"
                    f"2\t{b64}\tWhich?\tx\ty\t\tD\tcat1\n")
    rows = iter_vlmeval_tsv(path)
    first, second = next(rows), next(rows)
    assert first.answer_type == "mcq" and first.options == {"A": "x", "B": "y", "C": "z"}
    assert second.answer_type == "yesno"
    with pytest.raises(DataError, match=r"X.tsv:4: field 'answer'"):
        next(rows)


def test_non_utf8_bytes_are_located_by_line_and_byte_offset(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"caption": "ok", "images": ["t.png"]}\n{"caption": "caf\xe9", "images": ["t.png"]}\n')
    with pytest.raises(DataError, match=r"data.jsonl:2: not UTF-8: byte 0xe9 at byte offset 55 of the file"):
        load_records(path, "caption", check_images=False)
    tsv = tmp_path / "bench.tsv"
    tsv.write_bytes(b"index\tquestion\tA\tB\tanswer\n1\tq\tx\ty\tA\n2\tq\xff\tx\ty\tA\n")
    with pytest.raises(DataError, match=r"bench.tsv:3: not UTF-8: byte 0xff at byte offset 39"):
        list(iter_vlmeval_tsv(tsv))


def test_a_short_tsv_row_is_an_error_not_a_half_record(tmp_path):
    tsv = tmp_path / "bench.tsv"
    tsv.write_text("index\tquestion\tA\tB\tC\tD\tanswer\tcategory\n1\tq\tx\n")
    with pytest.raises(DataError, match=r"bench.tsv:2: 3 fields, but the header has 8 columns"):
        list(iter_vlmeval_tsv(tsv))


def test_a_field_one_typo_away_is_an_error_when_the_field_it_meant_is_absent(folder, caplog):
    """`imags` would leave the MCQ without its image, and `categroy` without its category: one line each."""
    mcq = _mcq()
    path = _jsonl(folder / "typo.jsonl", [mcq, {**{k: v for k, v in mcq.items() if k != "images"}, "imags": ["x.png"]}])
    with pytest.raises(DataError, match=r"typo.jsonl:2: field 'imags': unknown field; did you mean 'images'\?"):
        load_records(path, "mcq")
    path = _jsonl(folder / "data.jsonl", [{**mcq, "categroy": "glands", "source": "book"}])
    with pytest.raises(DataError, match=r"data.jsonl:1: field 'categroy': unknown field; did you mean 'category'\?"):
        load_records(path, "mcq")
    # With the field itself present, the near-miss is only suspicious; a legitimate extra key is not noise.
    path = _jsonl(folder / "both.jsonl", [{**mcq, "category": "glands", "categroy": "glands", "source": "book"}])
    with caplog.at_level("WARNING"):
        load_records(path, "mcq")
    assert "unknown field 'categroy' kept as an extra; did you mean 'category'?" in caplog.text
    assert "'source'" not in caplog.text
