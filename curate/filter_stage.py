"""The filter stage: teacher outputs through the registered rules, into SFT-ready conversations and a report.

    DIR/kept.jsonl          our `conversation` kind (plus id, record_id, prompt_id, task, subfield, caption)
    DIR/rejected.jsonl      each rejected input row as it came, with `reasons`: ["rule: why", ...]
    DIR/filter_report.json  counts per rule per subfield, with examples
    DIR/filter_report.md    the same as tables

Input rows need `id` and `response`; `reasoning`, `gold`, `options`, `finish_reason`, `subfield`, `task`, `images`
are used where present.  Rows are read in chunks: the row rules run on each row, then the batch rules (near-
duplicates) on the rows the row rules kept.  Rows are taken in `id` order, not file order, so the first of two
near-copies (the one kept) is the same whatever order a concurrent teacher wrote them in.
"""

from __future__ import annotations

import contextlib
import gc
import json
import mmap
import re
from collections import Counter, defaultdict
from pathlib import Path

from patho_r1.curate.config import FilterStage
from patho_r1.curate.filters import FILTERS, Candidate, candidates
from patho_r1.curate.stages import StageContext
from patho_r1.curate.store import relative_images
from patho_r1.curate.teacher_output import parse_reply, to_conversation
from patho_r1.errors import ConfigError, DataError

CHUNK = 4096


# The id of a line that starts with it, as our generate stage writes them ({"id": ..., ...}): read without parsing
# the whole line in the first pass (the second pass parses it, and checks the id it finds is this one).
_LEADING_ID = re.compile(rb'\{"id": ("(?:[^"\\]|\\.)*"|-?\d+)[,}]')


def _leading_id(line: bytes) -> str | None:
    m = _LEADING_ID.match(line)
    if m is None:
        return None
    token = m.group(1)
    try:
        if token[:1] == b'"' and b"\\" not in token:  # a string without escapes is its own text
            return token[1:-1].decode("utf-8")
        return str(json.loads(token))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None  # the whole line is parsed, and its error named


def _read_rows(path: Path):
    """The rows of a teacher-output JSONL in a canonical order (by `id`), whatever order they were written in; a bad
    line names the file, line and field.

    A concurrent teacher appends replies in completion order, and the near-duplicate rule keeps the first of two
    near-copies: in file order, two runs of the same teacher could keep different rows.  So the first pass reads each
    line's id and byte offset, and the second reads the lines again in id order (from the page cache, usually)."""
    index: list[tuple[str, int, int, int]] = []  # (id, byte offset, byte length, line number)
    with path.open("rb") as fh:
        offset = 0
        for n, line in enumerate(fh, start=1):
            if line.strip():
                index.append((_leading_id(line) or str(_check_row(path, n, line)["id"]), offset, len(line), n))
            offset += len(line)
    if not index:
        return
    index.sort()
    # the second pass slices a memory map: a seek and a read for each of a million lines cost more than the slices
    with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
        for row_id, offset, length, n in index:
            row = _check_row(path, n, data[offset:offset + length])
            if str(row["id"]) != row_id:  # a line that names "id" twice: JSON keeps the last
                raise DataError(path, n, "id", "given more than once")
            yield row


def _check_row(path: Path, n: int, line: bytes) -> dict:
    try:
        row = json.loads(line.decode("utf-8"))  # str, not bytes: json's encoding detection costs more than this
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(path, n, None, f"not JSON: {getattr(exc, 'msg', exc)}") from None
    if not isinstance(row, dict):
        raise DataError(path, n, None, f"expected an object, got {type(row).__name__}")
    for key in ("id", "response"):
        if not isinstance(row.get(key), str if key == "response" else (str, int)):
            raise DataError(path, n, key, "missing" if key not in row else "not a string")
    return row


@contextlib.contextmanager
def _no_cycle_collection():
    """Python's cycle collector paused for the stage.  Each chunk's rows, replies and candidates (tens of thousands
    of objects, none in a cycle: reference counting frees them) outlive many collections and are walked again at
    each; that was 12% of the filter's time at 300k rows.  Restored as it was, whatever happens."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _load_tokenizer(name: str | None):
    if not name:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)


class FilterReport:
    def __init__(self, examples: int):
        self.examples = examples
        self.by_rule: dict[str, Counter] = defaultdict(Counter)  # rule -> subfield -> rejections
        self.samples: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
        self.seen: Counter = Counter()
        self.kept: Counter = Counter()

    def add(self, row: dict, reasons: list[str]) -> None:
        subfield = str(row.get("subfield") or "unknown")
        self.seen[subfield] += 1
        if not reasons:
            self.kept[subfield] += 1
        for reason in reasons:
            rule = reason.split(":", 1)[0]
            self.by_rule[rule][subfield] += 1
            bucket = self.samples[rule][subfield]
            if len(bucket) < self.examples:
                bucket.append({"id": row.get("id"), "reason": reason, "response": str(row.get("response"))[:300]})

    def as_dict(self, rules: list[str]) -> dict:
        return {"rows": sum(self.seen.values()), "kept": sum(self.kept.values()),
                "per_subfield": {s: {"rows": n, "kept": self.kept[s]} for s, n in sorted(self.seen.items())},
                "rejected_by_rule": {r: dict(sorted(self.by_rule[r].items())) for r in rules},
                "examples": {r: {s: v for s, v in self.samples[r].items()} for r in rules if r in self.samples}}

    def markdown(self, rules: list[str]) -> str:
        subfields = sorted(self.seen)
        lines = ["# Filter report", "",
                 f"{sum(self.kept.values())} of {sum(self.seen.values())} teacher outputs kept. A row can fail "
                 "several rules; each rule counts it.", "",
                 "| rule | " + " | ".join(subfields) + " | all |", "|---|" + "---|" * (len(subfields) + 1)]
        for rule in rules:
            counts = self.by_rule[rule]
            lines.append(f"| {rule} | " + " | ".join(str(counts[s]) for s in subfields)
                         + f" | {sum(counts.values())} |")
        lines.append("| **kept** | " + " | ".join(f"{self.kept[s]}/{self.seen[s]}" for s in subfields)
                     + f" | {sum(self.kept.values())}/{sum(self.seen.values())} |")
        for rule in rules:
            if rule not in self.samples:
                continue
            lines += ["", f"## {rule}", ""]
            for subfield, examples in sorted(self.samples[rule].items()):
                for ex in examples:
                    snippet = ex["response"].replace("\n", " ").replace("|", "/")[:160]
                    lines.append(f"- {subfield} `{ex['id']}`: {ex['reason']} - {snippet}")
        return "\n".join(lines) + "\n"


def kept_row(c: Candidate, stage: FilterStage, images: list) -> dict:
    row = c.row
    out = {"id": str(row["id"]), "messages": to_conversation(c.parsed, c.task, images, stage.system_prompt),
           "images": images, "task": c.task}
    for key in ("record_id", "prompt_id", "subfield", "level", "caption", "gold"):
        if row.get(key) is not None:
            out[key] = row[key]
    return out


def run_filter(stage: FilterStage, ctx: StageContext) -> dict:
    """The filter stage's runner (`curate/stages.py`): its input, or the parent's generations, through the rules."""
    source = filter_source(stage, ctx.parent)
    ctx.progress.total = ctx.progress.total or None
    counts = filter_rows(stage, source, ctx.work, ctx.writer, ctx.progress)
    return {**counts, "kinds": {"conversation": counts["kept"]}}


def filter_source(stage: FilterStage, parent: Path | None) -> Path:
    """The teacher outputs a filter stage reads: its `input`, else the parent stage's generations.jsonl."""
    if stage.input:
        return Path(stage.input).resolve()
    from patho_r1.curate.generate import GENERATIONS

    if parent is None or not (parent / GENERATIONS).is_file():
        raise ConfigError(f"filter: no input; give `input` (a JSONL of teacher outputs) or run it after a generate "
                          f"stage ({parent or 'no parent'} holds no {GENERATIONS})")
    return parent / GENERATIONS


def filter_rows(stage: FilterStage, source: Path, out: Path, writer, progress) -> dict:
    """`source`'s rows through the rules, in chunks: kept rows as conversations, rejected ones with their reasons,
    and the report."""
    checks = [(name, FILTERS[name].factory(stage), FILTERS[name].batch) for name in stage.rules]
    row_checks = [(n, c) for n, c, batch in checks if not batch]
    batch_checks = [(n, c) for n, c, batch in checks if batch]
    tokenizer = _load_tokenizer(stage.tokenizer)
    report = FilterReport(stage.examples)
    src_dir = source.parent

    def flush(rows: list[dict]) -> None:
        chunk = _candidates(rows, tokenizer)
        reasons = _reasons(chunk, row_checks, batch_checks)
        for c, why in zip(chunk, reasons, strict=True):
            report.add(c.row, why)
            if why:
                writer.row("rejected", {**c.row, "reasons": why})
            else:
                images = relative_images(c.row, src_dir, out).get("images") or []
                writer.row("kept", kept_row(c, stage, images))
        progress.advance(len(chunk))

    with _no_cycle_collection():
        rows: list[dict] = []
        for row in _read_rows(source):
            rows.append(row)
            if len(rows) >= CHUNK:
                flush(rows)
                rows = []
        if rows:
            flush(rows)
    return _write_report(report, stage, source, out)


def _reasons(chunk: list[Candidate], row_checks: list, batch_checks: list) -> list[list[str]]:
    """Why each candidate fails: the row rules on every row, then the batch rules on the rows still alive."""
    reasons = [[f"{name}: {why}" for name, check in row_checks if (why := check(c)) is not None] for c in chunk]
    for name, check in batch_checks:
        alive = [i for i, r in enumerate(reasons) if not r]
        for i, why in zip(alive, check([chunk[i] for i in alive]), strict=True):
            if why is not None:
                reasons[i].append(f"{name}: {why}")
    return reasons


def _write_report(report: FilterReport, stage: FilterStage, source: Path, out: Path) -> dict:
    summary = report.as_dict(stage.rules)
    (out / "filter_report.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    (out / "filter_report.md").write_text(report.markdown(stage.rules), encoding="utf-8")
    return {"input": str(source), "kept": summary["kept"], "rejected": summary["rows"] - summary["kept"],
            "rejected_by_rule": {r: sum(v.values()) for r, v in summary["rejected_by_rule"].items()}}


def _candidates(rows: list[dict], tokenizer) -> list[Candidate]:
    parsed = [parse_reply(row["response"], row.get("reasoning")) for row in rows]
    if tokenizer is None:  # words and punctuation, counted for the whole chunk at once
        return candidates(rows, parsed)
    # the length rule counts what the student learns from: questions, thinks (inline or separate) and answers,
    # not the tags around them
    texts = [" ".join(f"{t.question or ''} {t.think or ''} {t.answer or ''}" for t in p.turns) or row["response"]
             for row, p in zip(rows, parsed, strict=True)]
    n_tokens = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    return candidates(rows, parsed, n_tokens)
