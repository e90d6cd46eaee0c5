"""End-to-end learning on the tiny model (about three minutes): SFT teaches the format, GRPO and DAPO raise accuracy."""

import json
from types import SimpleNamespace

import pytest

from patho_r1.eval.benchmarks import evaluate_benchmark, get_benchmark
from patho_r1.eval.generation import SamplingConfig, make_generator
from patho_r1.models import load_backbone
from patho_r1.rl.config import RLPhaseConfig
from patho_r1.rl.grpo import run_rl

pytestmark = pytest.mark.slow


def _score(model_dir, data, limit=None):
    backbone, bench = load_backbone(model_dir), get_benchmark("mcq")
    report, _ = evaluate_benchmark(bench, bench.read(data, limit=limit).records, make_generator(backbone),
                                   SamplingConfig(max_new_tokens=64, batch_size=48), tokenizer=backbone.tokenizer)
    return SimpleNamespace(accuracy=report["overall"]["accuracy"], chance=report["chance"],
                           format_rate=report["format_rate"], strict_accuracy=report["strict_accuracy"])


def test_sft_teaches_the_reasoning_format(tiny_model_dir, sft_model_dir, learning_world):
    heldout = learning_world / "eval/PathoSynth_MCQ.tsv"
    before, after = _score(tiny_model_dir, heldout), _score(sft_model_dir, heldout)
    assert before.format_rate <= 0.05
    assert after.format_rate >= 0.8, after
    assert after.accuracy > after.chance


@pytest.mark.parametrize("algorithm", ["grpo", "dapo"])
def test_rl_raises_accuracy_on_training_prompts(algorithm, sft_model_dir, learning_world, tmp_path):
    train = learning_world / "rl/train.jsonl"
    before = _score(sft_model_dir, train)
    cfg = RLPhaseConfig(model=str(sft_model_dir), data=str(train), output_dir=str(tmp_path / algorithm),
                        algorithm=algorithm, max_steps=40, per_device_train_batch_size=16,
                        gradient_accumulation_steps=4, num_generations=8, max_completion_length=64,
                        learning_rate=1e-4, warmup_ratio=0.0, logging_steps=1, save_steps=10_000,
                        wandb={"mode": "disabled"}, freeze_vision_tower=True, freeze_projector=True, seed=0)
    result = run_rl(cfg)
    after = _score(result.model_dir, train)
    log = [json.loads(x) for x in (tmp_path / algorithm / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in log if "rewards/accuracy/mean" in r]
    assert len(steps) == 40 and all("rewards/format/mean" in r for r in steps)
    if algorithm == "dapo":
        assert all("dynamic_sampling/filtered_frac" in r and "rewards/soft_overlong/mean" in r for r in steps)
    else:
        assert all("kl" in r for r in steps)  # beta > 0 for GRPO
    assert after.strict_accuracy > before.strict_accuracy, (before, after)
    print(f"{algorithm}: train-prompt greedy accuracy {before.strict_accuracy:.3f} -> {after.strict_accuracy:.3f}")
