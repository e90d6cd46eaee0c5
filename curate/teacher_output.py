"""Parse a teacher's reply, written to the prompt grid's output contract, into turns, and turn it into our
`conversation` and `mcq` records.

    <question>...</question> [<options>A. ... B. ...</options>] <think>...</think> <answer>...</answer>   (per turn)

Parsing never raises: every departure from the contract (a tag left open, nested or repeated, text outside the tags,
a turn without its answer) is a line in `problems`, which the `tags` filter rule reports.  A reasoning model's
separate `reasoning_content` becomes the first turn's `<think>` when the reply has none of its own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from patho_r1.rewards.parsing import OPTION_LETTERS

_TAG = re.compile(r"<(/?)(question|options|think|answer)\s*>", re.IGNORECASE)
_OPTION_LINE = re.compile(r"^\s*\(?([A-F])\s*[.):]\s*(.+?)\s*$")
_LETTER = re.compile(r"\s*\(?([A-F])(\)|[.:])?\s*(.*)", re.DOTALL)
_ORDER = ("question", "options", "think", "answer")
# One turn exactly as the contract writes it, with no '<' inside a tag's text: most replies are made of these, and
# parse in one match a turn instead of the general walk over every tag.  Anything else takes the general walk.
_PLAIN_TURN = re.compile(r"\s*<question>([^<]*)</question>\s*(?:(<options>)([^<]*)</options>\s*)?"
                         r"<think>([^<]*)</think>\s*<answer>([^<]*)</answer>")
_PLAIN_REPLY = re.compile(rf"(?:{_PLAIN_TURN.pattern})+\s*")


@dataclass(slots=True)
class Turn:
    question: str | None = None
    options: dict[str, str] = field(default_factory=dict)
    think: str | None = None
    answer: str | None = None


@dataclass
class ParsedReply:
    turns: list[Turn]
    problems: list[str]
    think_from_reasoning: bool = False


def parse_reply(response: str, reasoning: str | None = None) -> ParsedReply:
    turns = _plain_turns(response)
    problems: list[str] = []
    if turns is not None and all(t.question and t.think and t.answer for t in turns):
        return ParsedReply(turns, problems)  # the common case: every tag there and filled, nothing to add
    if turns is None:
        turns = _walk_tags(response, problems)
    from_reasoning = False
    if turns and turns[0].think is None and reasoning and reasoning.strip():
        turns[0].think, from_reasoning = reasoning.strip(), True
    for i, turn in enumerate(turns, start=1):
        for tag in ("question", "think", "answer"):
            value = getattr(turn, tag)
            if value is None:
                problems.append(f"turn {i} has no <{tag}>")
            elif not value:
                problems.append(f"turn {i} has an empty <{tag}>")
    if not turns:
        problems.append("no <question>, <think> or <answer> tags")
    return ParsedReply(turns, problems, from_reasoning)


def _plain_turns(response: str) -> list[Turn] | None:
    """The turns of a reply made only of plain turns (what `_walk_tags` would find, with no problems), else None."""
    if not _PLAIN_REPLY.fullmatch(response):
        return None
    turns = []
    # findall's matches lie back to back, as fullmatch found them
    for question, has_options, options, think, answer in _PLAIN_TURN.findall(response):
        turn = Turn(question.strip(), {}, think.strip(), answer.strip())
        if has_options:
            turn.options = parse_options(options.strip())
            if not turn.options:
                return None  # the walk names the problem
        turns.append(turn)
    return turns


def _walk_tags(response: str, problems: list[str]) -> list[Turn]:
    """Any reply: each tag in turn, every departure from the contract a line in `problems`."""
    turns: list[Turn] = []
    open_tag, open_at, last_end = None, 0, 0
    for m in _TAG.finditer(response):
        closing, tag = m.group(1) == "/", m.group(2).lower()
        if open_tag is None:
            outside = response[last_end:m.start()].strip()
            if outside:
                problems.append(f"text outside the tags: {outside[:40]!r}")
            if closing:
                problems.append(f"</{tag}> without <{tag}>")
                last_end = m.end()
                continue
            open_tag, open_at = tag, m.end()
            continue
        if not closing:
            problems.append(f"<{tag}> inside <{open_tag}>")
            continue
        if tag != open_tag:
            problems.append(f"</{tag}> closes <{open_tag}>")
        _place(turns, open_tag, response[open_at:m.start()].strip(), problems)
        open_tag, last_end = None, m.end()
    if open_tag is not None:
        problems.append(f"<{open_tag}> never closed")
    else:
        tail = response[last_end:].strip()
        if tail:
            problems.append(f"text outside the tags: {tail[:40]!r}")
    return turns


def _place(turns: list[Turn], tag: str, text: str, problems: list[str]) -> None:
    """Put a closed tag's text into the current turn; a <question> (or a tag out of order) starts the next turn."""
    turn = turns[-1] if turns else None
    if tag == "question" or turn is None or _filled_after(turn, tag):
        if turn is not None and tag != "question":
            problems.append(f"a second <{tag}> in turn {len(turns)}")
        turn = Turn()
        turns.append(turn)
    if tag == "options":
        turn.options = parse_options(text)
        if not turn.options:
            problems.append(f"turn {len(turns)}: <options> holds no 'A. ...' lines")
    else:
        setattr(turn, tag, text)


def _filled_after(turn: Turn, tag: str) -> bool:
    """True when `tag`, or a tag that comes after it in a turn, is already filled: the reply has moved on."""
    for later in _ORDER[_ORDER.index(tag):]:
        value = turn.options if later == "options" else getattr(turn, later)
        if value:
            return True
    return False


def parse_options(text: str) -> dict[str, str]:
    options = {}
    for line in text.splitlines():
        m = _OPTION_LINE.match(line)
        if m:
            options[m.group(1)] = m.group(2)
    letters = list(options)
    return options if letters == list(OPTION_LETTERS[:len(letters)]) else {}


def answer_letter(answer: str | None) -> str | None:
    """The option letter an MCQ answer gives: 'B', 'B.', '(B)', 'B. Adenocarcinoma'."""
    if not answer:
        return None
    m = _LETTER.fullmatch(answer)
    # a bare letter, or a letter marked by '.', ')' or ':' before any text ('A lymphoma' is a sentence, not 'A')
    return m.group(1) if m and (not m.group(3) or m.group(2)) else None


def mcq_prompt(question: str, options: dict[str, str]) -> str:
    """The VLMEvalKit MCQ layout our MCQRecord.prompt_text uses, so SFT and RL see one layout."""
    return "\n".join([question, *(f"{k}. {v}" for k, v in options.items()), "Answer with the option letter."])


def to_conversation(parsed: ParsedReply, task: str, images: list, system_prompt: str | None = None) -> list[dict]:
    """Messages of our `conversation` kind: the image(s) in the first user turn, one think/answer per reply."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    for i, turn in enumerate(parsed.turns):
        text = turn.question
        answer = turn.answer
        if task == "mcq" and turn.options:
            text = mcq_prompt(turn.question, turn.options)
            answer = answer_letter(turn.answer) or turn.answer
        # every user turn as a list of parts: TRL puts the images before the first user turn whose content is a
        # plain string, so a string second turn would get a second copy of the placeholders
        content = [*({"type": "image"} for _ in (images if i == 0 else ())), {"type": "text", "text": text}]
        messages.append({"role": "user", "content": content})
        messages.append({"role": "assistant", "content": f"<think>{turn.think}</think><answer>{answer}</answer>"})
    return messages
