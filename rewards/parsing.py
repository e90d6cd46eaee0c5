"""The answer format and how to read it: the reasoning system prompt that asks for it, the MCQ option letters, the
text of a completion, the strict `<think>/<answer>` layout, and the final answer.

These are shared by the data schemas, the rewards, the trainers, the evaluators and the VLMEvalKit hook, so that
training and evaluation ask for and read an answer the same way.
"""

from __future__ import annotations

import re
from typing import Any

# Patho-R1's reasoning system prompt: the default for SFT, RL and evaluation.
REASONING_SYSTEM_PROMPT = (
    "You are a pathology expert, your task is to answer question step by step. Use the following format:"
    "<think> Your step-by-step reasoning </think><answer> Your final answer </answer>"
)

# MCQ options are lettered A-F (PathMMU has up to 6 options); VLMEvalKit TSVs use these as column names.
OPTION_LETTERS = "ABCDEF"

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
_TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)

# The whole completion is exactly: optional whitespace, one think block, optional whitespace, one answer block,
# optional whitespace.  Tag counts are checked separately, so nested or repeated tags cannot sneak through `.*?`.
_STRICT_LAYOUT = re.compile(r"\A\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*\Z", re.DOTALL)
# Reading an answer is lenient about the tags' case (`<ANSWER>`); the format reward stays strict.
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_THINK_CLOSE = re.compile(r"</think>", re.IGNORECASE)
_ANY_TAG = re.compile(r"</?(?:think|answer)>", re.IGNORECASE)


def completion_text(completion: Any) -> str:
    """A completion as plain text.

    TRL passes plain strings for standard prompts and `[{"role": "assistant", "content": str}]` for conversational
    ones; content may itself be a list of `{"type": "text", "text": ...}` parts.
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return completion_text(completion.get("content", ""))
    if isinstance(completion, (list, tuple)):
        parts = []
        for item in completion:
            if isinstance(item, dict) and "role" in item:
                if item.get("role") == "assistant":
                    parts.append(completion_text(item.get("content", "")))
            elif isinstance(item, dict):
                if item.get("type", "text") == "text":
                    parts.append(str(item.get("text", "")))
            else:
                parts.append(str(item))
        return "".join(parts)
    return "" if completion is None else str(completion)


def is_strict_format(text: str) -> bool:
    """Patho-R1's format rule: one `<think>...</think>` then one `<answer>...</answer>`, only whitespace outside."""
    if any(text.count(tag) != 1 for tag in _TAGS):
        return False
    return _STRICT_LAYOUT.match(text) is not None


def extract_answer(text: str) -> str | None:
    """Content of the last `<answer>...</answer>` block, stripped; None when there is none."""
    matches = _ANSWER.findall(text)
    if not matches:
        return None
    return matches[-1].strip()


def extract_final_answer(text: str) -> str:
    """What an evaluator should score: the last `<answer>` content, else the text after the last `</think>`,
    else the whole text.  Never returns the raw tags (VLMEvalKit's matcher would mis-read them), and never the
    reasoning: an output cut off inside `<think>` (no `</think>`, no answer) has no final answer, so it is ''
    rather than a trace whose letters VLMEvalKit would credit."""
    answer = extract_answer(text)
    if answer is not None:
        return answer
    closes = list(_THINK_CLOSE.finditer(text))
    if closes:
        return _ANY_TAG.sub("", text[closes[-1].end():]).strip()
    if re.search(r"<think>", text, re.IGNORECASE):
        return ""
    return _ANY_TAG.sub("", text).strip()


def split_thinking(text: str) -> tuple[str, str]:
    """(prediction, thinking): the final answer and the reasoning trace, for evaluators that keep both."""
    closes = list(_THINK_CLOSE.finditer(text))
    if closes:
        head = text[:closes[-1].start()]
    else:  # cut off inside the reasoning: all of it is thinking
        head = text if re.search(r"<think>", text, re.IGNORECASE) else ""
    thinking = re.split(r"<think>", head, maxsplit=1, flags=re.IGNORECASE)[-1].strip()
    return extract_final_answer(text), thinking
