"""RL step cost on the tiny model: where a step's time goes, our trainer against plain TRL, and what dynamic
sampling costs.

    python bench/rl_step.py [--steps 8]

Prints (1) the split of a DAPO step into rollout (generation + scoring), reward and update time; (2) the mean step
time of our `DynamicSamplingGRPOTrainer` with dynamic sampling off against a plain `trl.GRPOTrainer` on the same
model, data, rewards and batch (ratio; goal >= 0.95); (3) with dynamic sampling on, the generated groups and
rollout seconds per informative group kept, against the same without it.
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _mean(trainer, key):
    values = [row[key] for row in trainer.state.log_history if key in row]
    return statistics.mean(values) if values else float("nan")


def main() -> None:
    from patho_r1.fixtures.workspace import make_workspace

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    from trl import GRPOTrainer

    from patho_r1.rl.config import RLPhaseConfig
    from patho_r1.rl.grpo import build_rl_trainer

    model_dir, world = make_workspace()
    out = Path(model_dir).parent

    def config(name, dynamic):
        return RLPhaseConfig(model=str(model_dir), data=str(world / "rl/train.jsonl"), output_dir=str(out / name),
                             algorithm="dapo", max_steps=args.steps, per_device_train_batch_size=16,
                             num_generations=8, max_completion_length=48, temperature=1.0, learning_rate=1e-5,
                             logging_steps=1, save_steps=10_000, wandb={"mode": "disabled"}, seed=0,
                             dynamic_sampling={"enabled": dynamic, "max_rounds": 2})

    ours = build_rl_trainer(config("ours", dynamic=False))
    plain = GRPOTrainer(model=ours.model, reward_funcs=ours.reward_funcs, args=ours.args,
                        train_dataset=ours.train_dataset, processing_class=ours.processing_class)
    plain.args.output_dir = str(out / "plain")
    plain.train()
    ours_ds_off = build_rl_trainer(config("ours2", dynamic=False))
    ours_ds_off.train()
    with_ds = build_rl_trainer(config("ds", dynamic=True))
    with_ds.train()

    step_plain, step_ours = _mean(plain, "step_time"), _mean(ours_ds_off, "step_time")
    rollout, reward = _mean(ours_ds_off, "timing/rollout_s"), _mean(ours_ds_off, "timing/reward_s")
    print(f"DAPO step split (ours, dynamic sampling off, {args.steps} steps, 2 groups x 8 completions):")
    print(f"  rollout (generate + score) {rollout:7.3f} s   of which reward {reward:7.3f} s")
    print(f"  update                     {step_ours - rollout:7.3f} s   step total {step_ours:7.3f} s")
    print(f"step time: plain TRL {step_plain:.3f} s, ours {step_ours:.3f} s, speed ratio plain/ours "
          f"{step_plain / step_ours:.3f} (goal >= 0.95)")
    logs = [r for r in with_ds.state.log_history if "dynamic_sampling/rounds" in r]
    target = 2  # groups per batch: 16 completions / 8 per group
    generated = sum(target + r["dynamic_sampling/extra_groups"] for r in logs)
    informative = sum(min(target, (target + r["dynamic_sampling/extra_groups"])
                          * (1 - r["dynamic_sampling/filtered_frac"])) for r in logs)
    rollout_ds = sum(r["timing/rollout_s"] * r["dynamic_sampling/rounds"] for r in logs)
    rollout_base = rollout * len(logs)
    print(f"dynamic sampling: {generated:.0f} groups generated for {target * len(logs)} batch slots, "
          f"{informative:.0f} informative groups kept, "
          f"{_mean(with_ds, 'dynamic_sampling/rounds'):.2f} generation rounds per batch")
    print(f"  extra rollout time per informative group: "
          f"{(rollout_ds - rollout_base) / max(informative, 1):.3f} s "
          f"(rollout {rollout_ds:.2f} s with, {rollout_base:.2f} s without)")

if __name__ == "__main__":
    main()
