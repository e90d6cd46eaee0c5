"""Words as 64-bit hashes, for a whole batch of texts at once in numpy.

Splitting and hashing words one row at a time in Python (`re.findall`, then a hash per word or per shingle) costs
more than the stages that need it can spend: the filter's rules and the dedup's MinHash read every word of every
row.  Here a batch is one byte array; the words are runs of word bytes (`runs`), hashed together (`hash_words`);
`word_hash` is the same hash of one word in plain Python, the reference the numpy path is tested against.
"""

from __future__ import annotations

import numpy as np

PRIME = 0x100000001B3  # FNV-1a's 64-bit prime
_WINDOW = 1 << 21  # bytes hashed against one table of powers (two tables of 16 MB)
_tables = (np.ones(1, dtype=np.uint64), np.ones(1, dtype=np.uint64))


def _power_tables(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(PRIME**k, PRIME**-k) mod 2**64 for k < n, grown on demand and kept (the prime is odd: it has an inverse)."""
    global _tables
    if len(_tables[0]) < n:
        size = max(n, 2 * len(_tables[0]))
        with np.errstate(over="ignore"):
            _tables = tuple(np.cumprod(np.concatenate(([np.uint64(1)], np.full(size - 1, base))))
                            for base in (np.uint64(PRIME), np.uint64(pow(PRIME, -1, 1 << 64))))
    return _tables


def hash_words(data: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each byte run data[starts[i]:ends[i]]: its bytes as a polynomial in PRIME, counted from the
    run's own first byte, so equal runs hash alike wherever they stand.  From prefix sums over windows of the data
    (the power of each byte's position, then the inverse power of the run's start), cut between runs."""
    out = np.empty(len(starts), dtype=np.uint64)
    done = 0
    while done < len(starts):
        base = int(starts[done])
        last = max(int(np.searchsorted(starts, base + _WINDOW, side="left")), done + 1)  # runs [done, last)
        if last > done + 1 and ends[last - 1] > base + _WINDOW:  # the last run crosses the window: next one
            last -= 1
        stop = int(ends[last - 1])
        powers, inverse = _power_tables(stop - base + 1)
        with np.errstate(over="ignore"):
            cum = np.zeros(stop - base + 1, dtype=np.uint64)
            np.cumsum(data[base:stop] * powers[:stop - base], out=cum[1:])
            s, e = starts[done:last] - base, ends[done:last] - base
            out[done:last] = (cum[e] - cum[s]) * inverse[s]
        done = last
    return out


def prefix_sums(x: np.ndarray, dtype) -> np.ndarray:
    """[0, x0, x0+x1, ...]: len(x) + 1 sums, so the sum over [a, b) is out[b] - out[a].  (Not np.r_, whose index
    parsing costs more than the sum over a chunk.)"""
    out = np.zeros(len(x) + 1, dtype=dtype)
    np.cumsum(x, dtype=dtype, out=out[1:])
    return out


def mix(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finalizer: spreads a polynomial hash's bits before they are truncated or compared."""
    with np.errstate(over="ignore"):
        h = (h ^ (h >> np.uint64(33))) * np.uint64(0xFF51AFD7ED558CCD)
        h = (h ^ (h >> np.uint64(33))) * np.uint64(0xC4CEB9FE1A85EC53)
        return h ^ (h >> np.uint64(33))


def changes(x: np.ndarray) -> np.ndarray:
    """True where a sorted array's value differs from the one before (and at the first)."""
    out = np.ones(len(x), dtype=bool)
    np.not_equal(x[1:], x[:-1], out=out[1:])
    return out


def runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) of the runs of True in a boolean array: the words, where `mask` marks word bytes."""
    edges = np.flatnonzero(np.diff(mask.view(np.int8), prepend=np.int8(0), append=np.int8(0)))
    return edges[0::2], edges[1::2]


def word_hash(word: bytes) -> int:
    """`hash_words` of one word, in plain Python: sum of byte_i * PRIME**i mod 2**64."""
    return sum(b * pow(PRIME, i, 1 << 64) for i, b in enumerate(word)) % (1 << 64)
