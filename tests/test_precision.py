"""Training in the GPU recipes' precision (bf16) really updates the weights: fp32 master weights under bf16 autocast.

Pure bf16 weights round away AdamW steps smaller than half an ulp: at the RL learning rate (1e-6) almost no weight of
size ~0.02 moves.  These tests run one optimizer step in the bf16 configuration on CPU (bf16 autocast works there)
at the recipes' learning rates and count the weights that moved among those that got a gradient.
"""

import pytest
import torch
from transformers import TrainerCallback

from patho_r1.rl.config import RLPhaseConfig
from patho_r1.sft.config import SFTPhaseConfig
from patho_r1.training import precision


class _GradientMask(TrainerCallback):
    """Remembers, just before the optimizer step, which elements of each trainable parameter have a gradient."""

    def __init__(self, model):
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.before = {n: p.detach().float().clone() for n, p in self.params.items()}
        self.mask = {}

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.mask = {n: (p.grad != 0) for n, p in self.params.items() if p.grad is not None}

    def moved_fraction(self) -> float:
        moved = total = 0
        for name, mask in self.mask.items():
            changed = self.params[name].detach().float() != self.before[name]
            moved += int((changed & mask).sum())
            total += int(mask.sum())
        assert total > 10_000, "too few weights got a gradient for the test to mean anything"
        return moved / total


def _moved_after_one_step(trainer) -> float:
    probe = _GradientMask(trainer.model)
    trainer.add_callback(probe)
    trainer.train()
    return probe.moved_fraction()


def test_bf16_sft_step_at_the_recipe_learning_rate_moves_the_weights(tiny_model_dir, world_dir, tmp_path):
    from patho_r1.sft.data import conversation_rows, to_dataset
    from patho_r1.sft.trainer import build_sft_trainer

    cfg = SFTPhaseConfig(model=str(tiny_model_dir), data=str(world_dir / "sft/train.jsonl"), output_dir=str(tmp_path),
                         dtype="bfloat16", use_cpu=True, learning_rate=1e-5, warmup_ratio=0.0, max_steps=1,
                         per_device_train_batch_size=4, max_length=512, save_steps=100, wandb={"mode": "disabled"})
    assert precision(cfg).weights == "float32" and precision(cfg).bf16
    trainer, _ = build_sft_trainer(cfg, "sft", to_dataset(conversation_rows, source=cfg.data),
                                   system_prompt=cfg.system_prompt)
    assert trainer.args.bf16 and next(trainer.model.parameters()).dtype == torch.float32
    assert _moved_after_one_step(trainer) >= 0.99


def test_bf16_rl_step_at_the_recipe_learning_rate_moves_the_weights(tiny_model_dir, world_dir, tmp_path):
    from patho_r1.rl.grpo import build_rl_trainer

    cfg = RLPhaseConfig(model=str(tiny_model_dir), data=str(world_dir / "rl/train.jsonl"), output_dir=str(tmp_path),
                        dtype="bfloat16", use_cpu=True, learning_rate=1e-6, warmup_ratio=0.0, max_steps=1,
                        per_device_train_batch_size=8, num_generations=4, max_completion_length=16,
                        rewards=[{"name": "reward_plugins:varied"}], algorithm="grpo",  # beta 0.04: a bf16 reference
                        save_steps=100, wandb={"mode": "disabled"})
    trainer = build_rl_trainer(cfg)
    assert trainer.args.bf16 and next(trainer.model.parameters()).dtype == torch.float32
    assert next(trainer.ref_model.parameters()).dtype == torch.bfloat16  # frozen: no fp32 copy needed
    assert _moved_after_one_step(trainer) >= 0.99
    logged = {k for row in trainer.state.log_history for k in row}
    assert {"timing/rollout_s", "timing/reward_s", "timing/update_s"} <= logged


@pytest.mark.parametrize(("dtype", "deepspeed", "lora", "weights"), [
    ("bfloat16", None, None, "float32"),  # a plain optimizer: fp32 masters, bf16 autocast
    ("bfloat16", "ds.json", None, "bfloat16"),  # DeepSpeed keeps the fp32 masters itself
    ("bfloat16", None, {"r": 4}, "bfloat16"),  # LoRA adapters are fp32 by PEFT; the frozen base stays bf16
    ("float32", None, None, "float32"),
])
def test_the_weights_dtype_follows_who_keeps_the_master_copy(world_dir, tmp_path, dtype, deepspeed, lora, weights):
    if deepspeed:
        (tmp_path / deepspeed).write_text("{}")
        deepspeed = str(tmp_path / deepspeed)
    cfg = SFTPhaseConfig(model="m", data=str(world_dir / "sft/train.jsonl"), output_dir=str(tmp_path), dtype=dtype,
                         use_cpu=False, deepspeed=deepspeed, lora=lora)
    assert precision(cfg).weights == weights and precision(cfg).compute == dtype


def test_bf16_embedding_head_trains_its_vision_tower_with_fp32_masters(tiny_model_dir, world_dir, tmp_path):
    """HOMIE's stage 2 trains the vision tower beside the LoRA: peft copies it in the base dtype, so in bf16 its AdamW
    steps were pure bf16.  A step at 1e-5 now moves (almost) every vision weight that got a gradient."""
    from patho_r1.embed.config import EmbedPhaseConfig
    from patho_r1.embed.contrastive_loop import StepLog
    from patho_r1.embed.train import build_embedder, train_stage

    stage = {"curriculum": [{"data": str(world_dir / "embed/image_text_pairs.jsonl")}], "learning_rate": 1e-5,
             "batch_size": 4, "max_steps": 2}  # the schedule warms up from 0 over the first step
    cfg = EmbedPhaseConfig(model=str(tiny_model_dir), output_dir=str(tmp_path), dtype="bfloat16", use_cpu=True,
                           train_vision_tower=True, stage2=stage, wandb={"mode": "disabled"})
    embedder = build_embedder(cfg)
    vision = {n: p for n, p in embedder.model.named_parameters() if p.requires_grad and ".visual." in n}
    assert vision and all(p.dtype == torch.float32 for p in vision.values())
    assert embedder.autocast_dtype == torch.bfloat16
    assert {p.dtype for p in embedder.model.parameters() if not p.requires_grad} == {torch.bfloat16}
    before = {n: p.detach().clone() for n, p in vision.items()}
    grads = {}
    hooks = [p.register_post_accumulate_grad_hook(lambda p, n=n: grads.__setitem__(n, p.grad != 0))
             for n, p in vision.items()]
    train_stage(embedder, cfg.stage2, "stage2", cfg, StepLog(tmp_path / "m.jsonl", 1, lambda *_: None))
    for h in hooks:
        h.remove()
    moved = sum(int(((vision[n].detach() != before[n]) & g).sum()) for n, g in grads.items())
    total = sum(int(g.sum()) for g in grads.values())
    assert total > 10_000 and moved / total >= 0.99, (moved, total)
