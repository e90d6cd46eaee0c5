"""Rule filters for teacher chain-of-thought: each rule is registered by name, like rewards, and says why it rejects.

    @register_filter("no_hedging")
    def no_hedging(cfg: FilterStage):
        def check(c: Candidate) -> str | None:
            return "hedges" if "I am not sure" in c.response else None
        return check

A rule is a factory: given the stage config it returns a check, `Candidate -> reason | None`.  Batch rules
(`batch=True`) get the list of candidates that every row rule kept and return one reason or None each; near-duplicate
detection is one, so a rejected row never shadows a good one.  Every rule runs on every row, so a rejected row lists
all its reasons, and the report counts each rule on its own.

Built in, in order: tags, truncation, length, repetition, language_mix, answer_consistency, near_duplicate.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from patho_r1.curate.teacher_output import ParsedReply, answer_letter

RowCheck = Callable[["Candidate"], "str | None"]
BatchCheck = Callable[[list["Candidate"]], list["str | None"]]


@dataclass
class FilterRule:
    name: str
    factory: Callable
    batch: bool = False
    doc: str = ""


FILTERS: dict[str, FilterRule] = {}


def register_filter(name: str, *, batch: bool = False):
    def wrap(factory):
        if name in FILTERS:
            raise ValueError(f"filter rule {name!r} is already registered")
        doc = (factory.__doc__ or "").strip().splitlines()
        FILTERS[name] = FilterRule(name, factory, batch, doc[0] if doc else "")
        return factory

    return wrap


@dataclass
class Candidate:
    """One teacher output as the rules see it."""

    row: dict
    parsed: ParsedReply
    response: str
    n_tokens: int

    @property
    def task(self) -> str:
        """The row's task; rows of another pipeline without one are MCQs when they carry options."""
        return self.row.get("task") or ("mcq" if self.row.get("options") else "reasoning")

    @functools.cached_property
    def body(self) -> str:
        """What the student learns from: every think and answer, without the questions."""
        return "\n".join(f"{t.think or ''}\n{t.answer or ''}" for t in self.parsed.turns)

    @functools.cached_property
    def words(self) -> list[str]:
        """The body's lower-cased words (the repetition and near-duplicate rules both read them)."""
        return _WORD.findall(self.body.lower())


# ----------------------------------------------------------------------------------------------------------------------
# Row rules
# ----------------------------------------------------------------------------------------------------------------------

@register_filter("tags")
def tags(cfg):
    """The reply keeps the output contract: question/think/answer per turn, no stray, nested or repeated tags."""
    def check(c: Candidate) -> str | None:
        if c.parsed.problems:
            return c.parsed.problems[0]
        n = len(c.parsed.turns)
        if c.task == "conversation" and not cfg.min_turns <= n <= cfg.max_turns:
            return f"{n} turns (a conversation has {cfg.min_turns}-{cfg.max_turns})"
        if c.task in ("mcq", "description", "reasoning") and n != 1:
            return f"{n} turns (a {c.task} has one)"
        if c.task == "mcq" and not (c.parsed.turns[0].options or c.row.get("options")):
            return "an MCQ without <options>"
        return None

    return check


@register_filter("truncation")
def truncation(cfg):
    """The teacher finished: not cut off by max_tokens, and the reply ends with </answer>."""
    def check(c: Candidate) -> str | None:
        if c.row.get("finish_reason") == "length":
            return "finish_reason length (hit max_tokens)"
        if not c.response.rstrip().lower().endswith("</answer>"):
            return "does not end with </answer>"
        return None

    return check


@register_filter("length")
def length(cfg):
    """Token count within [min_tokens, max_tokens]."""
    def check(c: Candidate) -> str | None:
        if c.n_tokens < cfg.min_tokens:
            return f"{c.n_tokens} tokens < min_tokens {cfg.min_tokens}"
        if c.n_tokens > cfg.max_tokens:
            return f"{c.n_tokens} tokens > max_tokens {cfg.max_tokens}"
        return None

    return check


_WORD = re.compile(r"\w+")
_SENTENCE = re.compile(r"[^.!?\n]+")


@register_filter("repetition")
def repetition(cfg):
    """No degenerate loops: the share of repeated word n-grams, and sentences or lines said again and again."""
    n = cfg.ngram

    def check(c: Candidate) -> str | None:
        words = c.words
        if len(words) >= cfg.min_words_for_ratio:
            total = len(words) - n + 1
            ratio = 1.0 - len(set(zip(*(words[i:] for i in range(n)), strict=False))) / total
            if ratio > cfg.max_ngram_repeat:
                return f"{ratio:.2f} of {n}-grams repeated > {cfg.max_ngram_repeat}"
        for turn in c.parsed.turns:  # a loop repeats within one think or answer; turns may share a phrase
            for text in (turn.think, turn.answer):
                said = [s.strip().lower() for s in _SENTENCE.findall(text or "") if s.count(" ") >= 2]
                if len(said) - len(set(said)) >= cfg.max_sentence_repeats - 1:  # else no sentence can loop
                    sentence, times = Counter(said).most_common(1)[0]
                    if times >= cfg.max_sentence_repeats:
                        return f"a sentence said {times} times: {sentence[:40]!r}"
        return None

    return check


# Scripts that do not belong in English pathology text.  Greek stays allowed (alpha-SMA, beta-catenin, um as mu).
_FOREIGN = re.compile(
    "[\u0400-\u052f"          # Cyrillic
    "\u0590-\u05ff"           # Hebrew
    "\u0600-\u06ff\u0750-\u077f"  # Arabic
    "\u0900-\u0dff"           # Devanagari .. Sinhala
    "\u0e00-\u0e7f"           # Thai
    "\u1100-\u11ff\u3130-\u318f\uac00-\ud7af"  # Hangul
    "\u3040-\u30ff\u31f0-\u31ff"  # Hiragana, Katakana
    "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"  # CJK ideographs
    "\u3000-\u303f\uff00-\uffef"  # CJK punctuation, full-width forms
    "]+")


def _script(ch: str) -> str:
    name = unicodedata.name(ch, "UNKNOWN")
    for script in ("CJK", "HIRAGANA", "KATAKANA", "HANGUL", "CYRILLIC", "ARABIC", "HEBREW", "THAI", "DEVANAGARI",
                   "FULLWIDTH", "IDEOGRAPHIC"):
        if script in name:
            return "CJK" if script in ("IDEOGRAPHIC", "FULLWIDTH") else script
    return name.split()[0]


@register_filter("language_mix")
def language_mix(cfg):
    """No foreign-script characters in English text (a CJK term, a Cyrillic letter), by Unicode script."""
    def check(c: Candidate) -> str | None:
        runs = _FOREIGN.findall(c.response)
        n = sum(map(len, runs))
        if n > cfg.max_foreign_chars:
            scripts = sorted({_script(ch) for run in runs for ch in run})
            return f"{n} {'/'.join(scripts)} character(s), e.g. {runs[0][:12]!r}"
        return None

    return check


def normalize(text: str) -> str:
    return " ".join(_WORD.findall(text.lower().replace("_", " ")))


@register_filter("answer_consistency")
def answer_consistency(cfg):
    """An MCQ answer is one of its options and equals the gold; other answers name the gold diagnosis."""
    def check(c: Candidate) -> str | None:
        gold = c.row.get("gold")
        if not c.parsed.turns:
            return None  # the tags rule says why
        turn = c.parsed.turns[-1] if c.task != "mcq" else c.parsed.turns[0]
        if c.task == "mcq":
            options = turn.options or c.row.get("options") or {}
            letter = answer_letter(turn.answer)
            if letter is None:
                return f"MCQ answer {str(turn.answer)[:20]!r} is not an option letter"
            if letter not in options:
                return f"MCQ answer {letter} is not among the options {''.join(options)}"
            if gold is None:
                return None
            if len(str(gold)) == 1 and str(gold).upper() in "ABCDEF":
                return None if letter == str(gold).upper() else f"MCQ answer {letter} != gold {gold}"
            chosen, target = normalize(options[letter]), normalize(str(gold))
            if target and (target == chosen or f" {target} " in f" {chosen} "):
                return None
            return f"MCQ answer {letter} ({options[letter][:30]!r}) is not the gold {str(gold)[:30]!r}"
        if gold is None or turn.answer is None:
            return None
        if f" {normalize(str(gold))} " not in f" {normalize(turn.answer)} ":
            return f"the answer does not name the gold {str(gold)[:30]!r}"
        return None

    return check


# ----------------------------------------------------------------------------------------------------------------------
# Batch rules
# ----------------------------------------------------------------------------------------------------------------------

@register_filter("near_duplicate", batch=True)
def near_duplicate(cfg):
    """No near-copies of an earlier kept output (MinHash LSH over the thinks and answers): a teacher that repeats
    itself teaches one sample many times."""
    import numpy as np

    from patho_r1.curate.minhash import MinHashSpec, WordHashes, band_keys, word_signatures

    spec = MinHashSpec(cfg.near_duplicate_threshold, cfg.num_perm, cfg.shingle)
    hashes = WordHashes()
    seen: dict[tuple[int, int], int] = {}  # (band, key) -> index of the first kept output with it
    kept_ids: list[str] = []
    kept_sigs: list[np.ndarray] = []

    def check(batch: list[Candidate]) -> list[str | None]:
        if not batch:
            return []
        sigs = word_signatures([hashes(c.words) for c in batch], spec.num_perm, spec.shingle)
        keys = band_keys(sigs, *spec.bands)
        out: list[str | None] = []
        for c, sig, row_keys in zip(batch, sigs, keys.tolist(), strict=True):
            # a shared band makes a candidate; the signatures' agreement decides (LSH alone lets some through)
            hits = {seen[(b, k)] for b, k in enumerate(row_keys) if (b, k) in seen}
            match = next((i for i in sorted(hits) if (kept_sigs[i] == sig).mean() >= spec.threshold), None)
            if match is not None:
                out.append(f"near-duplicate of {kept_ids[match]}")
                continue
            index = len(kept_ids)
            kept_ids.append(str(c.row.get("id")))
            kept_sigs.append(sig)
            for b, k in enumerate(row_keys):
                seen.setdefault((b, k), index)
            out.append(None)
        return out

    return check


BUILTIN_ORDER = ("tags", "truncation", "length", "repetition", "language_mix", "answer_consistency", "near_duplicate")
