"""`patho-r1 eval bench`: the public pathology benchmarks, read from their own files and scored by their own rules.

    patho-r1 eval bench --name pathmmu --data PathMMU/ --model CKPT [--prompt cot|cod|direct] [--split test_tiny]
    patho-r1 eval bench --name pathvqa --data path-vqa/data --model CKPT --split test --judge-model M --judge-url URL

| benchmark         | files (`../shared/notes/dataset-formats.md`)               | table                      |
|-------------------|------------------------------------------------------------|----------------------------|
| `pathmmu`         | `data.json` + `images/` (§2), or VLMEvalKit `PathMMU_*.tsv` | subset x split             |
| `pathvqa`         | HF parquet (§1a), or `PathVQA_*.tsv`                       | closed / open, per split   |
| `quilt-vqa`       | HF parquet or `quiltvqa_test_w_ans.json` (§3a)             | closed / open              |
| `medxpertqa-mm`   | MM jsonl + images (§6b)                                    | medical task, question type|
| `omnimedvqa-path` | `QA_information/*/*.json` + `Images/` (§6a), microscopy only | source dataset, question type |

Files are read by the same readers the data engine imports them with (`patho_r1.formats`); a `.tsv` is read as a
VLMEvalKit TSV whatever the benchmark.  A bad row is an error naming its file, row and field, or, with
`on_error="skip"`, a line in `skipped.jsonl` and a count in the report (PathMMU ships no images for SocialPath, Atlas
and most of PathCLS, so a partial download needs it, or `subsets=`).

Scoring, each on the final answer (the last `<answer>`, else the text after `</think>`):
- MCQ, `accuracy`: the benchmark's own rule.  PathMMU: its MMMU-style parser, which guesses a random letter (seeded)
  when it finds none; `unparsed` counts those guesses.  The others are VLMEvalKit MCQ sets: its `can_infer`.
  Beside it, `vlmeval_accuracy` (VLMEvalKit's exact matching) and `strict_accuracy` (the RL reward: the `<answer>`
  content is exactly the gold letter).
- Closed yes/no: `score_yesno` (sentences, any case), or VLMEvalKit's case-sensitive verdict (`yesno_mode="vlmeval"`).
- Open: LLaVA-Med's token recall (the open number PathVQA and Quilt-VQA papers report), token F1 and normalised
  exact match; and, when a judge is given, the judge's accuracy.  LLaVA-Med's own closed metric is not used: it drops
  a yes/no answer that misses the gold from the denominator.

Every accuracy carries its n and 95% Wilson interval.  Prompts: `cot` (Patho-R1's reasoning system prompt), `cod`
(chain of draft: the same tags, steps of at most five words), `direct` (no system prompt, the benchmark's own
instruction to answer directly): the comparison the Patho-R1 paper makes.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from patho_r1.data import MCQRecord, parse_record
from patho_r1.errors import DataError
from patho_r1.eval.generation import ChatRequest, Generator, SamplingConfig
from patho_r1.eval.matching import (
    llava_med_normalize,
    llava_med_token_scores,
    pathmmu_correct,
)
from patho_r1.eval.mcq import build_request, judge, judge_open_answers, response_length
from patho_r1.eval.stats import wilson_interval
from patho_r1.formats import ImportOptions, get_format
from patho_r1.progress import RowProgress
from patho_r1.rewards.parsing import REASONING_SYSTEM_PROMPT, extract_final_answer, is_strict_format

# Chain of draft (Xu et al. 2025, arXiv:2502.18600) in Patho-R1's answer format: the paper compares it with CoT.
CHAIN_OF_DRAFT_PROMPT = (
    "You are a pathology expert. Think step by step, but only keep a minimum draft for each thinking step, with 5 "
    "words at most. Use the following format:<think> Your drafts </think><answer> Your final answer </answer>"
)
PROMPTS: dict[str, str | None] = {"cot": REASONING_SYSTEM_PROMPT, "cod": CHAIN_OF_DRAFT_PROMPT, "direct": None}
PromptMode = Literal["cot", "cod", "direct"]

# Keywords that pick pathology questions out of a general medical set; not an official subset (Patho-R1's 90
# MedXpertQA cases were never published), so results on it are labelled as ours.
PATHOLOGY_KEYWORDS = ("histolog", "biopsy", "patholog", "h&e", "hematoxylin", "haematoxylin", "micrograph", "stain",
                      "cytolog", "immunohisto")


def _is_pathology_question(record: MCQRecord) -> bool:
    return any(k in record.question.lower() for k in PATHOLOGY_KEYWORDS)


def _is_microscopy(record: MCQRecord) -> bool:
    return (getattr(record, "modality_type", None) or "").strip().lower() == "microscopy images"


@dataclass(frozen=True)
class Benchmark:
    name: str
    format: str  # the import format of its own files
    task: Literal["mcq", "vqa"]
    groups: tuple[str, ...]  # record fields the tables break down by, the first one across
    scorer: Literal["pathmmu", "vlmeval"] = "vlmeval"  # the MCQ rule its authors score with
    keep: Callable[[MCQRecord], bool] | None = None  # the rows that belong to it (a subset of a larger release)
    keep_note: str = ""
    summary: str = ""


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    Benchmark("pathmmu", "pathmmu", "mcq", ("category", "split"), scorer="pathmmu",
              summary="PathMMU (PubMed, SocialPath, EduContent, Atlas, PathCLS x val, test, test_tiny)"),
    Benchmark("pathvqa", "pathvqa", "vqa", ("split",), summary="PathVQA, closed (yes/no) and open"),
    Benchmark("quilt-vqa", "quilt-vqa", "vqa", ("split",), summary="Quilt-VQA, closed (yes/no) and open"),
    Benchmark("medxpertqa-mm", "medxpertqa-mm", "mcq", ("medical_task", "question_type"),
              summary="MedXpertQA multimodal (5 options); question_filter='pathology': our keyword subset"),
    Benchmark("omnimedvqa-path", "omnimedvqa", "mcq", ("category", "question_type"), keep=_is_microscopy,
              keep_note="modality_type == 'Microscopy Images'", summary="OmniMedVQA, microscopy rows only"),
)}


def get_benchmark(name: str) -> Benchmark:
    try:
        return BENCHMARKS[name]
    except KeyError:
        raise KeyError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}") from None


# ----------------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class LoadedBenchmark:
    records: list[MCQRecord]
    skipped: list[dict] = field(default_factory=list)  # {"file", "row", "field", "error"} per bad row skipped
    filtered: int = 0  # rows outside the requested subset, split or filter


def load_benchmark(bench: Benchmark, data: str | Path, *, images: str | Path | None = None, split: str | None = None,
                   subsets: list[str] | None = None, question_filter: str | None = None, limit: int | None = None,
                   on_error: Literal["fail", "skip"] = "fail") -> LoadedBenchmark:
    """The benchmark's rows as MCQ records (closed and open VQA rows too), through its own reader."""
    data = Path(data)
    is_tsv = data.suffix == ".tsv" or (data.is_dir() and any(data.glob("*.tsv")))
    fmt = get_format("vlmeval-tsv" if is_tsv else bench.format)
    opts = ImportOptions(images=Path(images) if images else None)
    if question_filter not in (None, "pathology"):
        raise ValueError(f"question_filter must be 'pathology' or None, got {question_filter!r}")
    out = LoadedBenchmark(records=[])
    for label, row, raw in fmt.rows(data, opts):
        if _outside(raw, split, subsets):  # before converting: a subset left out may lack its images
            out.filtered += 1
            continue
        try:
            converted = fmt.convert(raw, (label, row), opts)
            converted.check_files((label, row))
            record = parse_record({**converted.record, "images": converted.images}, "mcq", path=label, row=row)
        except DataError as exc:
            if on_error == "fail":
                raise
            out.skipped.append({"file": exc.path, "row": exc.row, "field": exc.field, "error": exc.message})
            continue
        wanted = (bench.keep is None or bench.keep(record)) \
            and (split is None or _field(record, "split") == split) \
            and (not subsets or record.category in subsets) \
            and (question_filter is None or _is_pathology_question(record))
        if not wanted:
            out.filtered += 1
            continue
        out.records.append(record)
        if limit and len(out.records) >= limit:
            break
    if not out.records:
        raise DataError(data, None, None, f"no {bench.name} rows to score ({len(out.skipped)} bad, {out.filtered} "
                        f"outside split={split!r} subsets={subsets} question_filter={question_filter!r}"
                        f"{', ' + bench.keep_note if bench.keep_note else ''})")
    return out


def _outside(raw, split: str | None, subsets: list[str] | None) -> bool:
    """Whether a raw row's own subset or split (where its reader tags them: PathMMU's `_subset`, a shard's `_split`)
    is outside the request."""
    if not isinstance(raw, dict):
        return False
    subset, raw_split = raw.get("_subset"), raw.get("_split") or raw.get("split")
    return bool((subsets and subset is not None and subset not in subsets)
                or (split and raw_split is not None and str(raw_split) != split))


def _field(record: MCQRecord, name: str) -> str | None:
    value = getattr(record, name, None)
    return None if value is None else str(value)


# ----------------------------------------------------------------------------------------------------------------------
# Prompting
# ----------------------------------------------------------------------------------------------------------------------


def question_text(bench: Benchmark, record: MCQRecord, prompt: PromptMode) -> str:
    """The user turn in the benchmark's own layout.  `direct` keeps its instruction to answer at once; `cot` and
    `cod` drop that instruction, since the system prompt asks for reasoning first."""
    direct = prompt == "direct"
    if record.answer_type == "mcq" and bench.scorer == "pathmmu":  # PathMMU's construct_prompt
        options = "\n".join(f"({k}) {v}" for k, v in record.options.items())
        tail = "Answer with the option's letter from the given choices directly." if direct else \
            "Answer with the option's letter from the given choices."
        return f"{record.question}\n\n{options}\n\n{tail}"
    if record.answer_type == "mcq":  # VLMEvalKit's ImageMCQDataset prompt
        options = "".join(f"{k}. {v}\n" for k, v in record.options.items())
        return f"Question: {record.question}\nOptions:\n{options}Please select the correct answer from the options " \
               "above. \n"
    if record.answer_type == "yesno":  # Quilt-LLaVA's closed-question suffix
        return f"{record.question} Please choose from the following two options: [yes, no]" if direct else \
            record.question
    # open: VLMEvalKit's short-answer instruction
    return f"{record.question}\nPlease directly provide a short answer to the question. " if direct else \
        record.question


def build_bench_request(bench: Benchmark, record: MCQRecord, prompt: PromptMode) -> ChatRequest:
    request = build_request(record, PROMPTS[prompt])
    user = request.messages[-1]["content"]
    user[-1] = {"type": "text", "text": question_text(bench, record, prompt)}
    return request


# ----------------------------------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class BenchRow:
    id: str
    groups: dict[str, str | None]
    question: str
    answer_type: str
    answer: str
    prediction: str
    response: str
    correct: bool | None  # the benchmark's verdict; None for an open answer with no judge
    format_ok: bool
    response_tokens: int
    scores: dict[str, float | bool | None] = field(default_factory=dict)  # the rule-by-rule verdicts and metrics


def score_row(bench: Benchmark, record: MCQRecord, response: str, n_tokens: int, rng: random.Random,
              yesno_mode: str = "patho", judge_verdict: bool | None = None) -> BenchRow:
    prediction = extract_final_answer(response)
    scores: dict[str, float | bool | None] = {}
    if record.answer_type in ("mcq", "yesno"):
        # the built-in scorer's verdict: VLMEvalKit's matching and the strict RL rule, yes/no in the chosen mode
        verdict = judge(record, response, n_tokens, yesno_mode=yesno_mode)
        correct = verdict.correct
        if record.answer_type == "mcq":
            scores["vlmeval_correct"], scores["strict_correct"] = verdict.correct, verdict.strict_correct
            if bench.scorer == "pathmmu":
                correct, scores["parsed"] = pathmmu_correct(prediction, record.options, record.answer, rng)
    else:
        scores.update(llava_med_token_scores(prediction, record.answer))
        scores["exact_match"] = llava_med_normalize(prediction) == llava_med_normalize(record.answer)
        scores["judge"] = judge_verdict
        correct = judge_verdict
    return BenchRow(id=str(record.id), groups={g: _field(record, g) for g in bench.groups}, question=record.question,
                    answer_type=record.answer_type, answer=record.answer, prediction=prediction, response=response,
                    correct=correct, format_ok=is_strict_format(response), response_tokens=n_tokens, scores=scores)


def _accuracy(hits: list[bool]) -> dict:
    k, n = sum(hits), len(hits)
    lo, hi = wilson_interval(k, n)
    return {"n": n, "accuracy": round(k / n, 4) if n else None, "ci95": [round(lo, 4), round(hi, 4)]}


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def summarise_bench(bench: Benchmark, rows: list[BenchRow]) -> dict:
    """The benchmark's numbers: overall, and per group (PathMMU: per subset and split, as its own table)."""
    mcq = [r for r in rows if r.answer_type == "mcq"]
    closed = [r for r in rows if r.answer_type == "yesno"]
    opened = [r for r in rows if r.answer_type not in ("mcq", "yesno")]
    report: dict = {"benchmark": bench.name, "n": len(rows), "format_rate": _mean([r.format_ok for r in rows]),
                    "mean_response_tokens": _mean([r.response_tokens for r in rows])}
    if mcq:
        report["mcq"] = {**_accuracy([bool(r.correct) for r in mcq]),
                         "vlmeval_accuracy": _mean([r.scores["vlmeval_correct"] for r in mcq]),
                         "strict_accuracy": _mean([r.scores["strict_correct"] for r in mcq])}
        if bench.scorer == "pathmmu":
            report["mcq"]["unparsed"] = sum(not r.scores["parsed"] for r in mcq)
    if closed:
        report["closed"] = _accuracy([bool(r.correct) for r in closed])
    if opened:
        judged = [r.correct for r in opened if r.correct is not None]
        report["open"] = {"n": len(opened), **{m: _mean([r.scores[m] for r in opened])
                                               for m in ("recall", "f1", "precision", "exact_match")},
                          "judge": _accuracy(judged) if judged else None}
    report["groups"] = {}
    for group in bench.groups:
        by_value: dict[str, list[BenchRow]] = defaultdict(list)
        for r in rows:
            by_value[r.groups[group] or "none"].append(r)
        report["groups"][group] = {v: _group_numbers(rs) for v, rs in sorted(by_value.items())}
    if len(bench.groups) == 2:  # a cross table: PathMMU reports accuracy per subset within each split
        across, down = bench.groups
        cells: dict[str, dict[str, list[BenchRow]]] = defaultdict(lambda: defaultdict(list))
        for r in rows:
            cells[r.groups[down] or "none"][r.groups[across] or "none"].append(r)
        report["cross"] = {"rows": down, "columns": across,
                           "cells": {d: {a: _group_numbers(rs) for a, rs in sorted(c.items())}
                                     for d, c in sorted(cells.items())}}
    return report


def _group_numbers(rows: list[BenchRow]) -> dict:
    """One group's numbers: MCQ accuracy; or, for VQA, closed accuracy, open recall and (judged) open accuracy."""
    mcq = [bool(r.correct) for r in rows if r.answer_type == "mcq"]
    if mcq:
        return _accuracy(mcq)
    closed = [bool(r.correct) for r in rows if r.answer_type == "yesno"]
    opened = [r for r in rows if r.answer_type not in ("mcq", "yesno")]
    judged = [bool(r.correct) for r in opened if r.correct is not None]
    return {"closed": _accuracy(closed) if closed else None, "open_n": len(opened),
            "open_recall": _mean([r.scores["recall"] for r in opened]),
            "open_judge": _accuracy(judged) if judged else None}


def markdown(report: dict, title: str) -> str:
    """The benchmark's table(s), each accuracy with n and its 95% interval."""
    def cell(m: dict | None) -> str:
        if not m or m.get("accuracy") is None:
            return "-"
        return f"{m['accuracy']:.3f} [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}] (n={m['n']})"

    lines = [f"### {title}", "", f"prompt: `{report.get('prompt')}`, yes/no mode: `{report.get('yesno_mode')}`, "
             f"format rate {report['format_rate']:.3f}, mean response tokens {report['mean_response_tokens']:.1f}",
             ""]
    if "mcq" in report:
        m = report["mcq"]
        lines += ["| metric | value |", "|---|---|", f"| accuracy ({report.get('scorer')}) | {cell(m)} |",
                  f"| VLMEvalKit exact matching | {m['vlmeval_accuracy']:.3f} |",
                  f"| strict (answer tag is the letter) | {m['strict_accuracy']:.3f} |"]
        if "unparsed" in m:
            lines.append(f"| unparsed (scored by a random guess, as upstream) | {m['unparsed']} |")
        lines.append("")
    if "closed" in report or "open" in report:
        lines += ["| part | metric | value |", "|---|---|---|"]
        if "closed" in report:
            lines.append(f"| closed | yes/no accuracy | {cell(report['closed'])} |")
        if "open" in report:
            o = report["open"]
            lines += [f"| open (n={o['n']}) | token recall (LLaVA-Med) | {o['recall']:.3f} |",
                      f"| open | token F1 | {o['f1']:.3f} |", f"| open | exact match | {o['exact_match']:.3f} |",
                      f"| open | judge accuracy | {cell(o['judge']) if o['judge'] else 'not run (no judge)'} |"]
        lines.append("")
    if "cross" in report:
        cross = report["cross"]
        columns = sorted({c for row in cross["cells"].values() for c in row})
        lines += [f"| {cross['rows']} \\ {cross['columns']} | overall | " + " | ".join(columns) + " |",
                  "|---" * (len(columns) + 2) + "|"]
        for down, row in cross["cells"].items():
            overall = report["groups"][cross["rows"]][down]
            lines.append(f"| {down} | {cell(overall)} | " + " | ".join(cell(row.get(c)) for c in columns) + " |")
        lines.append("")
    for group, values in report["groups"].items():
        if "cross" in report and group == report["cross"]["rows"]:
            continue
        if "mcq" in report:
            lines += [f"| {group} | accuracy |", "|---|---|"]
            lines += [f"| {v} | {cell(m)} |" for v, m in values.items()]
        else:
            lines += [f"| {group} | closed accuracy | open n | open recall | open judge accuracy |",
                      "|---|---|---|---|---|"]
            for v, m in values.items():
                recall = "-" if m["open_recall"] is None else f"{m['open_recall']:.3f}"
                lines.append(f"| {v} | {cell(m['closed'])} | {m['open_n']} | {recall} | {cell(m['open_judge'])} |")
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------------


def evaluate_benchmark(bench: Benchmark, records: list[MCQRecord], generator: Generator, sampling: SamplingConfig, *,
                       prompt: PromptMode = "cot", tokenizer=None, llm_judge=None, yesno_mode: str = "patho",
                       seed: int = 42, show_progress: bool = False) -> tuple[dict, list[BenchRow]]:
    """Generate (batched, with progress and ETA), then score every row; returns (report, rows)."""
    if prompt not in PROMPTS:
        raise ValueError(f"prompt must be one of {sorted(PROMPTS)}, got {prompt!r}")
    if yesno_mode not in ("patho", "vlmeval"):
        raise ValueError(f"yesno_mode must be 'patho' or 'vlmeval', got {yesno_mode!r}")
    requests = [build_bench_request(bench, r, prompt) for r in records]
    progress = RowProgress(f"{bench.name} generate", total=len(requests), show=show_progress)
    responses: list[str] = []
    chunk = max(sampling.batch_size * 4, 1)  # a few batches per call: progress moves, batching stays whole
    for start in range(0, len(requests), chunk):
        responses += generator.generate(requests[start:start + chunk], sampling)
        progress.advance(len(requests[start:start + chunk]))
    progress.close()
    count = response_length(tokenizer)
    verdicts = judge_open_answers(records, responses, llm_judge)  # without a judge, open rows get token metrics only
    rng = random.Random(seed)  # PathMMU's parser guesses with `random.seed(42)`, in row order
    rows = [score_row(bench, rec, resp, count(resp), rng, yesno_mode, verdicts.get(i))
            for i, (rec, resp) in enumerate(zip(records, responses, strict=True))]
    report = summarise_bench(bench, rows)
    report.update(prompt=prompt, yesno_mode=yesno_mode, scorer="PathMMU parser" if bench.scorer == "pathmmu" else
                  "VLMEvalKit can_infer", judge=getattr(llm_judge, "model", None))
    return report, rows


def write_bench_results(out_dir: str | Path, report: dict, rows: list[BenchRow], loaded: LoadedBenchmark,
                        title: str) -> Path:
    """results.json (report + every row), predictions.jsonl, skipped.jsonl, results.md; each written whole under a
    temporary name and then renamed, so a killed run leaves the previous results, never half a file."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "results.json": json.dumps({"report": report}, indent=2) + "\n",
        "predictions.jsonl": "".join(json.dumps(asdict(r)) + "\n" for r in rows),
        "skipped.jsonl": "".join(json.dumps(s) + "\n" for s in loaded.skipped),
        "results.md": markdown(report, title) + (f"\n{len(loaded.skipped)} bad rows skipped (skipped.jsonl)\n"
                                                 if loaded.skipped else ""),
    }
    for name, text in files.items():
        tmp = out / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out / name)
    return out


def run_benchmark(name: str, data: str | Path, model: str, out_dir: str | Path, *, engine: str = "hf",
                  prompt: PromptMode = "cot", split: str | None = None, subsets: list[str] | None = None,
                  question_filter: str | None = None, images: str | None = None, limit: int | None = None,
                  on_error: Literal["fail", "skip"] = "fail", max_new_tokens: int = 512, batch_size: int = 16,
                  yesno_mode: str = "patho", llm_judge=None, seed: int = 42, show_progress: bool = False) -> dict:
    """Read, generate, score and write one benchmark for one checkpoint; returns the report."""
    from patho_r1.eval.generation import make_generator
    from patho_r1.models import load_backbone

    bench = get_benchmark(name)
    loaded = load_benchmark(bench, data, images=images, split=split, subsets=subsets, question_filter=question_filter,
                            limit=limit,
                            on_error=on_error)
    tokenizer = None
    if engine == "hf":
        import torch

        backbone = load_backbone(model)
        if torch.cuda.is_available():
            backbone.model.to("cuda")
        generator, tokenizer = make_generator(backbone), backbone.tokenizer
    else:
        generator = make_generator(model, engine=engine)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0, batch_size=batch_size)
    report, rows = evaluate_benchmark(bench, loaded.records, generator, sampling, prompt=prompt, tokenizer=tokenizer,
                                      llm_judge=llm_judge, yesno_mode=yesno_mode, seed=seed,
                                      show_progress=show_progress)
    report.update(model=str(model), data=str(data), split=split, subsets=subsets, question_filter=question_filter,
                  skipped=len(loaded.skipped), filtered=loaded.filtered)
    label = "/".join(Path(str(model)).parts[-2:])  # runs/demo/rl/model -> rl/model
    write_bench_results(out_dir, report, rows, loaded, f"{bench.name}: {label} ({prompt})")
    return report
