"""Scoring: responses in, rows and a report out.  The one path every accuracy in the project comes from: `eval bench`
(after generating), `eval score` (predictions made elsewhere), the recipe's `eval` phase and `evaluate_benchmark`.

Each row is scored by the benchmark's official rule and by our corrected rule (`patho_r1.eval.rules`); the report
carries both columns, and the headline `accuracy` is the chosen `scorer`'s (official by default).  For MCQ sets whose
gold options name classes (2 to `MAX_CLASSES` distinct gold texts, two items a class or more: a tissue-classification
set, not PathMMU's free-text options) it adds the
per-class accuracy, balanced accuracy and the confusion matrix of gold class against the answered option.  A
benchmark item with no prediction (`None`) is counted in `missing` and listed, never scored as wrong or dropped
silently.
"""

from __future__ import annotations

import json
import random
import warnings
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from patho_r1.data import MCQRecord
from patho_r1.eval.matching import exact_match_mcq
from patho_r1.eval.mcq import blind_chance, judge_open_answers, uniform_chance
from patho_r1.eval.rules import SCORERS, RuleVerdict
from patho_r1.eval.stats import wilson_interval
from patho_r1.rewards.accuracy import score_mcq, score_yesno
from patho_r1.rewards.parsing import extract_answer, extract_final_answer, is_strict_format

if TYPE_CHECKING:
    from patho_r1.eval.benchmarks import Benchmark

MAX_CLASSES = 30  # more distinct gold option texts than this is a knowledge set (PathMMU), not a classification set
NO_ANSWER = "(none)"  # the confusion matrix's column for an answer that named no option
OPEN_METRICS = ("recall", "f1", "precision", "exact_match")


@dataclass
class BenchRow:
    id: str
    groups: dict[str, str | None]
    question: str
    answer_type: str
    answer: str
    options: dict[str, str]
    prediction: str
    response: str
    correct: bool | None  # the chosen scorer's verdict; an open answer's is the judge's (None with no judge)
    format_ok: bool
    response_tokens: int
    choice: str | None = None  # the option letter or yes/no the chosen scorer read
    # {"official": {...}, "corrected": {...}, "strict_correct", ...; open rows: "judge_correct", the LLM judge's}
    scores: dict = field(default_factory=dict)


def _rule_scores(v: RuleVerdict) -> dict:
    return {"correct": v.correct, "choice": v.choice, **({"guessed": True} if v.guessed else {}), **v.metrics}


def score_row(bench: Benchmark, record: MCQRecord, response: str, n_tokens: int = 0, rng: random.Random | None = None,
              *, scorer: str = "official", judge_correct: bool | None = None) -> BenchRow:
    """One response, by both rules.  `rng` is the official PathMMU rule's random stream: one per run, shared by the
    rows in order (`score_responses` keeps it); without one, a fresh stream seeded 42."""
    if scorer not in SCORERS:
        raise ValueError(f"scorer must be one of {SCORERS}, got {scorer!r}")
    rng = rng if rng is not None else random.Random(42)
    prediction = extract_final_answer(response)
    official, corrected = bench.rules.official(record, prediction, rng), bench.rules.corrected(record, prediction)
    chosen = official if scorer == "official" else corrected
    scores: dict = {"official": _rule_scores(official), "corrected": _rule_scores(corrected)}
    if record.answer_type == "mcq":
        scores["strict_correct"] = score_mcq(extract_answer(response), record.answer, "strict") == 1.0
        scores["vlmeval_correct"] = exact_match_mcq(prediction, record.options, record.answer)
    elif record.answer_type == "yesno":
        scores["strict_correct"] = score_yesno(extract_answer(response), record.answer) == 1.0
    else:  # the headline rule's token metrics stand at the top too, as the open numbers of the report do
        scores.update({m: chosen.metrics[m] for m in OPEN_METRICS}, judge_correct=judge_correct)
    correct = chosen.correct if record.answer_type in ("mcq", "yesno") else judge_correct
    return BenchRow(id=str(record.id), groups={g: record_field(record, g) for g in bench.groups},
                    question=record.question, answer_type=record.answer_type, answer=record.answer,
                    options=dict(record.options), prediction=prediction, response=response, correct=correct,
                    format_ok=is_strict_format(response), response_tokens=n_tokens, choice=chosen.choice,
                    scores=scores)


def record_field(record: MCQRecord, name: str) -> str | None:
    """A record's field as text (None when absent): what the tables group by."""
    value = getattr(record, name, None)
    return None if value is None else str(value)


def score_responses(bench: Benchmark, records: list[MCQRecord], responses: list[str | None], *,
                    scorer: str = "official", count_tokens: Callable[[str], int] | None = None,
                    token_counts: list[int | None] | None = None, llm_judge=None,
                    seed: int = 42) -> tuple[dict, list[BenchRow]]:
    """Score every record that has a response (None: missing, counted); returns (report, rows).  Token counts come
    from `token_counts` where known (a predictions file that kept them), else `count_tokens`, else words."""
    answered = [i for i, resp in enumerate(responses) if resp is not None]
    count = count_tokens or (lambda text: len(text.split()))
    verdicts = judge_open_answers([records[i] for i in answered], [responses[i] for i in answered], llm_judge)
    rng = random.Random(seed)  # PathMMU's module does `random.seed(42)` once; its guesses follow in row order
    rows = []
    for k, i in enumerate(answered):
        known = token_counts[i] if token_counts else None
        n_tokens = known if known is not None else count(responses[i])
        rows.append(score_row(bench, records[i], responses[i], n_tokens, rng, scorer=scorer,
                              judge_correct=verdicts.get(k)))
    missing = [str(records[i].id) for i, resp in enumerate(responses) if resp is None]
    if not rows:
        raise ValueError(f"{bench.name}: none of the {len(records)} items has a prediction")
    report = summarise(bench, rows, scorer)
    scored = [records[i] for i in answered]
    report.update(missing=len(missing), missing_ids=missing[:20], seed=seed, chance=round(blind_chance(scored), 4),
                  uniform_chance=round(uniform_chance(scored), 4), judge_model=getattr(llm_judge, "model", None))
    return report, rows


# ----------------------------------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------------------------------


def _accuracy(hits: list[bool]) -> dict:
    k, n = sum(hits), len(hits)
    lo, hi = wilson_interval(k, n)
    return {"n": n, "accuracy": round(k / n, 4) if n else None, "ci95": [round(lo, 4), round(hi, 4)]}


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def _closed_part(rows: list[BenchRow]) -> dict:
    """A right-or-wrong part (MCQ or yes/no): the chosen scorer's accuracy, then each rule's."""
    return {**_accuracy([bool(r.correct) for r in rows]),
            **{s: _accuracy([bool(r.scores[s]["correct"]) for r in rows]) for s in SCORERS},
            "strict_accuracy": _mean([r.scores["strict_correct"] for r in rows])}


def _open_metrics(rows: list[BenchRow], scorer: str) -> dict:
    return {m: _mean([r.scores[scorer][m] for r in rows]) for m in OPEN_METRICS}


def summarise(bench: Benchmark, rows: list[BenchRow], scorer: str = "official") -> dict:
    """The benchmark's numbers: overall, per part (MCQ, closed, open), per class, and per group (PathMMU: per subset
    and split, as its own table)."""
    mcq = [r for r in rows if r.answer_type == "mcq"]
    closed = [r for r in rows if r.answer_type == "yesno"]
    opened = [r for r in rows if r.answer_type not in ("mcq", "yesno")]
    decided = [bool(r.correct) for r in rows if r.correct is not None]
    strict = [r.scores["strict_correct"] for r in rows if "strict_correct" in r.scores]
    report: dict = {"benchmark": bench.name, "scorer": scorer, "official_rule": bench.rules.source, "n": len(rows),
                    "overall": _accuracy(decided) if decided else None,
                    **{s: _accuracy(_decided_by(rows, s)) if decided else None for s in SCORERS},
                    "strict_accuracy": _mean(strict), "format_rate": _mean([r.format_ok for r in rows]),
                    "mean_response_tokens": _mean([r.response_tokens for r in rows])}
    if mcq:
        report["mcq"] = {**_closed_part(mcq), "vlmeval_accuracy": _mean([r.scores["vlmeval_correct"] for r in mcq]),
                         "guessed": sum(bool(r.scores["official"].get("guessed")) for r in mcq),
                         "unread": {s: sum(r.scores[s]["choice"] is None or bool(r.scores[s].get("guessed"))
                                           for r in mcq) for s in SCORERS}}
        classes = class_table(mcq)
        if classes:
            report["classes"] = classes
    if closed:
        report["closed"] = _closed_part(closed)
    if opened:
        judged = [bool(r.correct) for r in opened if r.correct is not None]
        report["open"] = {"n": len(opened), **_open_metrics(opened, scorer),
                          **{s: _open_metrics(opened, s) for s in SCORERS},
                          "judge_accuracy": _accuracy(judged) if judged else None}
    report["groups"] = {}
    for group in bench.groups:
        by_value: dict[str, list[BenchRow]] = defaultdict(list)
        for r in rows:
            by_value[r.groups[group] or "none"].append(r)
        report["groups"][group] = {v: _group_numbers(rs, scorer) for v, rs in sorted(by_value.items())}
    if len(bench.groups) == 2:  # a cross table: PathMMU reports accuracy per subset within each split
        across, down = bench.groups
        cells: dict[str, dict[str, list[BenchRow]]] = defaultdict(lambda: defaultdict(list))
        for r in rows:
            cells[r.groups[down] or "none"][r.groups[across] or "none"].append(r)
        report["cross"] = {"rows": down, "columns": across,
                           "cells": {d: {a: _group_numbers(rs, scorer) for a, rs in sorted(c.items())}
                                     for d, c in sorted(cells.items())}}
    return report


def _decided_by(rows: list[BenchRow], rule: str) -> list[bool]:
    """Every verdict by one rule: right-or-wrong rows by it, open rows by the judge (the same for both rules)."""
    return [bool(r.scores[rule]["correct"]) if r.answer_type in ("mcq", "yesno") else bool(r.correct)
            for r in rows if r.answer_type in ("mcq", "yesno") or r.correct is not None]


def _group_numbers(rows: list[BenchRow], scorer: str) -> dict:
    """One group's numbers: MCQ accuracy; or, for VQA, closed accuracy, open recall and (judged) open accuracy."""
    mcq = [bool(r.correct) for r in rows if r.answer_type == "mcq"]
    if mcq:
        return _accuracy(mcq)
    closed = [bool(r.correct) for r in rows if r.answer_type == "yesno"]
    opened = [r for r in rows if r.answer_type not in ("mcq", "yesno")]
    judged = [bool(r.correct) for r in opened if r.correct is not None]
    return {"closed": _accuracy(closed) if closed else None, "open_n": len(opened),
            "open_recall": _mean([r.scores[scorer]["recall"] for r in opened]),
            "open_judge_accuracy": _accuracy(judged) if judged else None}


def class_table(rows: list[BenchRow]) -> dict | None:
    """Per-class results of an MCQ set whose gold options name classes: each class's accuracy (the chosen rule's),
    the balanced accuracy (their mean: scikit-learn's `balanced_accuracy_score`) and the confusion matrix, gold class
    by row, answered option's text by column (`(none)`: no option read).  None for one class, for more than
    `MAX_CLASSES` (free-text options, where a class means nothing) and for fewer than two items a class on average
    (a handful of knowledge questions is not a classification set)."""
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix

    gold = gold_classes(rows)
    if gold is None:
        return None
    classes = sorted(set(gold))
    answered = []
    for r, g in zip(rows, gold, strict=True):
        text = _label(r.options[r.choice]) if r.choice in r.options else NO_ANSWER
        # the verdict rules the cell: a right answer sits on the diagonal even where the rule matched it by a
        # cut or duplicated text (PathMMU), and a wrong one never does
        answered.append(g if r.correct else (text if text != g else NO_ANSWER))
    columns = classes + sorted(set(answered) - set(classes))
    with warnings.catch_warnings():  # answered labels outside the gold classes are expected, not a problem
        warnings.simplefilter("ignore")
        balanced = float(balanced_accuracy_score(gold, answered))
    matrix = confusion_matrix(gold, answered, labels=columns)[: len(classes)]
    per_class = {c: _accuracy([a == c for g, a in zip(gold, answered, strict=True) if g == c]) for c in classes}
    return {"balanced_accuracy": round(balanced, 4), "per_class": per_class,
            "confusion": {"rows": classes, "columns": columns, "matrix": matrix.tolist()}}


def _label(text: str) -> str:
    return " ".join(text.lower().split())


def gold_classes(rows: list[BenchRow]) -> list[str] | None:
    """Each row's gold class (its gold option's text, normalised) when the rows are a classification set: 2 to
    `MAX_CLASSES` classes and at least two items a class on average; else None (free-text options, yes/no items, a
    handful of knowledge questions)."""
    if not all(r.answer in r.options for r in rows):
        return None
    gold = [_label(r.options[r.answer]) for r in rows]
    n_classes = len(set(gold))
    return gold if 2 <= n_classes <= MAX_CLASSES and len(rows) >= 2 * n_classes else None


# ----------------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------------


def markdown(report: dict, title: str) -> str:
    """The benchmark's tables, each accuracy with n and its 95% interval, official and corrected side by side."""
    def cell(m: dict | None) -> str:
        if not m or m.get("accuracy") is None:
            return "-"
        return f"{m['accuracy']:.3f} [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}] (n={m['n']})"

    def number(value) -> str:
        return "-" if value is None else f"{value:.3f}"

    lines = [f"### {title}", "", f"scorer: `{report['scorer']}` (official rule: {report['official_rule']}); prompt: "
             f"`{report.get('prompt') or 'not recorded'}`; format rate {number(report['format_rate'])}, mean "
             f"response tokens {report['mean_response_tokens']:.1f}", ""]
    if report.get("missing"):
        lines += [f"**{report['missing']} items have no prediction** (not scored; listed in missing.jsonl)", ""]
    for part, label in (("mcq", "MCQ accuracy"), ("closed", "closed (yes/no) accuracy")):
        if part in report:
            m = report[part]
            lines += ["| metric | official | corrected |", "|---|---|---|",
                      f"| {label} | {cell(m['official'])} | {cell(m['corrected'])} |",
                      f"| strict (the answer tag holds exactly the gold) | {number(m['strict_accuracy'])} | |"]
            if part == "mcq":
                guessed = " (each scored by a random letter, as upstream)" if m["guessed"] else ""
                lines += [f"| VLMEvalKit exact matching | {number(m['vlmeval_accuracy'])} | |",
                          f"| no option read | {m['unread']['official']}{guessed} | {m['unread']['corrected']} |"]
            lines.append("")
    if "open" in report:
        o = report["open"]
        lines += [f"| open (n={o['n']}) | official | corrected |", "|---|---|---|"]
        lines += [f"| token {m.replace('_', ' ')} | {number(o['official'][m])} | {number(o['corrected'][m])} |"
                  for m in OPEN_METRICS]
        judged = cell(o["judge_accuracy"]) if o["judge_accuracy"] else "not run (no judge)"
        lines += [f"| judge accuracy | {judged} | |", ""]
    if "classes" in report:
        c = report["classes"]
        lines += [f"Per class ({report['scorer']} rule): balanced accuracy {c['balanced_accuracy']:.3f}", "",
                  "| class | accuracy |", "|---|---|"]
        lines += [f"| {k} | {cell(m)} |" for k, m in c["per_class"].items()]
        conf = c["confusion"]
        lines += ["", "Confusion (rows: gold class; columns: the option answered)", "",
                  "| gold \\ answered | " + " | ".join(conf["columns"]) + " |",
                  "|---" * (len(conf["columns"]) + 1) + "|"]
        lines += [f"| {g} | " + " | ".join(str(n) for n in row) + " |"
                  for g, row in zip(conf["rows"], conf["matrix"], strict=True)]
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
            lines += [f"| {v} | {cell(m['closed'])} | {m['open_n']} | {number(m['open_recall'])} | "
                      f"{cell(m['open_judge_accuracy'])} |" for v, m in values.items()]
        lines.append("")
    return "\n".join(lines)


def write_results(out_dir: str | Path, report: dict, rows: list[BenchRow], title: str, *,
                  skipped: list[dict] = (), missing: list[str] = ()) -> Path:
    """results.json (the report), predictions.jsonl (every row), skipped.jsonl (bad benchmark rows), missing.jsonl
    (items with no prediction), results.md; each written whole under a temporary name and then renamed, so a killed
    run leaves the previous results, never half a file."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    notes = f"\n{len(skipped)} bad rows skipped (skipped.jsonl)\n" if skipped else ""
    files = {
        "results.json": json.dumps({"report": report}, indent=2) + "\n",
        "predictions.jsonl": "".join(json.dumps(asdict(r)) + "\n" for r in rows),
        "skipped.jsonl": "".join(json.dumps(s) + "\n" for s in skipped),
        "missing.jsonl": "".join(json.dumps({"id": i}) + "\n" for i in missing),
        "results.md": markdown(report, title) + notes,
    }
    for name, text in files.items():
        tmp = out / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out / name)
    return out

