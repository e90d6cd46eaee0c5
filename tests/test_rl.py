"""The RL config's mapping onto TRL, rollout-engine selection, and the dataset that reaches the rewards."""

import pytest

from patho_r1.config import validate_config
from patho_r1.errors import ConfigError
from patho_r1.rl.config import RLPhaseConfig, to_grpo_config
from patho_r1.rl.data import build_rl_dataset
from patho_r1.rl.grpo import build_rl_trainer, check_rollout_engine


def _cfg(world_dir, tmp_path, **over):
    base = dict(model="unused", data=str(world_dir / "rl/train.jsonl"), output_dir=str(tmp_path / "rl"),
                per_device_train_batch_size=8, num_generations=4, max_completion_length=32,
                wandb={"mode": "disabled"})
    base.update(over)
    return RLPhaseConfig(**base)


def _trl(cfg):
    from patho_r1.training import training_arguments

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
    from patho_r1.models import load_backbone

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


def test_trl_block_reaches_grpo_config_and_bad_keys_fail(world_dir, tmp_path):
    args = _trl(_cfg(world_dir, tmp_path, trl={"max_grad_norm": 0.25, "top_k": 7, "repetition_penalty": 1.1,
                                               "vllm_importance_sampling_correction": False}))
    assert (args.max_grad_norm, args.top_k, args.repetition_penalty) == (0.25, 7, 1.1)
    assert args.vllm_importance_sampling_correction is False
    with pytest.raises(ConfigError, match=r"trl\.max_grad_nrom: not a field of trl\.GRPOConfig"):
        validate_config(RLPhaseConfig, {**_cfg(world_dir, tmp_path).model_dump(), "trl": {"max_grad_nrom": 1}})
    with pytest.raises(ConfigError, match=r"trl\.learning_rate: set by this phase's own field 'learning_rate'"):
        validate_config(RLPhaseConfig, {**_cfg(world_dir, tmp_path).model_dump(), "trl": {"learning_rate": 1}})
    with pytest.raises(ConfigError, match=r"trl\.vllm_mode: set by this phase's own field 'rollout'"):
        validate_config(RLPhaseConfig, {**_cfg(world_dir, tmp_path).model_dump(), "trl": {"vllm_mode": "server"}})


def test_trl_block_reaches_sft_config(world_dir, tmp_path):
    from patho_r1.sft.config import SFTPhaseConfig
    from patho_r1.sft.trainer import sft_arguments

    cfg = SFTPhaseConfig(model="m", data=str(world_dir / "sft/train.jsonl"), output_dir=str(tmp_path),
                         wandb={"mode": "disabled"}, trl={"max_grad_norm": 0.5, "optim": "adafactor"})
    args = sft_arguments(cfg, "sft")
    assert (args.max_grad_norm, args.optim) == (0.5, "adafactor")
    with pytest.raises(ConfigError, match=r"trl\.packing: set by this phase's own field"):
        validate_config(SFTPhaseConfig, {**cfg.model_dump(), "trl": {"packing": True}})
    with pytest.raises(ConfigError, match=r"trl\.num_generations: not a field of trl\.SFTConfig"):
        validate_config(SFTPhaseConfig, {**cfg.model_dump(), "trl": {"num_generations": 4}})


def test_the_owned_field_tables_match_what_is_passed_to_trl(world_dir, tmp_path):
    import dataclasses

    from trl import GRPOConfig

    from patho_r1.config import OWNED_TRAINING_ARGUMENTS
    from patho_r1.rl.config import OWNED_GRPO_ARGUMENTS
    from patho_r1.training import training_arguments

    cfg = _cfg(world_dir, tmp_path)
    assert set(training_arguments(cfg, "t")) == set(OWNED_TRAINING_ARGUMENTS)
    grpo_fields = {f.name for f in dataclasses.fields(GRPOConfig)}
    assert set(OWNED_GRPO_ARGUMENTS) <= grpo_fields
    cfg = _cfg(world_dir, tmp_path, temperature=0.5, top_p=0.9, num_iterations=2, beta=0.3)
    defaults, ours = GRPOConfig(**training_arguments(cfg, "t")), _trl(cfg)
    changed = {f for f in grpo_fields if getattr(defaults, f) != getattr(ours, f)}
    assert changed <= set(OWNED_GRPO_ARGUMENTS), changed - set(OWNED_GRPO_ARGUMENTS)


def test_soft_overlong_limit_and_filter_metric_are_checked_at_config_time(world_dir, tmp_path):
    base = _cfg(world_dir, tmp_path).model_dump()
    with pytest.raises(ConfigError, match=r"rewards\.2\.max_completion_length: 64 disagrees with the phase's "
                                          r"max_completion_length \(32\)"):
        validate_config(RLPhaseConfig, {**base, "rewards": [{"name": "format"}, {"name": "accuracy"},
                                                            {"name": "soft_overlong", "max_completion_length": 64}]})
    with pytest.raises(ConfigError, match=r"dynamic_sampling\.filter_metric: 'accuracy' is not one of this phase's "
                                          r"rewards \(format\) or 'total'"):
        validate_config(RLPhaseConfig, {**base, "rewards": [{"name": "format"}], "dynamic_sampling": None})
    ok = validate_config(RLPhaseConfig, {**base, "rewards": [{"name": "format"}], "dynamic_sampling": None,
                                         "algorithm": "grpo"})
    assert ok.dynamic_sampling.enabled is False


def test_bad_reward_specs_fail_at_validation_before_any_model_loads(world_dir, tmp_path):
    base = _cfg(world_dir, tmp_path).model_dump()
    with pytest.raises(ConfigError) as info:
        validate_config(RLPhaseConfig, {**base, "rewards": [{"name": "format"}, {"name": "acuracy"},
                                                            {"name": "accuracy", "mcq_mod": "x"},
                                                            {"name": "os:system", "weight": 1.0}]})
    text = str(info.value)
    assert "rewards.1.name: unknown reward 'acuracy'" in text and "'mcq_mod'" in text and "os:system" in text


def _image_forms(world_dir):
    import base64

    path = world_dir / "images/tile_000000.png"
    raw = path.read_bytes()
    b64 = base64.b64encode(raw).decode()
    return {"path": str(path), "base64": b64, "data_uri": "data:image/png;base64," + b64,
            "hf_dict": {"bytes": raw, "path": None}}


@pytest.mark.parametrize("form", ["path", "base64", "data_uri", "hf_dict"])
def test_every_image_form_reaches_the_rl_and_sft_datasets(world_dir, tmp_path, form):
    """Base64 in RL data once failed with "File name too long": `datasets.Image` reads every string as a path."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from patho_r1.sft.data import conversation_rows, to_dataset

    ref = _image_forms(world_dir)[form]
    mcq = {"question": "Which?", "options": {"A": "x", "B": "y"}, "answer": "A", "images": [ref]}
    conversation = {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]},
                                 {"role": "assistant", "content": "<think>t</think><answer>A</answer>"}],
                    "images": [ref]}
    if form == "hf_dict":  # bytes do not go into JSON; HF exports carry them in Parquet
        rl_file, sft_file = tmp_path / "rl.parquet", None
        pq.write_table(pa.Table.from_pylist([mcq]), rl_file)
    else:
        rl_file, sft_file = tmp_path / "rl.jsonl", tmp_path / "sft.jsonl"
        rl_file.write_text(json.dumps(mcq) + "\n")
        sft_file.write_text(json.dumps(conversation) + "\n")
    rows = build_rl_dataset(str(rl_file), "SYSTEM")
    assert rows[0]["images"][0].size == (56, 56)
    if sft_file is not None:
        sft = to_dataset(conversation_rows, source=str(sft_file))
        from patho_r1.data import load_image

        assert load_image(sft[0]["images"][0]).size == (56, 56)


def test_an_empty_training_file_is_a_clear_error(tmp_path):
    from patho_r1.errors import DataError
    from patho_r1.sft.data import conversation_rows, to_dataset

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="empty.jsonl: no rows to train on"):
        to_dataset(conversation_rows, source=str(empty))
    with pytest.raises(DataError, match="empty.jsonl: no rows to train on"):
        build_rl_dataset(str(empty), "SYSTEM")


# ----------------------------------------------------------------------------------------------------------------------
# The colocated vLLM engine: one pixel budget for both processors, no encoder cache left after a rollout
# ----------------------------------------------------------------------------------------------------------------------

BUDGET = {"min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 9}  # 4..9 merged tokens; the tiny model's own is 4..16


def test_colocated_vllm_is_built_with_the_hf_processors_pixel_budget(tiny_model_dir, world_dir, tmp_path,
                                                                      monkeypatch):
    """TRL's real `VLLMGeneration._init_vllm` runs, with a stand-in for `vllm.LLM` that records its arguments."""
    from trl.generation import vllm_generation

    from patho_r1.rl import grpo

    built = []

    class RecordingLLM:
        def __init__(self, **kwargs):
            built.append(kwargs)

    monkeypatch.setattr(vllm_generation, "LLM", RecordingLLM, raising=False)
    monkeypatch.setattr(vllm_generation, "is_vllm_available", lambda *a, **k: True)
    monkeypatch.setattr(grpo, "check_rollout_engine", lambda cfg: None)
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):  # TRL sets them for vLLM
        monkeypatch.delenv(name, raising=False)
    cfg = _cfg(world_dir, tmp_path, model=str(tiny_model_dir), max_steps=1, **BUDGET,
               rollout={"engine": "vllm", "vllm_mode": "colocate"})
    trainer = build_rl_trainer(cfg)
    (kwargs,) = built
    assert kwargs["mm_processor_kwargs"] == BUDGET  # vLLM's processor ...
    assert trainer.processing_class.image_processor.size == {"shortest_edge": BUDGET["min_pixels"],  # ... and HF's
                                                             "longest_edge": BUDGET["max_pixels"]}
    assert vllm_generation.LLM is RecordingLLM  # the wrapper lived only while the trainer was built


def test_placeholder_count_equals_the_grid_count_on_both_sides_of_the_hand_off(tiny_model_dir):
    """The HF processor's image tokens per image = its grid's merged patches = what vLLM's Qwen2-VL processor counts
    (`_get_vision_info`: smart_resize with the min/max pixels it is handed, then patches // merge**2)."""
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    from patho_r1.models import load_processor
    from patho_r1.rl.vllm_engine import vllm_processor_kwargs

    processor = load_processor(tiny_model_dir, **BUDGET)
    vllm_kwargs = vllm_processor_kwargs(processor)
    assert vllm_kwargs == BUDGET
    merge, patch = processor.image_processor.merge_size, processor.image_processor.patch_size

    def vllm_count(width: int, height: int, budget: dict) -> int:
        h, w = smart_resize(height, width, factor=patch * merge, **budget)
        return (h // patch) * (w // patch) // merge**2

    prompt = f"<|vision_start|>{processor.image_token}<|vision_end|>Which tissue?"
    sizes = [(20, 30), (56, 84), (300, 200), (1000, 90)]  # below min_pixels, inside, above max_pixels, extreme ratio
    for width, height in sizes:
        out = processor(text=[prompt], images=[Image.new("RGB", (width, height))], return_tensors="pt")
        hf_count = int((out["input_ids"] == processor.image_token_id).sum())
        grid_count = int(out["image_grid_thw"][0].prod()) // merge**2
        assert hf_count == grid_count == vllm_count(width, height, vllm_kwargs), (width, height)
    # The check has teeth: at the tiny model's own budget vLLM would count other numbers for some of these images.
    own = {"min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 16}
    assert any(vllm_count(w, h, own) != vllm_count(w, h, vllm_kwargs) for w, h in sizes)


def test_encoder_cache_is_cleared_through_vllms_reset_or_its_internals():
    from types import SimpleNamespace as NS

    from patho_r1.rl.vllm_engine import clear_vllm_encoder_cache, vllm_encoder_cache_entries

    calls = []
    clear_vllm_encoder_cache(NS(llm_engine=NS(reset_encoder_cache=lambda: calls.append("reset"))))
    assert calls == ["reset"]

    # An engine without `reset_encoder_cache`: EasyR1's reset of the runner's dict and the scheduler's manager.
    runner = NS(encoder_cache={"img-a": object(), "img-b": object()})
    manager = NS(cache_size=8, num_free_slots=2, num_freeable_slots=2, cached={"img-a": {1}}, freeable={}, freed=[1])
    scheduler = NS(encoder_cache_manager=manager, has_unfinished_requests=lambda: False)
    llm = NS(llm_engine=NS(model_executor=NS(driver_worker=NS(worker=NS(model_runner=runner))),
                           engine_core=NS(engine_core=NS(scheduler=scheduler))))
    assert vllm_encoder_cache_entries(llm) == 2
    clear_vllm_encoder_cache(llm)
    assert vllm_encoder_cache_entries(llm) == 0
    assert (manager.num_free_slots, manager.num_freeable_slots, manager.cached, manager.freed) == (8, 8, {}, [])
    assert vllm_encoder_cache_entries(NS()) is None  # no engine internals found: said, not guessed
