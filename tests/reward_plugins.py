"""A stand-in third-party reward module for the registry tests (loaded by import string and by entry point)."""

import time


def brevity(prompts=None, completions=None, **kwargs):
    """1.0 for completions of at most 40 characters."""
    return [1.0 if len(str(c)) <= 40 else 0.0 for c in completions]


def make_keyword(word="nuclei", value=2.0):
    """Factory: a reward of `value` when the completion mentions `word`."""

    def keyword(prompts=None, completions=None, **kwargs):
        return [value if word in str(c) else 0.0 for c in completions]

    return keyword


def flaky(prompts=None, completions=None, **kwargs):
    """Raises on any completion containing 'boom'."""
    if any("boom" in str(c) for c in completions):
        raise RuntimeError("boom")
    return [1.0 for _ in completions]


def hang(pred, gold):
    time.sleep(60)
    return 1.0


def quick(pred, gold):
    return 1.0 if pred == gold else 0.0


def varied(prompts=None, completions=None, completion_ids=None, **kwargs):
    """A spread of scores from the token ids, with every third completion unscored (None)."""
    return [None if i % 3 == 0 else float(sum(ids) % 7) for i, ids in enumerate(completion_ids)]


def sleepy(prompts=None, completions=None, **kwargs):
    """Sleeps far past any sane time limit on a completion containing 'sleep'."""
    if any("sleep" in str(c) for c in completions):
        time.sleep(30)
    return [1.0 for _ in completions]


def odd_values(prompts=None, completions=None, **kwargs):
    """Returns the completion's own text as its score: a number string, 'nan', or anything."""
    table = {"one": 1.0, "nan": float("nan"), "inf": float("inf"), "text": "0.5", "dict": {"x": 1}, "none": None}
    return [table[str(c)] for c in completions]


def as_string(prompts=None, completions=None, **kwargs):
    return "1.0"


def by_prompt(prompts=None, completions=None, **kwargs):
    """Informative groups decided by the prompt alone: half the prompts (by a stable hash) score 0, 1, 0, 1, ...
    down their rows, the rest 0 throughout.  With PATHO_TEST_REWARD_LOG set, each call appends the rank and the
    prompts' hashes to that file, one JSON line per call."""
    import json
    import os
    import zlib

    def text(x):  # the prompt's words only: its images are objects whose repr holds a memory address
        if isinstance(x, dict):
            return "".join(text(v) for k, v in x.items() if k in ("text", "content"))
        if isinstance(x, list):
            return "".join(text(v) for v in x)
        return x if isinstance(x, str) else ""

    keys = [zlib.crc32(text(p).encode()) for p in prompts]
    if os.environ.get("PATHO_TEST_REWARD_LOG"):
        with open(os.environ["PATHO_TEST_REWARD_LOG"], "a") as f:
            f.write(json.dumps({"rank": int(os.environ.get("RANK", 0)), "prompts": keys}) + "\n")
    return [float(i % 2) if k % 2 == 0 else 0.0 for i, k in enumerate(keys)]
