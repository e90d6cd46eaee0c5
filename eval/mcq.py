"""The built-in MCQ / Yes-No scorer: VLMEvalKit TSVs or our MCQ JSONL in, accuracy tables out.

    patho-r1 eval mcq --model CKPT --tsv eval/PathoSynth_MCQ.tsv --out runs/eval

Generation uses our rollout engines (HF on CPU, vLLM on GPU).  Each response is reduced to its final answer
(last `<answer>` content, else the text after `</think>`) and judged two ways:

* `accuracy`: VLMEvalKit's exact-matching rules on the final answer (comparable with VLMEvalKit leaderboards);
* `strict_accuracy`: the RL accuracy reward (the `<answer>` content must be exactly the gold letter);
* open questions: an LLM judge (`patho_r1.eval.judge`), required for them.

plus the share of format-valid responses and the mean response length in tokens.
"""

from __future__ import annotations

import csv
import json
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from patho_r1.data import MCQRecord, iter_records, iter_vlmeval_tsv, load_image
from patho_r1.eval.generation import ChatRequest, Generator, SamplingConfig
from patho_r1.eval.matching import exact_match_mcq, vlmeval_yesno_correct
from patho_r1.rewards.accuracy import score_mcq, score_yesno
from patho_r1.rewards.parsing import REASONING_SYSTEM_PROMPT, extract_answer, extract_final_answer, is_strict_format


@dataclass
class MCQRow:
    id: str
    category: str | None
    answer: str
    answer_type: str
    prediction: str
    response: str
    correct: bool
    strict_correct: bool
    format_ok: bool
    response_tokens: int


@dataclass
class MCQReport:
    n: int
    accuracy: float
    strict_accuracy: float
    format_rate: float
    mean_response_tokens: float
    chance: float  # the best rule that never looks at the image (`blind_chance`)
    uniform_chance: float = 0.0  # one over the number of options
    yesno_mode: str = "patho"  # how yes/no answers were judged: `patho` (semantic) or `vlmeval` (VLMEvalKit's verdict)
    per_category: dict[str, dict[str, float]] = field(default_factory=dict)

    def markdown(self, title: str = "MCQ evaluation") -> str:
        lines = [f"### {title}", "", "| metric | value |", "|---|---|"]
        for k in ("n", "accuracy", "strict_accuracy", "format_rate", "mean_response_tokens", "chance", "uniform_chance",
                  "yesno_mode"):
            v = getattr(self, k)
            lines.append(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |")
        if self.per_category:
            lines += ["", "| category | n | accuracy | format_rate |", "|---|---|---|---|"]
            for cat, m in sorted(self.per_category.items()):
                lines.append(f"| {cat} | {int(m['n'])} | {m['accuracy']:.4f} | {m['format_rate']:.4f} |")
        return "\n".join(lines) + "\n"


def load_eval_records(path: str | Path, limit: int | None = None) -> list[MCQRecord]:
    path = Path(path)
    records = list(iter_vlmeval_tsv(path)) if path.suffix == ".tsv" else list(iter_records(path, "mcq"))
    return records[:limit] if limit else records


def build_request(record: MCQRecord, system_prompt: str | None = REASONING_SYSTEM_PROMPT) -> ChatRequest:
    images = [load_image(ref) for ref in record.images]
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": record.prompt_text()}]
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + \
        [{"role": "user", "content": content}]
    return ChatRequest(messages=messages, images=images)


def judge(record: MCQRecord, response: str, n_tokens: int, llm_judge=None, yesno_mode: str = "patho",
          verdict: bool | None = None) -> MCQRow:
    """Judge one response: VLMEvalKit exact matching and the strict reward for MCQ, yes/no matching, or the LLM
    judge for open questions (an error when none is configured: an open set is never silently scored 0); `verdict`
    is the judge's answer when it was asked already, for many rows at once (`evaluate_mcq`).

    Yes/no answers: `patho` (default) reads sentences, true/false, markdown and any case (`score_yesno`);
    `vlmeval` reproduces VLMEvalKit's verdict exactly, case-sensitive comparison included (`vlmeval_yesno_correct`).
    """
    prediction = extract_final_answer(response)
    if record.answer_type == "mcq":
        correct = exact_match_mcq(prediction, record.options, record.answer)
        strict = score_mcq(extract_answer(response), record.answer, "strict") == 1.0
    elif record.answer_type == "yesno" and yesno_mode == "vlmeval":
        correct = vlmeval_yesno_correct(prediction, record.answer)
        strict = correct and extract_answer(response) is not None
    elif record.answer_type == "yesno":
        correct = score_yesno(prediction, record.answer) == 1.0
        strict = score_yesno(extract_answer(response), record.answer) == 1.0
    elif verdict is not None:
        correct = strict = verdict
    else:
        if llm_judge is None:
            from patho_r1.eval.judge import LLMJudge

            llm_judge = LLMJudge.from_env()
        correct = strict = llm_judge.judge(record.question, record.answer, prediction)
    return MCQRow(id=str(record.id), category=record.category, answer=record.answer, answer_type=record.answer_type,
                  prediction=prediction, response=response, correct=bool(correct), strict_correct=bool(strict),
                  format_ok=is_strict_format(response), response_tokens=n_tokens)


def blind_chance(records: list[MCQRecord]) -> float:
    """The accuracy of the best simple rule that never looks at the image: always the commonest answer letter
    (yes/no: the commonest answer), or always the commonest correct option text when it is listed (a class prior).
    On option lists in a fixed class order this beats one-over-the-options: that is the honest chance line."""
    if not records:
        return 0.0
    golds = Counter(r.answer.strip().lower() if r.answer_type == "yesno" else r.answer for r in records)
    by_letter = golds.most_common(1)[0][1] / len(records)
    texts = Counter(r.options[r.answer] for r in records if r.answer_type == "mcq" and r.answer in r.options)
    if not texts:
        return by_letter
    prior_text, letter = texts.most_common(1)[0][0], golds.most_common(1)[0][0]
    hits = 0
    for r in records:
        guess = next((k for k, v in r.options.items() if v == prior_text), letter)
        hits += guess == r.answer
    return max(by_letter, hits / len(records))


def summarise(records: list[MCQRecord], rows: list[MCQRow], yesno_mode: str = "patho") -> MCQReport:
    n = len(rows)
    if n == 0:
        raise ValueError("no rows to score")
    uniform = sum({"mcq": 1.0 / max(len(r.options), 1), "yesno": 0.5}.get(r.answer_type, 0.0) for r in records) / n
    by_cat: dict[str, list[MCQRow]] = defaultdict(list)
    for row in rows:
        by_cat[row.category or "all"].append(row)
    per_category = {c: {"n": float(len(rs)), "accuracy": sum(r.correct for r in rs) / len(rs),
                        "format_rate": sum(r.format_ok for r in rs) / len(rs)} for c, rs in by_cat.items()}
    return MCQReport(
        n=n,
        accuracy=sum(r.correct for r in rows) / n,
        strict_accuracy=sum(r.strict_correct for r in rows) / n,
        format_rate=sum(r.format_ok for r in rows) / n,
        mean_response_tokens=sum(r.response_tokens for r in rows) / n,
        chance=blind_chance(records),
        uniform_chance=uniform,
        yesno_mode=yesno_mode,
        per_category=per_category,
    )


def response_length(tokenizer=None):
    """How a response's length is counted: tokens when the tokenizer is at hand (the HF engine), else words."""
    if tokenizer is None:
        return lambda text: len(text.split())
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def judge_open_answers(records: list[MCQRecord], responses: list[str], llm_judge) -> dict[int, bool]:
    """The judge's verdict on every open answer (row index -> correct), asked in one concurrent, cached batch rather
    than one request at a time; {} without a judge or without open rows."""
    open_idx = [i for i, r in enumerate(records) if r.answer_type not in ("mcq", "yesno")]
    if not open_idx or llm_judge is None:
        return {}
    asked = llm_judge.verdicts([(records[i].question, records[i].answer, extract_final_answer(responses[i]))
                                for i in open_idx])
    return {i: v.correct for i, v in zip(open_idx, asked, strict=True)}


def evaluate_mcq(generator: Generator, records: list[MCQRecord], sampling: SamplingConfig | None = None,
                 system_prompt: str | None = REASONING_SYSTEM_PROMPT, tokenizer=None, llm_judge=None,
                 yesno_mode: str = "patho") -> tuple[MCQReport, list[MCQRow]]:
    if yesno_mode not in ("patho", "vlmeval"):
        raise ValueError(f"yesno_mode must be 'patho' or 'vlmeval', got {yesno_mode!r}")
    sampling = sampling or SamplingConfig()
    if llm_judge is None and any(r.answer_type not in ("mcq", "yesno") for r in records):
        from patho_r1.eval.judge import LLMJudge

        llm_judge = LLMJudge.from_env()  # fail before generating, not after
    responses = generator.generate([build_request(r, system_prompt) for r in records], sampling)
    count = response_length(tokenizer)
    verdicts = judge_open_answers(records, responses, llm_judge)
    rows = [judge(rec, resp, count(resp), llm_judge, yesno_mode, verdicts.get(i))
            for i, (rec, resp) in enumerate(zip(records, responses, strict=True))]
    return summarise(records, rows, yesno_mode), rows


def write_results(out_dir: str | Path, report: MCQReport, rows: Iterable[MCQRow], title: str = "MCQ evaluation"):
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = list(rows)
    (out / "results.json").write_text(json.dumps({"report": asdict(report), "rows": [asdict(r) for r in rows]},
                                                 indent=2) + "\n")
    with (out / "predictions.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(asdict(rows[0]).keys()))
        writer.writeheader()
        for r in rows:
            writer.writerow(asdict(r))
    (out / "results.md").write_text(report.markdown(title))
    return out
