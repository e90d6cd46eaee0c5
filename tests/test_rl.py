"""The RL config's mapping onto TRL, rollout-engine selection, and the dataset that reaches the rewards."""

import pytest

from patho.errors import ConfigError
from patho.config import validate_config
from rl.config import RLPhaseConfig, to_grpo_config
from rl.data import build_rl_dataset
from rl.grpo import build_rl_trainer, check_rollout_engine


def _cfg(world_dir, tmp_path, **over):
    base = dict(model="unused", data=str(world_dir / "rl/train.jsonl"), output_dir=str(tmp_path / "rl"),
                per_device_train_batch_size=8, num_generations=4, max_completion_length=32,
                wandb={"mode": "disabled"})
    base.update(over)
    return RLPhaseConfig(**base)


def _trl(cfg):
    from patho.training import training_arguments

    return to_grpo_config(cfg, training_arguments(cfg, "t"))


def test_dapo_and_grpo_defaults_map_to_trl(world_dir, tmp_path):
    dapo = _trl(_cfg(world_dir, tmp_path, algorithm="dapo"))
    assert (dapo.loss_type, dapo.beta, dapo.epsilon, dapo.epsilon_high, dapo.mask_truncated_completions) == \
        ("dapo", 0.0, 0.2, 0.28, True)
    grpo = _trl(_cfg(world_dir, tmp_path, algorithm="grpo"))
    assert (grpo.loss_type, grpo.beta, grpo.epsilon_high, grpo.mask_truncated_completions) == \
        ("grpo", 0.04, 0.2, False)
    custom = _trl(_cfg(world_dir, tmp_path, algorithm="dapo", beta=0.01, epsilon_high=0.3, loss_type="dr_grpo",
                       mask_truncated_completions=False, temperature=0.7))
    assert (custom.beta, custom.epsilon_high, custom.loss_type, custom.mask_truncated_completions,
            custom.temperature) == (0.01, 0.3, "dr_grpo", False, 0.7)
    assert dapo.use_vllm is False and dapo.num_generations == 4 and dapo.max_completion_length == 32


def test_vllm_fields_map_and_missing_vllm_is_a_clear_error(world_dir, tmp_path):
    cfg = _cfg(world_dir, tmp_path, rollout={"engine": "vllm", "vllm_mode": "server", "tensor_parallel_size": 2,
                                             "gpu_memory_utilization": 0.5})
    args = _trl(cfg)
    assert (args.use_vllm, args.vllm_mode, args.vllm_tensor_parallel_size, args.vllm_gpu_memory_utilization) == \
        (True, "server", 2, 0.5)
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(ImportError, match=r"pip install -e '.\[vllm\]'"):
            check_rollout_engine(cfg)


def test_dapo_config_reaches_the_trainer(tiny_model_dir, world_dir, tmp_path):
    trainer = build_rl_trainer(_cfg(world_dir, tmp_path, model=str(tiny_model_dir), algorithm="dapo", max_steps=1))
    args = trainer.args
    assert (args.loss_type, args.epsilon_high, args.beta, args.mask_truncated_completions) == ("dapo", 0.28, 0.0, True)
    assert trainer.dynamic_sampling is True and trainer.reward_func_names == ["format", "accuracy", "soft_overlong"]
    assert trainer.reward_weights.tolist() == [1.0, 1.0, 1.0]
    overlong = trainer.reward_funcs[2].fn
    assert overlong.max_completion_length == 32 and overlong.cache_length == 8
    assert trainer._is_vlm


def test_rl_dataset_carries_reward_columns_and_the_reasoning_prompt(tiny_model_dir, world_dir):
    from patho.models import load_backbone

    processor = load_backbone(tiny_model_dir).processor
    ds = build_rl_dataset(str(world_dir / "rl/train.jsonl"), "SYSTEM", processor)
    row = ds[0]
    assert {"answer", "answer_type", "category", "images", "prompt"} <= set(row)
    assert row["prompt"][0]["role"] == "system" and row["prompt"][0]["content"][0]["text"] == "SYSTEM"
    assert row["images"][0].mode == "RGB"
    short = build_rl_dataset(str(world_dir / "rl/train.jsonl"), "SYSTEM", processor, max_prompt_length=10_000)
    assert len(short) == len(ds)
    with pytest.raises(ValueError, match="no usable prompts"):
        build_rl_dataset(str(world_dir / "rl/train.jsonl"), "SYSTEM", processor, max_prompt_length=10)


def test_bad_rl_config_lists_every_field(world_dir):
    with pytest.raises(ConfigError) as info:
        validate_config(RLPhaseConfig, {"model": "m", "data": str(world_dir / "rl/train.jsonl"), "output_dir": "o",
                                        "algorithm": "ppo", "num_generations": 1, "rewards": "nope"})
    text = str(info.value)
    assert "algorithm" in text and "num_generations" in text and "rewards" in text
