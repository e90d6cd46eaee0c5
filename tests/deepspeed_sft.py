"""One SFT run on the tiny model, in a process of its own (DeepSpeed initialises a process group): used by
tests/test_deepspeed.py (which runs the same `run` without DeepSpeed in its own process).  argv: model world out
[deepspeed.json]."""

import os
import sys


def run(model: str, world: str, out: str, deepspeed: str | None = None) -> str:
    from patho_r1.sft.config import SFTPhaseConfig
    from patho_r1.sft.sft import run_sft

    cfg = SFTPhaseConfig(model=model, data=f"{world}/sft/train.jsonl", output_dir=out, use_cpu=True, max_steps=4,
                         per_device_train_batch_size=4, max_length=512, learning_rate=1e-3, warmup_ratio=0.0,
                         save_steps=100, deepspeed=deepspeed, wandb={"mode": "disabled"})
    return str(run_sft(cfg).model_dir)


if __name__ == "__main__":
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", WANDB_MODE="disabled")
    os.environ.setdefault("MASTER_PORT", "29517")
    print(run(*sys.argv[1:5]))
