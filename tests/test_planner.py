"""The memory planner (`patho-r1 plan`): DeepSpeed's estimators, hand-computed cases, the recipes, the CLI."""

import dataclasses
import itertools

import pytest
import yaml
from transformers import Qwen2_5_VLConfig

from patho_r1.config import LoraSpec
from patho_r1.errors import ConfigError
from patho_r1.launch import planner
from patho_r1.launch.cli import main
from patho_r1.launch.planner import (
    GIB,
    GPUS,
    KNOWN_CONFIGS,
    DeepSpeedSetup,
    Setup,
    estimate,
    model_shape,
    model_state_rows,
    plan_recipe,
)
from patho_r1.launch.recipe import build_plan, load_plan

SEVEN_B = "Qwen/Qwen2.5-VL-7B-Instruct"
LORA_TARGETS = LoraSpec().target_modules  # the language model's 7 projections


@pytest.fixture(autouse=True)
def planning_from_a_machine_without_a_gpu(monkeypatch):
    """Memory is planned for the recipe's GPUs wherever this runs; the GPU phases' packages are checked where they run
    (tests/test_gpu_stack.py), so the CLI tests here do not depend on what this machine has installed."""
    from patho_r1.launch import preflight

    monkeypatch.setattr(preflight, "gpu_here", lambda: False)


@pytest.fixture(scope="module")
def shape_7b():
    return model_shape(Qwen2_5_VLConfig(**KNOWN_CONFIGS[SEVEN_B]))


def test_parameter_counts_are_the_published_checkpoints(shape_7b):
    # The safetensors totals of the Hugging Face checkpoints: 3,754,622,976 and 8,292,166,656 parameters.
    shape_3b = model_shape(Qwen2_5_VLConfig(**KNOWN_CONFIGS["Qwen/Qwen2.5-VL-3B-Instruct"]))
    assert shape_3b.total == 3_754_622_976  # tied embeddings counted once
    assert shape_7b.total == 8_292_166_656
    assert shape_7b.largest_layer == 152_064 * 3584  # the embedding table (ZeRO-3's largest gather)
    # LoRA r=16 on the language model's 7 projections, by hand: per layer r x sum(in + out), 28 layers.
    h, kv, inter = 3584, 512, 18944
    per_layer = (h + h) + 2 * (h + kv) + (h + h) + 2 * (h + inter) + (inter + h)
    assert shape_7b.lora_parameters(LORA_TARGETS, 16) == 16 * per_layer * 28
    assert shape_7b.lora_parameters(["q_proj"], 1) == 28 * (h + h)  # suffix match; the vision tower has none


@pytest.mark.parametrize(("total", "largest", "world"), [(3_754_622_976, 311_164_928, 8), (8_292_166_656,
                         544_997_376, 8), (8_292_166_656, 544_997_376, 16), (1_000_003, 4_099, 1), (7_600_000_000,
                         550_000_000, 3)])
def test_our_zero_formulas_agree_with_deepspeeds_estimators(total, largest, world):
    pytest.importorskip("deepspeed")  # installed by `make test` (the Makefile's EXTRAS)
    zero2, zero3 = planner.deepspeed_estimators()
    for offload in (False, True):
        assert planner.zero2_formula(total, world, offload) == zero2(total, num_gpus_per_node=world,
                                                                     cpu_offload=offload)[1]
    for opt, params in itertools.product((False, True), repeat=2):
        if params and not opt:
            continue  # DeepSpeed offloads parameters only together with the optimizer
        ours = planner.zero3_formula(total, largest, world, opt, params)
        assert ours == zero3(total, largest, num_gpus_per_node=world, cpu_offload=opt, cpu_offload_params=params)[1]


def _setup(**kw):
    base = dict(kind="sft", world=1, micro_batch=1, grad_accum=1, seq_tokens=1024, logit_tokens=1024, patches=1024,
                checkpointing=True, compute_bytes=2, fp32_masters=True, trainable=0, lora=False, deepspeed=None)
    return Setup(**{**base, **kw})


def test_model_states_by_hand(shape_7b):
    p = shape_7b.total

    def states(**kw):
        return sum(r.bytes for r in model_state_rows(_setup(**kw), shape_7b))

    # fp32 masters without DeepSpeed: weights 4 + grads 4 + AdamW 8 + autocast copies 2 = 18 B/param; DDP adds 4.
    assert states(trainable=p) == 18 * p
    assert states(trainable=p, world=8) == 22 * p
    # a frozen vision tower: its fp32 weights stay, its 14 B of training state go
    t = p - shape_7b.vision
    assert states(trainable=t) == 4 * p + 14 * t
    # LoRA: the base in bf16, the adapters at 16 B/param
    a = shape_7b.lora_parameters(LORA_TARGETS, 16)
    assert states(trainable=a, lora=True, fp32_masters=False) == 2 * p + 16 * a
    # ZeRO-3 with every parameter training is DeepSpeed's estimator (or its formula): 4 x largest + 18 P / N
    assert states(trainable=p, world=8, deepspeed=DeepSpeedSetup(3), fp32_masters=False) == \
        4 * shape_7b.largest_layer + int(18 * p / 8)
    # ZeRO-3 with LoRA: the frozen 16-bit base sharded too
    assert states(trainable=a, lora=True, world=8, deepspeed=DeepSpeedSetup(3), fp32_masters=False) == \
        4 * shape_7b.largest_layer + 2 * (p - a) // 8 + 18 * a // 8
    assert states(trainable=p, world=8, deepspeed=DeepSpeedSetup(2), fp32_masters=False) == 2 * p + int(18 * p / 8)


def test_activations_by_hand_and_what_changes_them(shape_7b):
    s = _setup(trainable=shape_7b.total, micro_batch=2, seq_tokens=1000, logit_tokens=1000, patches=400)
    rows = {r.name: r.bytes for r in planner.ActivationModel.rows(s, shape_7b)}
    h, kv, inter, layers = 3584, 512, 18944, 28
    text_layer = 2 * (6 * h + 4 * kv + 4 * inter) + 8 * h
    vision_block = 2 * (10 * 1280 + 4 * 3420) + 8 * 1280
    kept = 2000 * layers * 2 * h + 800 * 32 * 2 * 1280
    assert rows["activations"] == kept + 2 * max(2000 * text_layer, 800 * vision_block)
    assert rows["logits"] == 2 * 1000 * 152_064 * (2 * 2 + 8)  # bf16 logits + grad, fp32 copy + grad
    full = {r.name: r.bytes for r in planner.ActivationModel.rows(dataclasses.replace(s, checkpointing=False),
                                                                  shape_7b)}
    assert full["activations"] == 2000 * layers * text_layer + 800 * 32 * vision_block
    assert full["activations"] > 5 * rows["activations"]


def test_sleep_mode_peak_is_the_larger_of_training_and_generation(shape_7b):
    gpu = GPUS["H100-80GB"]
    s = _setup(kind="rl", trainable=shape_7b.total, world=8, deepspeed=DeepSpeedSetup(3), fp32_masters=False,
               micro_batch=4, seq_tokens=6144, logit_tokens=2048, vllm_share=0.4, rollout_sequences=32,
               rollout_tokens=6144, completion_tokens=2048, num_generations=8)
    awake = estimate("rl", s, shape_7b, gpu, 0.35)
    asleep = estimate("rl", dataclasses.replace(s, sleep_mode=True), shape_7b, gpu, 0.35)
    rows = {r.name: r.bytes for r in awake.rows}
    share = int(0.4 * gpu.memory_bytes)
    assert rows["vLLM colocate share"] == share
    states, acts = rows["model states"], rows["activations"] + rows["logits"]
    assert awake.peak == states + acts + share + planner.RUNTIME_RESERVE
    assert asleep.peak == max(states + acts, states + share) + planner.RUNTIME_RESERVE
    # a share below its bf16 weights cannot start the engine, and the plan says so
    tiny_share = estimate("rl", dataclasses.replace(s, vllm_share=0.15), shape_7b, gpu, 0.35)
    assert any("cannot start" in n for n in tiny_share.notes)


@pytest.mark.parametrize("recipe", ["recipes/patho-r1-3b.yaml", "recipes/patho-r1-7b.yaml"])
def test_the_gpu_recipes_fit_eight_80gb_gpus_with_margin(recipe):
    memory = plan_recipe(load_plan(recipe), gpu_name="H100-80GB")
    planned = [p for p in memory.phases if p.setup is not None]
    assert [p.phase for p in planned] == ["cpt", "sft", "rl"]
    for p in planned:
        assert p.setup.world == 8
        assert p.fits and p.capacity - p.peak > 10 * GIB, (p.phase, p.peak / GIB)


def test_the_old_7b_rl_phase_does_not_fit_and_the_error_names_fixes_that_do(tmp_path):
    raw = yaml.safe_load(open("recipes/patho-r1-7b.yaml"))
    rl = next(p for p in raw["phases"] if p["name"] == "rl")
    rl["resources"] = {"deepspeed": None}  # what the recipe said before the planner
    rl["config"].update(per_device_train_batch_size=8, gradient_accumulation_steps=4)
    memory = plan_recipe(build_plan(raw, source="old-7b"), gpu_name="H100-80GB")
    (misfit,) = memory.misfits
    assert misfit.phase == "rl" and misfit.peak > 200 * GIB  # fp32 masters, grads, AdamW and DDP buckets
    assert misfit.fixes and all(peak <= misfit.capacity for _, peak in misfit.fixes)
    assert any("ZeRO-3" in change for change, _ in misfit.fixes)
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["plan", str(path)]) == 2
    assert main(["plan", str(path), "--force"]) == 0


def test_plan_and_dry_run_print_the_table(capsys):
    assert main(["plan", "recipes/patho-r1-7b.yaml", "--gpu", "H200"]) == 0
    out = capsys.readouterr().out
    assert "GPU: H200" in out and "KL reference model" in out and "vLLM colocate share" in out
    assert "Setting accelerator" not in out  # DeepSpeed's import warning is silenced
    assert main(["run", "recipes/demo.yaml", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "memory plan: recipes/demo.yaml" in out and "peak per worker" in out and "tiny random-init" in out
    assert main(["plan", "recipes/demo.yaml", "--gpu", "B300"]) == 2
    assert main(["plan", "recipes/patho-r1-3b.yaml", "--mfu", "0"]) == 2  # a one-line error, not a ZeroDivisionError
    assert "--mfu 0.0 is not a fraction" in capsys.readouterr().err


def test_unknown_models_and_gpus_are_one_line_errors(tmp_path):
    raw = yaml.safe_load(open("recipes/patho-r1-3b.yaml"))
    raw["model"]["base"] = "someone/unknown-vl"
    with pytest.raises(ConfigError, match="no config.json for 'someone/unknown-vl' offline"):
        plan_recipe(build_plan(raw, source="x"))
    raw["resources"]["gpu_type"] = "H300"
    with pytest.raises(ConfigError, match="gpu_type: unknown GPU 'H300'"):
        build_plan(raw, source="x")


def test_the_homie_recipe_fits_only_with_gradient_checkpointing(tmp_path):
    """The embedding head runs a GradCache chunk of 8 native-resolution images (1,280 tokens each) through 28 layers:
    with every layer's activations kept that is ~168 GiB; checkpointed, 37."""
    memory = plan_recipe(load_plan("recipes/homie-7b.yaml"))
    (embed,) = memory.phases
    assert embed.setup.lora and embed.setup.checkpointing and embed.fits
    assert embed.tokens_per_step == 2 * 48 * 8 * (1280 + planner.EMBED_TEXT_TOKENS)  # both sides, every rank
    assert "logits" not in {r.name for r in embed.rows}  # no LM head runs
    raw = yaml.safe_load(open("recipes/homie-7b.yaml"))
    raw["phases"][0]["config"]["gradient_checkpointing"] = False
    (misfit,) = plan_recipe(build_plan(raw, source="homie")).misfits
    assert misfit.peak > 2 * embed.peak and misfit.fixes[0][0] == "gradient_checkpointing: true"
