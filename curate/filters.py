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
from dataclasses import dataclass, field

from patho_r1.curate.chunk_text import SENTENCE, WORD, ChunkText
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
    """One teacher output as the rules see it.  `text` holds the word statistics of the chunk it was read in
    (`candidates` builds one for many rows); a candidate made on its own gets a chunk of one."""

    row: dict
    parsed: ParsedReply
    response: str
    n_tokens: int
    text: ChunkText | None = None
    index: int = 0  # this row's place in `text`
    task: str = field(init=False)  # the row's task; rows of another pipeline without one: MCQs when they carry options

    def __post_init__(self):
        if self.text is None:
            self.text, self.index = _chunk_text([self.parsed], [self.response]), 0
        self.task = self.row.get("task") or ("mcq" if self.row.get("options") else "reasoning")

    @functools.cached_property
    def body(self) -> str:
        """What the student learns from: every think and answer, without the questions."""
        return "\n".join(_body_parts(self.parsed))

    @functools.cached_property
    def words(self) -> list[str]:
        """The body's lower-cased words (`text.word_hashes` holds their hashes, for the whole chunk at once)."""
        return WORD.findall(self.body.lower())

    @property
    def word_hashes(self):
        return self.text.word_hashes(self.index)


def _body_parts(parsed: ParsedReply) -> list[str]:
    """Each think and answer, in order: the texts a loop is counted within."""
    return [s for t in parsed.turns for s in (t.think or "", t.answer or "")]


def _chunk_text(parsed: list[ParsedReply], responses: list[str]) -> ChunkText:
    """Bodies: each think and answer; extras: the questions (or the whole reply, when it has no turns)."""
    return ChunkText([_body_parts(p) for p in parsed],
                     [" ".join(t.question or "" for t in p.turns) if p.turns else r
                      for p, r in zip(parsed, responses, strict=True)])


def candidates(rows: list[dict], parsed: list[ParsedReply], n_tokens: list[int] | None = None) -> list[Candidate]:
    """Candidates for a chunk of rows, sharing one `ChunkText`; `n_tokens` (a tokenizer's counts) defaults to the
    words-and-punctuation count of each row's questions, thinks and answers."""
    text = _chunk_text(parsed, [row["response"] for row in rows])
    counts = text.tokens.tolist() if n_tokens is None else n_tokens
    return [Candidate(row, p, row["response"], n, text, i)
            for i, (row, p, n) in enumerate(zip(rows, parsed, counts, strict=True))]


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
        if c.response.rstrip()[-9:].lower() != "</answer>":
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


@register_filter("repetition")
def repetition(cfg):
    """No degenerate loops: the share of repeated word n-grams, and sentences or lines said again and again."""
    n = cfg.ngram

    def check(c: Candidate) -> str | None:
        # the chunk's counts find the rows that may fail (they can only overcount repeats); the words decide
        text, i = c.text, c.index
        distinct, total = text.distinct_ngrams(n)
        if text.n_words(i) >= cfg.min_words_for_ratio and total[i] > 0 \
                and 1.0 - distinct[i] / total[i] > cfg.max_ngram_repeat:
            words = c.words
            ratio = 1.0 - len(set(zip(*(words[k:] for k in range(n)), strict=False))) / int(total[i])
            if ratio > cfg.max_ngram_repeat:
                return f"{ratio:.2f} of {n}-grams repeated > {cfg.max_ngram_repeat}"
        if not text.may_repeat_sentence(cfg.max_sentence_repeats)[i]:
            return None
        for turn in c.parsed.turns:  # a loop repeats within one think or answer; turns may share a phrase
            for part in (turn.think, turn.answer):
                said = [s.strip().lower() for s in SENTENCE.findall(part or "") if s.count(" ") >= 2]
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
        if c.response.isascii():  # no foreign script in it; the common case, at C speed
            return None
        runs = _FOREIGN.findall(c.response)
        n = sum(map(len, runs))
        if n > cfg.max_foreign_chars:
            scripts = sorted({_script(ch) for run in runs for ch in run})
            return f"{n} {'/'.join(scripts)} character(s), e.g. {runs[0][:12]!r}"
        return None

    return check


def normalize(text: str) -> str:
    return " ".join(WORD.findall(text.lower().replace("_", " ")))


_normalized_gold = functools.lru_cache(maxsize=1 << 16)(normalize)  # a few thousand diagnoses, asked every row


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
            chosen, target = normalize(options[letter]), _normalized_gold(str(gold))
            if target and (target == chosen or f" {target} " in f" {chosen} "):
                return None
            return f"MCQ answer {letter} ({options[letter][:30]!r}) is not the gold {str(gold)[:30]!r}"
        if gold is None or turn.answer is None:
            return None
        if f" {_normalized_gold(str(gold))} " not in f" {normalize(turn.answer)} ":
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

    from patho_r1.curate.minhash import MinHashSpec, band_keys, word_signatures

    spec = MinHashSpec(cfg.near_duplicate_threshold, cfg.num_perm, cfg.shingle)
    seen: list[dict[int, int]] = [{} for _ in range(spec.bands[0])]  # per band: key -> first kept output with it
    kept_ids: list[str] = []
    # the kept outputs' signatures, in one array grown by doubling: a million small arrays would be a million
    # objects for the garbage collector to walk at every full collection (a third of the filter's time, measured)
    kept_sigs = np.empty((1024, spec.num_perm), dtype=np.uint32)

    def check(batch: list[Candidate]) -> list[str | None]:
        nonlocal kept_sigs
        if not batch:
            return []
        sigs = word_signatures([c.word_hashes for c in batch], spec.num_perm, spec.shingle)
        keys = band_keys(sigs, *spec.bands)
        kept_sigs = _room_for(kept_sigs, len(kept_ids), len(batch))
        out: list[str | None] = []
        for c, sig, row_keys in zip(batch, sigs, keys.tolist(), strict=True):
            # a shared band makes a candidate; the signatures' agreement decides (LSH alone lets some through)
            hits = [i for band, k in zip(seen, row_keys, strict=True) if (i := band.get(k)) is not None]
            match = next((i for i in sorted(set(hits)) if (kept_sigs[i] == sig).mean() >= spec.threshold),
                         None) if hits else None
            if match is not None:
                out.append(f"near-duplicate of {kept_ids[match]}")
                continue
            index = len(kept_ids)
            kept_ids.append(str(c.row.get("id")))
            kept_sigs[index] = sig
            for band, k in zip(seen, row_keys, strict=True):
                band.setdefault(k, index)
            out.append(None)
        return out

    return check


def _room_for(sigs, used: int, more: int):
    """`sigs` (its first `used` rows), doubled past `used + more` rows where it has not room for them."""
    import numpy as np

    if used + more <= len(sigs):
        return sigs
    grown = np.empty((2 * (used + more), sigs.shape[1]), dtype=np.uint32)
    grown[:used] = sigs[:used]
    return grown


BUILTIN_ORDER = ("tags", "truncation", "length", "repetition", "language_mix", "answer_consistency", "near_duplicate")
