"""What every benchmark shares before scoring: the chat request for a record, how a response's length is counted,
the LLM judge's verdicts on open answers (asked in one batch), and the image-blind chance line.

Scoring itself is `patho_r1.eval.scoring`; the benchmarks, our own MCQ sets (`mcq`) among them, are
`patho_r1.eval.benchmarks`.
"""

from __future__ import annotations

from collections import Counter

from patho_r1.data import MCQRecord, load_image
from patho_r1.eval.generation import ChatRequest
from patho_r1.rewards.parsing import REASONING_SYSTEM_PROMPT, extract_final_answer


def build_request(record: MCQRecord, system_prompt: str | None = REASONING_SYSTEM_PROMPT) -> ChatRequest:
    images = [load_image(ref) for ref in record.images]
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": record.prompt_text()}]
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + \
        [{"role": "user", "content": content}]
    return ChatRequest(messages=messages, images=images)


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


def uniform_chance(records: list[MCQRecord]) -> float:
    """One over the number of options (yes/no: one half; open: nothing), averaged over the items."""
    per_item = {"yesno": lambda r: 0.5, "mcq": lambda r: 1.0 / max(len(r.options), 1)}
    return sum(per_item.get(r.answer_type, lambda r: 0.0)(r) for r in records) / len(records) if records else 0.0
