"""Evaluation throughput, two parts measured in one run.

1. Generation: the built-in scorer (batched) against a VLMEvalKit-style loop (one prompt at a time through our
   VLMEvalKit model class, which is how VLMEvalKit's `infer_data` drives a model), same tiny model, same TSV.
2. The LLM judge against a local OpenAI-compatible server (the scripted one, each reply delayed like a real model's):
   requests/s at concurrency 1 and 16, and the same verdicts again from the disk cache.

    python bench/eval.py [--n 48] [--max-new-tokens 32] [--judge-n 400] [--judge-delay 0.05]

VLMEvalKit itself cannot be imported on the CPU stack (it needs torchvision), so its loop is reproduced by calling
`generate_inner` once per row, as `vlmeval.inference.infer_data` does.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    from patho_r1.fixtures.workspace import make_workspace

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--judge-n", type=int, default=400)
    ap.add_argument("--judge-delay", type=float, default=0.05, help="seconds the server takes per reply")
    args = ap.parse_args()
    judge_bench(args.judge_n, args.judge_delay)
    from patho_r1.eval.benchmarks import evaluate_benchmark, get_benchmark
    from patho_r1.eval.generation import SamplingConfig, make_generator
    from patho_r1.eval.vlmeval_hook import PathoR1VLMCore
    from patho_r1.models import load_backbone

    model_dir, world = make_workspace()
    bench = get_benchmark("mcq")
    records = bench.read(world / "eval/PathoSynth_MCQ.tsv", limit=args.n).records
    backbone = load_backbone(model_dir)
    generator = make_generator(backbone)
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, batch_size=16)
    evaluate_benchmark(bench, records[:4], generator, sampling)  # warm up
    t0 = time.perf_counter()
    evaluate_benchmark(bench, records, generator, sampling)
    ours = len(records) / (time.perf_counter() - t0)

    model = PathoR1VLMCore(str(model_dir), max_new_tokens=args.max_new_tokens)
    messages = [[dict(type="image", value=r.images[0]), dict(type="text", value=r.prompt_text())] for r in records]
    model.generate_inner(messages[0])
    t0 = time.perf_counter()
    for m in messages:
        model.generate_inner(m)
    loop = len(records) / (time.perf_counter() - t0)
    print(f"built-in scorer (batched)          {ours:8.2f} prompts/s")
    print(f"VLMEvalKit-style loop (one by one) {loop:8.2f} prompts/s")
    print(f"ratio                              {ours / loop:8.2f}x")


def judge_bench(n: int, delay_s: float) -> None:
    import tempfile
    from pathlib import Path

    from patho_r1.eval.judge import LLMJudge
    from patho_r1.fixtures.teacher import serve

    items = [(f"What is shown in case {i}?", "granuloma", f"a granuloma, case {i}") for i in range(n)]
    server = serve(delay_s=delay_s)
    rates = {}
    try:
        for concurrency in (1, 16):
            judge = LLMJudge(base_url=server.url, model=f"bench-c{concurrency}", concurrency=concurrency)
            t0 = time.perf_counter()
            judge.verdicts(items)
            rates[concurrency] = n / (time.perf_counter() - t0)
        with tempfile.TemporaryDirectory() as tmp:
            cache = str(Path(tmp) / "judge_cache.jsonl")
            t0 = time.perf_counter()
            LLMJudge(base_url=server.url, model="bench-cache", concurrency=16, cache=cache).verdicts(items)
            cold = time.perf_counter() - t0
            rerun = LLMJudge(base_url=server.url, model="bench-cache", concurrency=16, cache=cache)
            t0 = time.perf_counter()
            rerun.verdicts(items)
            warm = time.perf_counter() - t0
    finally:
        server.stop()
    print(f"judge, {n} verdicts, server reply {delay_s * 1000:.0f} ms")
    print(f"  concurrency 1                    {rates[1]:8.1f} requests/s")
    print(f"  concurrency 16                   {rates[16]:8.1f} requests/s   ({rates[16] / rates[1]:.1f}x)")
    print(f"  first run, cache filling         {cold:8.3f} s")
    print(f"  re-run from the cache            {warm:8.3f} s   ({rerun.cache_hits} hits, "
          f"{cold / max(warm, 1e-9):.0f}x faster)")


if __name__ == "__main__":
    main()
