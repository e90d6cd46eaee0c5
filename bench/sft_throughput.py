"""SFT step throughput: our SFT phase (PathoVLMCollator on TRL's SFTTrainer) against a plain TRL SFTTrainer.

    python bench/sft_throughput.py [--steps 40] [--batch 8]

Both train the same tiny model on the same CoT conversations (ours: `conversation` rows with image references and
all-assistant-turn masking; plain TRL: `prompt`/`completion` rows with decoded PIL images, its own collator).  Prints
processed (non-padding) tokens per second for each and the ratio (goal >= 0.95), and the batches' padding fraction.
Vision datasets cannot be packed or run padding-free in TRL 1.16, so no packing numbers are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tokens_per_second(trainer, steps: int) -> tuple[float, float]:
    loader = trainer.get_train_dataloader()
    batches = [b for _, b in zip(range(steps), iter(loader), strict=False)]
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    padding = sum(int((b["attention_mask"] == 0).sum()) for b in batches) / sum(b["attention_mask"].numel()
                                                                                 for b in batches)
    trainer.args.max_steps = steps
    t0 = time.perf_counter()
    trainer.train()
    return tokens / (time.perf_counter() - t0), padding


def main() -> None:
    from patho_r1.fixtures.workspace import make_workspace

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from patho_r1.data import load_image, load_records
    from patho_r1.models import load_backbone
    from patho_r1.rewards.parsing import REASONING_SYSTEM_PROMPT
    from patho_r1.sft.config import SFTPhaseConfig
    from patho_r1.sft.data import conversation_rows, to_dataset
    from patho_r1.sft.trainer import build_sft_trainer

    model_dir, world = make_workspace()
    data = world / "sft/train.jsonl"
    out = Path(model_dir).parent
    common = dict(per_device_train_batch_size=args.batch, learning_rate=1e-3, warmup_ratio=0.0, max_length=512,
                  save_steps=10_000, logging_steps=10_000, wandb={"mode": "disabled"})

    ours, _ = build_sft_trainer(SFTPhaseConfig(model=str(model_dir), data=str(data), output_dir=str(out / "ours"),
                                               max_steps=args.steps, **common), "sft",
                                to_dataset(conversation_rows, source=str(data)),
                                system_prompt=REASONING_SYSTEM_PROMPT)

    rows = []
    for rec in load_records(data, "conversation"):
        msgs = [m.model_dump(exclude_none=True) for m in rec.messages]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        prompt = [{"role": "system", "content": REASONING_SYSTEM_PROMPT}] + msgs[:last]
        for m in prompt:  # TRL inserts image placeholders itself for string content
            if isinstance(m["content"], list):
                m["content"] = "".join(p.get("text") or "" for p in m["content"])
        rows.append({"prompt": prompt, "completion": [msgs[last]], "images": [load_image(i) for i in rec.images]})
    backbone = load_backbone(model_dir, padding_side="right")
    plain = SFTTrainer(model=backbone.model, processing_class=backbone.processor, train_dataset=Dataset.from_list(rows),
                       args=SFTConfig(output_dir=str(out / "plain"), per_device_train_batch_size=args.batch,
                                      learning_rate=1e-3, max_length=512, max_steps=args.steps, report_to=[],
                                      use_cpu=True, bf16=False, save_strategy="no", logging_steps=10_000,
                                      disable_tqdm=True, gradient_checkpointing=False))

    tps_plain, pad_plain = tokens_per_second(plain, args.steps)
    tps_ours, pad_ours = tokens_per_second(ours, args.steps)
    print(json.dumps({"steps": args.steps, "batch": args.batch}))
    print(f"plain TRL SFTTrainer  {tps_plain:10.0f} tokens/s   padding fraction {pad_plain:.3f}")
    print(f"patho-r1 SFT phase    {tps_ours:10.0f} tokens/s   padding fraction {pad_ours:.3f}")
    print(f"ratio ours/plain      {tps_ours / tps_plain:10.3f}   (goal >= 0.95; ours also learns every assistant turn "
          "of multi-turn samples, which the plain prompt/completion run cannot)")


if __name__ == "__main__":
    main()
