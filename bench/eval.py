"""Evaluation throughput: the built-in scorer (batched) against a VLMEvalKit-style loop (one prompt at a time through
our VLMEvalKit model class, which is how VLMEvalKit's `infer_data` drives a model), same tiny model, same TSV.

    python bench/eval.py [--n 48] [--max-new-tokens 32]

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
    args = ap.parse_args()
    from patho_r1.eval.generation import SamplingConfig, make_generator
    from patho_r1.eval.mcq import evaluate_mcq, load_eval_records
    from patho_r1.eval.vlmeval_hook import PathoR1VLMCore
    from patho_r1.models import load_backbone

    model_dir, world = make_workspace()
    records = load_eval_records(world / "eval/PathoSynth_MCQ.tsv", args.n)
    backbone = load_backbone(model_dir)
    generator = make_generator(backbone)
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, batch_size=16)
    evaluate_mcq(generator, records[:4], sampling)  # warm up
    t0 = time.perf_counter()
    evaluate_mcq(generator, records, sampling)
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


if __name__ == "__main__":
    main()
