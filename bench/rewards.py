"""Reward throughput: completions per second, measured in one run.

    python bench/rewards.py [--n 50000] [--math-n 400] [--workers 2]

Prints (1) strict format + MCQ accuracy on one core (target: >= 20,000 completions/s), and (2) math-verify answers
scored inline in one process against the worker pool, with the ratio.
"""

from __future__ import annotations

import argparse
import os
import random
import time

from patho_r1.rewards import OPTION_LETTERS, AccuracyReward, build_rewards, format_reward

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def mcq_batch(n: int, seed: int = 0):
    rng = random.Random(seed)
    letters = OPTION_LETTERS
    completions, golds = [], []
    for i in range(n):
        gold = rng.choice(letters)
        pred = gold if rng.random() < 0.5 else rng.choice(letters)
        think = "The tile shows gland-like rings lined by crowded nuclei. " * rng.randint(1, 6)
        style = i % 4
        if style == 0:
            text = f"<think>{think}</think><answer>{pred}</answer>"
        elif style == 1:
            text = f"<think>{think}</think>\n<answer> {pred} </answer>\n"
        elif style == 2:
            text = f"{think} The answer is {pred}."
        else:
            text = f"<think>{think}</think><answer>{pred}. option text</answer>"
        completions.append(text)
        golds.append(gold)
    return completions, golds


def math_batch(n: int, seed: int = 0):
    rng = random.Random(seed)
    completions, golds = [], []
    for _ in range(n):
        a, b = rng.randint(1, 50), rng.randint(2, 60)
        gold = f"{a}/{b}"
        pred = f"\\frac{{{a}}}{{{b}}}" if rng.random() < 0.5 else f"{a / b + rng.choice([0, 0.5]):.6f}"
        completions.append(f"<think>compute</think><answer>{pred}</answer>")
        golds.append(gold)
    return completions, golds


def rate(fn, n: int) -> float:
    t0 = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--math-n", type=int, default=400)
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    args = ap.parse_args()

    completions, golds = mcq_batch(args.n)
    accuracy = AccuracyReward(math_workers=0)
    types = ["mcq"] * args.n
    format_reward(completions=completions[:100])  # warm the regex
    fmt = rate(lambda: format_reward(completions=completions), args.n)
    acc = rate(lambda: accuracy(completions=completions, answer=golds, answer_type=types), args.n)
    both = rate(lambda: (format_reward(completions=completions),
                         accuracy(completions=completions, answer=golds, answer_type=types)), args.n)
    wrapped = build_rewards("grpo")
    via_registry = rate(lambda: wrapped.score(completions, answer=golds, answer_type=types), args.n)
    print(f"format alone                       {fmt:12,.0f} completions/s")
    print(f"MCQ accuracy alone                 {acc:12,.0f} completions/s")
    print(f"format + MCQ accuracy (one core)   {both:12,.0f} completions/s  (target >= 20,000: "
          f"{'met' if both >= 20_000 else 'NOT met'})")
    print(f"same through the registry wrappers {via_registry:12,.0f} completions/s")

    m_completions, m_golds = math_batch(args.math_n)
    inline = AccuracyReward(math_workers=0)
    inline(completions=m_completions[:5], answer=m_golds[:5])  # import math-verify outside the timing
    single = rate(lambda: inline(completions=m_completions, answer=m_golds), args.math_n)
    pooled = AccuracyReward(math_workers=args.workers, math_timeout=10)
    try:
        pooled(completions=m_completions[:args.workers * 2], answer=m_golds[:args.workers * 2])  # start workers
        parallel = rate(lambda: pooled(completions=m_completions, answer=m_golds), args.math_n)
    finally:
        pooled.close()
    print(f"math-verify, single process        {single:12,.0f} completions/s")
    print(f"math-verify, pool of {args.workers} workers     {parallel:12,.0f} completions/s  "
          f"(pool/single = {parallel / single:.2f}x; the pool also enforces a hard per-sample timeout)")


if __name__ == "__main__":
    main()
