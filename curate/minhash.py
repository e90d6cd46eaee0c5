"""MinHash signatures for a batch of texts at once, computed in numpy, and the LSH banding that datasketch's
`MinHashLSH` would choose.

Why not `datasketch.MinHash.update_batch` per row: it costs about 90 us a caption (one numpy call per row, after a
sha1 per shingle), and `MinHashLSH` holds about 1 KB a row in memory (3.6 GB at 3.5M rows).  Here one pass splits
and hashes the words of a whole batch (`curate/word_hash.py`), each shingle's hash is mixed from its words' hashes,
and the LSH buckets are found by sorting band keys on disk (`curate/dedup.py`), as datatrove's MinHash stages do,
so memory stays flat in the row count.  The permutations and the band/row split are datasketch's own
(`MinHash(...).permutations`, `MinHashLSH(...).b/.r`); the shingle hash is `shingle_hash`, so
`datasketch.MinHash(hashfunc=shingle_hash)` over `shingles(text)` gives our signature value for value
(`tests/test_curate.py` checks it).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from patho_r1.curate.word_hash import PRIME, changes, hash_words, runs, word_hash

_WORD = re.compile(r"[a-z0-9]+")
_IS_ALNUM = np.zeros(256, dtype=bool)  # `_WORD`'s bytes; UTF-8 bytes of other characters are all >= 0x80
_IS_ALNUM[[*range(ord("a"), ord("z") + 1), *range(ord("0"), ord("9") + 1)]] = True
# MurmurHash3's 32-bit finalizer, which datasketch's affine32 scheme applies before its permutations.
_FMIX32 = (16, 0x85EBCA6B, 13, 0xC2B2AE35, 16)


def shingles(text: str, n: int = 3) -> list[str]:
    """Word n-grams of lower-cased alphanumeric words; a text shorter than n words is one shingle."""
    words = _WORD.findall(text.lower())
    if len(words) <= n:
        return [" ".join(words)] if words else []
    return [" ".join(words[i:i + n]) for i in range(len(words) - n + 1)]


def shingle_hash(shingle: bytes, n: int = 3) -> int:
    """The 32-bit hash of one shingle (its words joined by spaces, as `shingles` writes them), in plain Python:
    FNV-1a over its words' `word_hash`es (a short text's shingle padded with zeros to n words), folded to 32 bits.
    The reference `signatures` is tested against, and the `hashfunc` that makes datasketch compute the same."""
    words = shingle.split(b" ")
    h = 0
    for j in range(n):
        h = ((h ^ (word_hash(words[j]) if j < len(words) else 0)) * PRIME) % (1 << 64)
    return (h ^ (h >> 32)) & 0xFFFFFFFF


def n_words(text: str) -> int:
    return len(_WORD.findall(text.lower()))


@lru_cache(maxsize=8)
def permutations(num_perm: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    from datasketch import MinHash

    proto = MinHash(num_perm=num_perm, seed=seed)
    if proto.scheme != "affine32":  # pragma: no cover - a datasketch release that changed its default
        raise RuntimeError(f"datasketch's default MinHash scheme is {proto.scheme!r}; this code mirrors affine32")
    a, b = proto.permutations
    return a.astype(np.uint32), b.astype(np.uint32)


def _fmix32(h: np.ndarray) -> np.ndarray:
    s1, m1, s2, m2, s3 = _FMIX32
    h = h ^ (h >> np.uint32(s1))
    h = h * np.uint32(m1)
    h = h ^ (h >> np.uint32(s2))
    h = h * np.uint32(m2)
    return h ^ (h >> np.uint32(s3))


def signatures(texts: Sequence[str], num_perm: int = 64, shingle: int = 3, seed: int = 1) -> np.ndarray:
    """(len(texts), num_perm) uint32 MinHash signatures of `shingles(text)`; a text with no words gets the all-max
    signature (it matches nothing, as an empty datasketch MinHash)."""
    # One byte array of the lower-cased texts, each followed by "\n" (not a word byte: no word spans two rows).
    # lower() before encoding, as `shingles` does: a few characters lower-case to ASCII letters ("K", Kelvin).
    lowered = ("\n".join(texts) + "\n").lower()
    data = np.frombuffer(lowered.encode("utf-8"), dtype=np.uint8)
    if lowered.isascii():  # a byte per character, and lower() keeps lengths
        lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
    else:
        lengths = np.fromiter((len(t.lower().encode("utf-8")) for t in texts), dtype=np.int64, count=len(texts))
    row_start = np.cumsum(lengths + 1) - (lengths + 1)
    starts, ends = runs(_IS_ALNUM[data])
    per_row = np.bincount(np.searchsorted(row_start, starts, side="right") - 1, minlength=len(texts))
    return _signatures_of_words(hash_words(data, starts, ends), per_row, num_perm, shingle, seed)


def _signatures_of_words(flat: np.ndarray, lengths: np.ndarray, num_perm: int, shingle: int, seed: int
                         ) -> np.ndarray:
    """MinHash signatures of rows given as their word hashes (`flat`, row after row; `lengths` words each): shingle
    k of a row is words k .. k+shingle-1, a row shorter than `shingle` words one shingle of all its words, hashed as
    `shingle_hash` does."""
    a, b = permutations(num_perm, seed)
    out = np.full((len(lengths), num_perm), np.iinfo(np.uint32).max, dtype=np.uint32)
    if not lengths.sum():
        return out
    ends = np.cumsum(lengths)
    starts = ends - lengths
    n_sh = np.where(lengths >= shingle, lengths - shingle + 1, (lengths > 0).astype(np.int64))
    row_of = np.repeat(np.arange(len(lengths)), n_sh)
    first = np.repeat(starts, n_sh) + (np.arange(int(n_sh.sum())) - np.repeat(np.cumsum(n_sh) - n_sh, n_sh))
    limit = np.repeat(ends, n_sh)
    with np.errstate(over="ignore"):
        h = np.zeros(len(first), dtype=np.uint64)
        for j in range(shingle):  # FNV-1a over the shingle's word hashes, in order (zeros past a short row's end)
            idx = first + j
            word = np.where(idx < limit, flat[np.minimum(idx, len(flat) - 1)], np.uint64(0))
            h = (h ^ word) * np.uint64(PRIME)
        h32 = _fmix32((h ^ (h >> np.uint64(32))).astype(np.uint32))
    starts_sh = np.flatnonzero(changes(row_of))
    out[row_of[starts_sh]] = _min_per_row(h32, starts_sh, a, b)
    return out


def _min_per_row(h32: np.ndarray, starts: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(starts), num_perm): per group of consecutive shingle hashes (from each of `starts`), the minimum of
    a*h + b mod 2^32 for each permutation (a, b).  One permutation at a time: a 1-D pass stays in cache, and is
    about 20x faster than reducing the (shingles, num_perm) matrix along its rows."""
    out = np.empty((len(starts), len(a)), dtype=np.uint32)
    with np.errstate(over="ignore"):  # multiplication mod 2^32 is the intended arithmetic
        for j in range(len(a)):
            permuted = h32 * a[j]
            permuted += b[j]
            out[:, j] = np.minimum.reduceat(permuted, starts)
    return out


def word_signatures(rows: Sequence[np.ndarray], num_perm: int = 32, shingle: int = 3, seed: int = 1) -> np.ndarray:
    """(len(rows), num_perm) MinHash signatures from each row's uint64 word hashes (`ChunkText.word_hashes`, the
    filter's `\\w+` words): the same shingle hash and permutations as `signatures`."""
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    flat = np.concatenate([np.asarray(r, dtype=np.uint64) for r in rows]) if len(rows) else np.zeros(0, np.uint64)
    return _signatures_of_words(flat, lengths, num_perm, shingle, seed)


@lru_cache(maxsize=32)
def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) datasketch's MinHashLSH picks for this threshold (equal false-positive and
    false-negative weights)."""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    return lsh.b, lsh.r


def band_keys(sigs: np.ndarray, bands: int, rows: int, salt: np.ndarray | None = None) -> np.ndarray:
    """(n, bands) uint64 keys: rows sharing a key in any band are LSH candidates.  `salt` (n,) uint64 mixes in a
    per-row value (an image hash), so only rows with the same salt can collide."""
    n = sigs.shape[0]
    keys = np.empty((n, bands), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for band in range(bands):
            h = np.full(n, 0xCBF29CE484222325, dtype=np.uint64) if salt is None else salt.astype(np.uint64).copy()
            for col in sigs[:, band * rows:(band + 1) * rows].T.astype(np.uint64):
                h = (h ^ col) * np.uint64(0x100000001B3)  # FNV-1a over the band's values
            keys[:, band] = h ^ np.uint64(band)
    return keys


def jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> np.ndarray:
    """Estimated Jaccard similarity of signature pairs (row-wise), as `MinHash.jaccard`."""
    return (sig_a == sig_b).mean(axis=-1)


@dataclass(frozen=True)
class MinHashSpec:
    """Everything that decides which texts are near-duplicates: one value, shared by the dedup and decontamination
    stages, their Ray workers and the benchmark index, so the two sides of a comparison are always signed alike."""

    threshold: float
    num_perm: int = 64
    shingle: int = 3

    @property
    def bands(self) -> tuple[int, int]:
        return lsh_params(self.threshold, self.num_perm)

    def sign(self, texts: Sequence[str], salt: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(signatures, band keys) of `texts`."""
        sigs = signatures(texts, self.num_perm, self.shingle)
        return sigs, band_keys(sigs, *self.bands, salt)

