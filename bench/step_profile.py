"""What a CPT/SFT training step costs a GPU, counted on the CPU: the old path and the new one side by side, in one run.

    python bench/step_profile.py                 # old: transformers' vision loop, padded batches; new: ours, packed
    python bench/step_profile.py --old-vision transformers --new-vision batched --steps 4

* `vision_attention_calls_per_image_forward`: attention kernel calls of one 448-px image through a vision tower with
  Qwen2.5-VL-3B's geometry (32 blocks, 112-px windows, full attention in 4 blocks) at reduced width;
* `host_syncs_per_step`: `.item()`/`.tolist()`/`bool()` reads of tensors during one SFT training step (forward and
  backward) of the tiny model with that vision geometry on 448-px tiles: each is a device->host sync on a GPU;
* `padding_fraction`: the share of padding in the demo recipe's SFT batches (its data, batch size 8, shuffled);
* `collate_ms_per_sample`: the collator's time per sample (the new one also computes the vision indices and the
  mRoPE positions, on the CPU where they cost no sync);
* `step_s`: seconds per training step (forward + backward + optimizer) of that model on the CPU.

The last line printed is JSON: each key holds `{"before": x, "after": y}`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

HOST_READS = ("tolist", "item", "__bool__", "__int__", "__float__", "__index__")
GEOMETRY_3B = dict(depth=32, window_size=112, patch_size=14, spatial_merge_size=2,
                   fullatt_block_indexes=[7, 15, 23, 31])


class Counts(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls: Counter = Counter()
        self.where: Counter = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        self.calls[name] += 1
        if name in HOST_READS:
            frame = sys._getframe(1)
            self.where[f"{Path(frame.f_code.co_filename).name}:{frame.f_code.co_name}"] += 1
        return func(*args, **(kwargs or {}))


def build_model(root: Path) -> Path:
    """The tiny language model under a vision tower of the 3B geometry (width 64), with a 448-px processor."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from patho_r1.fixtures.tiny import TinySpec, build_processor, build_tokenizer, register_processor, tiny_config

    register_processor()
    spec = TinySpec(min_pixels=448 * 448, max_pixels=448 * 448)
    tokenizer = build_tokenizer(spec)
    config = tiny_config(tokenizer, spec)
    for key, value in GEOMETRY_3B.items():
        setattr(config.vision_config, key, value)
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.float32)
    model.save_pretrained(root / "model")
    build_processor(tokenizer, spec).save_pretrained(root / "model")
    return root / "model"


def vision_calls_per_image(model, vision: str) -> int:
    from patho_r1.attention import apply_vision_attention

    config = model.config.vision_config
    if vision == "transformers":
        config._attn_implementation_internal = "sdpa"
    else:
        apply_vision_attention(model, vision, on_gpu=False)
    grid = torch.tensor([[1, 32, 32]])
    pixels = torch.randn(32 * 32, 3 * 2 * 14 * 14)
    with torch.no_grad(), Counts() as counts:
        model.model.visual(pixels, grid_thw=grid)
    return counts.calls["scaled_dot_product_attention"]


def collator(backbone, new: bool):
    from patho_r1.rewards.parsing import REASONING_SYSTEM_PROMPT
    from patho_r1.sft.collator import PathoVLMCollator

    return PathoVLMCollator(processor=backbone.processor, max_length=2048, completion_only_loss=True,
                            system_prompt=REASONING_SYSTEM_PROMPT, model_config=backbone.model.config if new else None,
                            packing=new)


def profile_path(model_dir: Path, rows: list, vision: str, new: bool, steps: int) -> dict:
    from patho_r1.models import load_backbone

    backbone = load_backbone(model_dir, dtype="float32", padding_side="right", vision_attention=vision, on_gpu=False)
    model = backbone.model.train()
    collate = collator(backbone, new)
    batches = [rows[i * 4:(i + 1) * 4] for i in range(steps + 1)]
    collate(batches[-1])  # warm-up: image decoding and tokenizer caches
    t0 = time.perf_counter()
    collated = [collate(b) for b in batches]
    collate_ms = (time.perf_counter() - t0) * 1000 / sum(len(b) for b in batches)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step(batch):
        batch = {"use_cache": False, **batch}
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step(collated[0])  # warm-up
    with Counts() as counts:
        step(collated[1])
    t0 = time.perf_counter()
    for batch in collated[1:]:
        step(batch)
    return {"host_syncs": sum(counts.where.values()), "where": dict(counts.where), "collate_ms": collate_ms,
            "step_s": (time.perf_counter() - t0) / steps}


def demo_padding(backbone, new: bool, batch_size: int = 8, max_batches: int = 40) -> float:
    """Padding share over the demo recipe's SFT batches (its world, its batch size, shuffled as a trainer would)."""
    from patho_r1.fixtures.synth import WorldConfig, generate_world
    from patho_r1.sft.data import conversation_rows
    from patho_r1.sft.packing import padding_fraction

    world = Path(tempfile.mkdtemp(prefix="step-profile-world-"))
    generate_world(world, seed=0, config=WorldConfig(n_sft=max_batches * batch_size))
    rows = list(conversation_rows(str(world / "sft/train.jsonl")))
    random.Random(0).shuffle(rows)
    collate = collator(backbone, new)
    pads = slots = 0.0
    for i in range(0, len(rows) - batch_size + 1, batch_size):
        batch = collate(rows[i:i + batch_size])
        n = batch["input_ids"].numel()
        pads += padding_fraction(batch) * n
        slots += n
    return pads / slots


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old-vision", default="transformers", help="the old path's vision attention")
    ap.add_argument("--new-vision", default="auto", help="the new path's vision attention")
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()

    from patho_r1.fixtures.synth import WorldConfig, generate_world
    from patho_r1.fixtures.tiny import TinySpec, build_tiny_model
    from patho_r1.models import load_backbone
    from patho_r1.sft.data import conversation_rows

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    root = Path(tempfile.mkdtemp(prefix="step-profile-"))
    model_dir = build_model(root)
    world = root / "world"
    generate_world(world, seed=0, config=WorldConfig(n_sft=4 * (args.steps + 1)))
    rows = list(conversation_rows(str(world / "sft/train.jsonl")))

    model = load_backbone(model_dir, dtype="float32", vision_attention="transformers", on_gpu=False).model
    calls = {"before": vision_calls_per_image(model, args.old_vision),
             "after": vision_calls_per_image(model, args.new_vision)}
    old = profile_path(model_dir, rows, args.old_vision, new=False, steps=args.steps)
    new = profile_path(model_dir, rows, args.new_vision, new=True, steps=args.steps)
    demo = load_backbone(build_tiny_model(root / "tiny", TinySpec()), dtype="float32")
    padding = {"before": demo_padding(demo, new=False), "after": demo_padding(demo, new=True)}

    for name, result in (("old", old), ("new", new)):
        print(f"{name}: host reads by place in one step: {result['where']}")
    result = {
        "vision_attention_calls_per_image_forward": calls,
        "host_syncs_per_step": {"before": old["host_syncs"], "after": new["host_syncs"]},
        "padding_fraction": {k: round(v, 4) for k, v in padding.items()},
        "collate_ms_per_sample": {"before": round(old["collate_ms"], 2), "after": round(new["collate_ms"], 2)},
        "step_s": {"before": round(old["step_s"], 3), "after": round(new["step_s"], 3)},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
