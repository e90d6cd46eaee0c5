"""Word statistics of a chunk of teacher outputs, computed for all its rows at once in numpy.

The filter's rules read every word of every output: the length rule counts them, the repetition rule counts
repeated n-grams and sentences, the near-duplicate rule hashes word shingles.  Done row by row in Python, splitting
the words alone costs more than the filter's whole budget (about 10 us an output for `re.findall`, 3 more to hash
them), so one pass here splits and hashes the words of a chunk as one byte array:

- `word_hashes(i)`: a 64-bit hash per word of row i's body (its thinks and answers, lower-cased `\\w+` words);
- `tokens`: the words-and-punctuation count (`\\w+|[^\\w\\s]`) of each row's body plus its extra text (questions);
- `distinct_ngrams(n)`: per row, how many distinct word n-grams its body holds, and how many it has;
- `may_repeat_sentence(times)`: per row, whether some sentence (2+ spaces, as the repetition rule counts them) might
  be said `times` times within one think or answer.

The counts are exact for ASCII rows (the byte classes are built from the very regexes they replace).  Rows with
other characters are split by the regexes themselves, their words then joined by spaces for hashing.  The n-gram
and sentence answers are upper bounds in the direction that is safe for a filter: the rules re-check, in plain
Python, only the rows they would reject, so a reason never rests on a hash collision.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import cached_property

import numpy as np

from patho_r1.curate.word_hash import PRIME, changes, hash_words, mix, prefix_sums, runs

WORD = re.compile(r"\w+")
TOKEN = re.compile(r"\w+|[^\w\s]")
SENTENCE = re.compile(r"[^.!?\n]+")  # the repetition rule's sentences: runs between . ! ? and line breaks

_ASCII = [chr(c) for c in range(128)]
# Byte classes, from the regexes themselves.  Bytes >= 0x80 only occur in rows rewritten as their \w+ words (UTF-8
# bytes of a non-ASCII word character), so they count as word bytes.
_IS_WORD = np.array([bool(re.fullmatch(r"\w", c)) for c in _ASCII] + [True] * 128)
_IS_SPACE = np.array([bool(re.fullmatch(r"\s", c)) for c in _ASCII] + [False] * 128)
_IS_PUNCT = ~_IS_WORD & ~_IS_SPACE
_IS_SENTENCE = np.array([bool(SENTENCE.fullmatch(c)) for c in _ASCII] + [True] * 128)
class ChunkText:
    """`bodies[i]`: row i's texts that loops are counted within (each think and answer); `extras[i]`: text that only
    the token count reads (the questions).

    Layout of `data`, lower-cased: every row's body (its parts joined by "\\n"), each followed by "\\n", then every
    row's extra text, each followed by "\\n".  So the bodies are one region, where "\\n" ends every sentence."""

    def __init__(self, bodies: Sequence[Sequence[str]], extras: Sequence[str]):
        self.n = len(bodies)
        self._bodies, self._extras = bodies, extras
        self._cache: dict = {}
        joined = ["\n".join(parts) for parts in bodies]
        tails = list(extras)
        self.ascii = np.fromiter((b.isascii() and e.isascii() for b, e in zip(joined, tails, strict=True)),
                                 dtype=bool, count=self.n)
        body_len = np.fromiter(map(len, joined), dtype=np.int64, count=self.n)
        tail_len = np.fromiter(map(len, tails), dtype=np.int64, count=self.n)
        for i in np.flatnonzero(~self.ascii):  # its words, lower-cased, stand in for it; their UTF-8 bytes count
            joined[i], tails[i] = " ".join(WORD.findall(joined[i].lower())), ""
            body_len[i], tail_len[i] = len(joined[i].encode("utf-8")), 0
        # lower-cased at once (lower() is idempotent, so the rows already lower-cased keep their byte lengths)
        text = "\n".join(joined) + "\n" + "\n".join(tails) + "\n" if self.n else ""
        self.data = np.frombuffer(text.lower().encode("utf-8"), dtype=np.uint8)
        self.body_start = np.cumsum(body_len + 1) - (body_len + 1)
        self.body_end = self.body_start + body_len
        self.bodies_end = int(self.body_end[-1]) + 1 if self.n else 0
        self.tail_start = self.bodies_end + np.cumsum(tail_len + 1) - (tail_len + 1)
        self.tail_end = self.tail_start + tail_len
        self._part_row, self._part_start = self._parts(bodies)

        # words: runs of word bytes
        starts, ends = runs(_IS_WORD[self.data])
        n_body = int(np.searchsorted(starts, self.bodies_end))
        body_row = np.searchsorted(self.body_start, starts[:n_body], side="right") - 1
        tail_row = np.searchsorted(self.tail_start, starts[n_body:], side="right") - 1
        body_words = np.bincount(body_row, minlength=self.n)
        self._all_words_per_row = body_words + np.bincount(tail_row, minlength=self.n)
        self._hashes = hash_words(self.data, starts[:n_body], ends[:n_body])  # the bodies' words, row after row
        self._word_starts = starts[:n_body]
        self.word_offsets = prefix_sums(body_words, np.int64)

    def _parts(self, bodies: Sequence[Sequence[str]]) -> tuple[np.ndarray, np.ndarray]:
        """The row of each think and answer of the ASCII rows, and where it starts (a sentence never crosses the
        "\\n" between two)."""
        ascii_rows = np.flatnonzero(self.ascii)
        per_row = np.fromiter((len(bodies[i]) for i in ascii_rows), dtype=np.int64, count=len(ascii_rows))
        lengths = np.fromiter((len(p) + 1 for i in ascii_rows for p in bodies[i]), dtype=np.int64,
                              count=int(per_row.sum()))
        part_row = np.repeat(ascii_rows, per_row)
        before = np.cumsum(lengths) - lengths  # bytes of the earlier parts, made relative to the part's row
        row_first = np.repeat(before[np.cumsum(per_row) - per_row], per_row) if len(before) else before
        return part_row, self.body_start[part_row] + before - row_first

    def word_hashes(self, i: int) -> np.ndarray:
        return self._hashes[self.word_offsets[i]:self.word_offsets[i + 1]]

    def n_words(self, i: int) -> int:
        return int(self.word_offsets[i + 1] - self.word_offsets[i])

    @cached_property
    def tokens(self) -> np.ndarray:
        """Words plus punctuation characters of each row's body and extra text: `len(TOKEN.findall(...))`."""
        punct = prefix_sums(_IS_PUNCT[self.data], np.int32)
        out = (self._all_words_per_row + punct[self.body_end] - punct[self.body_start]
               + punct[self.tail_end] - punct[self.tail_start])
        for i in np.flatnonzero(~self.ascii):
            out[i] = sum(len(TOKEN.findall(p)) for p in (*self._bodies[i], self._extras[i]))
        return out

    def distinct_ngrams(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(distinct, total) word n-grams per row.  `distinct` compares 40-bit hashes, so it can only undercount."""
        if ("ngrams", n) not in self._cache:
            self._cache["ngrams", n] = self._distinct_ngrams(n)
        return self._cache["ngrams", n]

    def _distinct_ngrams(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        counts = np.diff(self.word_offsets)
        total = np.maximum(counts - n + 1, 0)
        if not total.sum():
            return np.zeros(self.n, dtype=np.int64), total
        row = np.repeat(np.arange(self.n), total)
        first = np.repeat(self.word_offsets[:-1], total) + np.arange(int(total.sum())) - np.repeat(
            np.cumsum(total) - total, total)
        with np.errstate(over="ignore"):
            h = np.zeros(len(first), dtype=np.uint64)
            for j in range(n):
                h = (h ^ self._hashes[first + j]) * np.uint64(PRIME)
        key = np.sort((row.astype(np.uint64) << np.uint64(40)) | (mix(h) >> np.uint64(24)))
        new = changes(key)
        return np.bincount(row, weights=new, minlength=self.n).astype(np.int64), total

    def may_repeat_sentence(self, times: int) -> np.ndarray:
        """Per row: could a sentence (a run between . ! ? or line breaks, with 2+ spaces) occur `times` times in one
        of its texts?  Sentences are compared by the sum of their word hashes, which equal sentences share; False
        is certain, True is for the caller to check."""
        if ("sentences", times) not in self._cache:
            self._cache["sentences", times] = self._may_repeat_sentence(times)
        return self._cache["sentences", times]

    def _may_repeat_sentence(self, times: int) -> np.ndarray:
        out = ~self.ascii
        if not len(self._part_start):
            return out
        body = self.data[:self.bodies_end]
        seg_start, seg_end = runs(_IS_SENTENCE[body])
        spaces = prefix_sums(body == 32, np.int32)
        # sentences of 2+ spaces, in ASCII rows (the others' stand-in words are in this region too)
        keep = (spaces[seg_end] - spaces[seg_start] >= 2) & self.ascii[
            np.searchsorted(self.body_start, seg_start, side="right") - 1]
        seg_start, seg_end = seg_start[keep], seg_end[keep]
        if not len(seg_start):
            return out
        with np.errstate(over="ignore"):
            word_sum = prefix_sums(self._hashes, np.uint64)
            key = mix(word_sum[np.searchsorted(self._word_starts, seg_end)]
                      - word_sum[np.searchsorted(self._word_starts, seg_start)])
        # which think or answer each sentence is in
        part = np.searchsorted(self._part_start, seg_start, side="right") - 1
        grouped = np.sort((part.astype(np.uint64) << np.uint64(36)) | (key >> np.uint64(28)))
        bounds = np.append(np.flatnonzero(changes(grouped)), len(grouped))
        heavy = bounds[:-1][np.diff(bounds) >= times]
        out[self._part_row[(grouped[heavy] >> np.uint64(36)).astype(np.int64)]] = True
        return out
