"""Predictions made elsewhere, read for `patho-r1 eval score` and matched to a benchmark's rows by id.

| file                                    | rows                                                    | id      |
|-----------------------------------------|---------------------------------------------------------|---------|
| our `predictions.jsonl` (`eval bench`)  | `id`, `response` (raw, tags and all), `response_tokens` | `id`    |
| any JSONL                               | `{"id": ..., "prediction": ...}` (or `response`)        | `id`    |
| VLMEvalKit `{model}_{dataset}.xlsx`     | the dataset TSV's columns less `image`, + `prediction`  | `index` |
| (`.tsv` / `.json` with its PRED_FORMAT) | (`vlmeval/inference.py`; `vlmeval/smp/file.py` `dump`)  |         |

An id matches a row's own id, or the part after its last `:` (a VLMEvalKit TSV row `PathMMU_VAL:17` is index `17`
in the predictions file) where that part is unique.  Bad input is one `DataError` naming the file, the row and the
field: an unreadable row, no id, no prediction field, a duplicate id, or an id the benchmark does not have (unless a
split or subset was asked for: then rows outside it are counted in `outside`).  A benchmark row with no prediction,
or with an explicit null, is `None`: the scorer counts and lists it, and never scores it as wrong.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from patho_r1.data import MCQRecord, iter_raw_rows, read_json_file
from patho_r1.errors import DataError

TABLE_SUFFIXES = (".xlsx", ".tsv", ".json")


@dataclass
class MatchedPredictions:
    responses: list[str | None]  # one per benchmark row, in its order; None: no prediction
    token_counts: list[int | None] | None  # the file's own response lengths, where it kept them (ours)
    format: str  # "patho-r1", "jsonl" or "vlmeval"
    outside: int  # predictions for rows outside the requested split/subsets


@dataclass
class _Prediction:
    row: int  # the file's line (JSONL) or spreadsheet row (a table: its header is row 1)
    id: str
    text: str | None
    tokens: int | None


def read_predictions(path: str | Path) -> tuple[str, list[_Prediction]]:
    """(format, predictions) from a predictions file; raises a DataError naming file, row and field."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, None, "predictions file not found")
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    if path.suffix in TABLE_SUFFIXES:
        return "vlmeval", _read_vlmeval(path)
    raise DataError(path, None, None, f"unsupported predictions file: use .jsonl, or VLMEvalKit's "
                    f"{', '.join(TABLE_SUFFIXES)}")


def _read_jsonl(path: Path) -> tuple[str, list[_Prediction]]:
    out: list[_Prediction] = []
    ours = False
    for line_no, row in iter_raw_rows(path):  # bad bytes and bad JSON located by line, blank lines skipped
        if not isinstance(row, dict):
            raise DataError(path, line_no, None, f"expected a JSON object, got {type(row).__name__}")
        key = "response" if "response" in row else "prediction"
        if key not in row:
            raise DataError(path, line_no, "prediction", f"missing: each row needs `id` and `prediction` (or "
                            f"`response`); this row has {sorted(row)[:8]}")
        ours = ours or "response_tokens" in row
        tokens = row.get("response_tokens")
        out.append(_Prediction(line_no, _id(row.get("id"), path, line_no, "id"), _text(row[key], path, line_no,
                               key), tokens if isinstance(tokens, int) else None))
    return ("patho-r1" if ours else "jsonl"), out


def _read_vlmeval(path: Path) -> list[_Prediction]:
    import pandas as pd

    try:
        if path.suffix == ".xlsx":
            table = pd.read_excel(path, dtype=object)
        elif path.suffix == ".tsv":
            table = pd.read_csv(path, sep="\t", dtype=object, keep_default_na=False)
        else:
            data = read_json_file(path)
            if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
                raise DataError(path, None, None, "expected VLMEvalKit's JSON: a list of row objects")
            table = pd.DataFrame.from_records(data)
    except DataError:
        raise
    except Exception as exc:  # a broken spreadsheet or TSV: pandas' message, in one line
        raise DataError(path, None, None, f"cannot read as a VLMEvalKit predictions table: "
                        f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    for column in ("index", "prediction"):
        if column not in table.columns:
            raise DataError(path, 1, column, f"no `{column}` column (VLMEvalKit's predictions have `index` and "
                            f"`prediction`; this file has {[str(c) for c in table.columns][:12]})")
    return [_Prediction(n + 2, _id(index, path, n + 2, "index"), _text(pred, path, n + 2, "prediction"), None)
            for n, (index, pred) in enumerate(zip(table["index"], table["prediction"], strict=True))]


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _id(value, path: Path, row: int, field: str) -> str:
    if _missing(value) or (isinstance(value, str) and not value.strip()):
        raise DataError(path, row, field, "missing: every prediction needs the id of its benchmark row")
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # a spreadsheet's 17.0 is index 17
    if not isinstance(value, (str, int)):
        raise DataError(path, row, field, f"expected a string or an integer, got {type(value).__name__}")
    return str(value).strip()


def _text(value, path: Path, row: int, field: str) -> str | None:
    if _missing(value):
        return None  # an explicit null: no prediction, counted as missing
    if isinstance(value, (dict, list)):
        raise DataError(path, row, field, f"expected text, got {type(value).__name__}")
    return str(value)


def match_predictions(path: str | Path, records: list[MCQRecord], *, selection: bool = False) -> MatchedPredictions:
    """Each benchmark row's prediction (None where there is none).  `selection`: the rows are a split, subset or
    filtered part of the data, so an id outside them is counted, not an error."""
    fmt, predictions = read_predictions(path)
    position = {str(r.id): i for i, r in enumerate(records)}
    suffixes: dict[str, int | None] = {}
    for i, r in enumerate(records):
        tail = str(r.id).rsplit(":", 1)[-1]
        suffixes[tail] = None if tail in suffixes else i  # None: two rows end in the same index
    responses: list[str | None] = [None] * len(records)
    tokens: list[int | None] = [None] * len(records)
    seen: dict[int, int] = {}
    outside = 0
    for p in predictions:
        where = position.get(p.id, suffixes.get(p.id))
        if where is None:
            if selection:
                outside += 1
                continue
            raise DataError(path, p.row, "id", f"unknown id {p.id!r}: the benchmark data has no such row")
        if where in seen:
            raise DataError(path, p.row, "id", f"duplicate id {p.id!r} (already at row {seen[where]})")
        seen[where] = p.row
        responses[where], tokens[where] = p.text, p.tokens
    if all(r is None for r in responses):
        example = f" (the data's ids look like {str(records[0].id)!r})" if records else ""
        raise DataError(path, None, None, f"no prediction for any of the {len(records)} benchmark rows{example}")
    return MatchedPredictions(responses, tokens if fmt == "patho-r1" else None, fmt, outside)
