"""The memory and throughput planner: will each phase of a recipe fit its GPUs, and how long is a step?

    patho-r1 plan recipes/patho-r1-7b.yaml [--gpu H100-80GB] [--mfu 0.35] [--force]
    patho-r1 run RECIPE --dry-run          # prints the same tables

For every training phase it adds up, per GPU: the model states (weights, gradients, optimizer states, split by ZeRO
stage and world size), activations (sequence length, the vision patches `max_pixels` allows, gradient checkpointing),
the logits, the KL reference model and the vLLM colocate share with the KV cache its rollouts need.  A phase that does
not fit is an error naming the changes that would make it fit, each re-planned (`--force` overrides it).

Model states follow DeepSpeed's own estimators (`estimate_zero2/3_model_states_mem_needs`): when DeepSpeed is
installed and every parameter trains, the planner calls them; otherwise it uses the same formulas generalised to
frozen parameters and LoRA (`tests/test_planner.py` checks that both agree).  Activations, logits, the reference
model and vLLM are our own model, stated in `ActivationModel`; `bench/gpu_smoke.py` measures the real peak against it.

Parameter counts are exact: the model is built from its `config.json` on PyTorch's meta device (no memory, ~0.05 s
for 7B).  Configs come from a local checkpoint, the Hugging Face cache, or `KNOWN_CONFIGS` (offline planning of the
published Qwen2.5-VL checkpoints).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from patho_r1.errors import ConfigError
from patho_r1.launch.phases import get_phase

GIB = 1024**3
# What a GPU process holds beyond the tensors counted here: the CUDA context, cuBLAS/NCCL workspaces and buffers.
RUNTIME_RESERVE = int(1.5 * GIB)
# The caching allocator's fragmentation and everything this model leaves out: a phase must plan within this share.
USABLE_FRACTION = 0.92
# vLLM's own activations for one `max_num_batched_tokens=4096` pass (TRL fixes that value) and its CUDA graphs.
VLLM_RESERVE = int(2.0 * GIB)


@dataclass(frozen=True)
class GPUSpec:
    name: str
    memory_bytes: int  # what nvidia-smi reports as total
    bf16_tflops: float  # dense peak
    hbm_tb_s: float


GPUS: dict[str, GPUSpec] = {g.name: g for g in (
    GPUSpec("H100-80GB", 81_559 * 2**20, 989.0, 3.35),
    GPUSpec("H200", 143_771 * 2**20, 989.0, 4.8),
    GPUSpec("A100-80GB", 81_920 * 2**20, 312.0, 2.04),
    GPUSpec("A100-40GB", 40_960 * 2**20, 312.0, 1.56),
    GPUSpec("L40S", 46_068 * 2**20, 362.0, 0.864),
)}
DEFAULT_GPU = "H100-80GB"

# The published checkpoints' config.json layer sizes (huggingface.co/Qwen/Qwen2.5-VL-{3B,7B}-Instruct), so that the
# recipes plan offline.  Anything else needs a local config.json or the Hugging Face cache.
_QWEN25_VL_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                         spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                         fullatt_block_indexes=[7, 15, 23, 31])
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "Qwen/Qwen2.5-VL-3B-Instruct": dict(
        text_config=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
        vision_config=dict(_QWEN25_VL_VISION, out_hidden_size=2048), tie_word_embeddings=True),
    "Qwen/Qwen2.5-VL-7B-Instruct": dict(
        text_config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
        vision_config=dict(_QWEN25_VL_VISION, out_hidden_size=3584), tie_word_embeddings=False),
}


# --------------------------------------------------------------------------------------------------- model shapes


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs of a model, counted exactly from its config."""

    total: int
    vision: int  # the vision tower's blocks and patch embedding
    projector: int  # the patch merger
    largest_layer: int  # the largest single module's own parameters (ZeRO-3 gathers one at a time)
    hidden: int
    layers: int
    kv_dim: int
    intermediate: int
    vocab: int
    vision_hidden: int
    vision_depth: int
    vision_intermediate: int
    linears: tuple[tuple[str, int, int], ...] = field(repr=False)  # (module name, in, out) of every nn.Linear

    @property
    def language(self) -> int:
        return self.total - self.vision - self.projector

    def lora_parameters(self, target_modules: str | list[str], r: int) -> int:
        """LoRA's trainable count: r x (in + out) per targeted Linear, with PEFT's matching (a string is a full-match
        regex over module names; a list matches name suffixes)."""
        if isinstance(target_modules, str):
            hit = lambda name: re.fullmatch(target_modules, name) is not None  # noqa: E731
        else:
            hit = lambda name: any(name == t or name.endswith("." + t) for t in target_modules)  # noqa: E731
        return sum(r * (i + o) for name, i, o in self.linears if hit(name))


def model_shape(config) -> ModelShape:
    """Count a Qwen2-VL-family model's parameters by building it on the meta device."""
    import torch
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    inner = getattr(model, "model", model)
    visual = getattr(inner, "visual", None)
    if visual is None:
        raise ConfigError(f"plan: {type(model).__name__} has no vision tower; the planner knows Qwen2-VL-style models")
    seen: set[int] = set()

    def count(module) -> int:
        n = 0
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
        return n

    projector = count(visual.merger)
    vision = count(visual)
    seen.clear()
    total = count(model)  # tied embeddings once
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    linears = tuple((name, m.in_features, m.out_features) for name, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear))
    text = config.text_config if hasattr(config, "text_config") else config
    vis = config.vision_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return ModelShape(total=total, vision=vision - projector, projector=projector, largest_layer=largest,
                      hidden=text.hidden_size, layers=text.num_hidden_layers,
                      kv_dim=text.num_key_value_heads * head_dim, intermediate=text.intermediate_size,
                      vocab=text.vocab_size, vision_hidden=vis.hidden_size, vision_depth=vis.depth,
                      vision_intermediate=vis.intermediate_size, linears=linears)


def resolve_config(base: str, local_dir: str | None = None):
    """The config of a recipe's base model, offline: a local directory, the HF cache, or `KNOWN_CONFIGS`."""
    from transformers import AutoConfig, Qwen2_5_VLConfig

    for candidate in (local_dir, base):
        if candidate and (Path(candidate) / "config.json").is_file():
            return AutoConfig.from_pretrained(candidate, trust_remote_code=False), f"{candidate}/config.json"
    if base in KNOWN_CONFIGS:
        return Qwen2_5_VLConfig(**KNOWN_CONFIGS[base]), f"{base} (built-in copy of its config.json)"
    try:
        return AutoConfig.from_pretrained(base, local_files_only=True, trust_remote_code=False), f"{base} (HF cache)"
    except (OSError, ValueError):
        raise ConfigError(f"plan: no config.json for {base!r} offline; download it "
                          f"(`hf download {base} config.json`) or give a local checkpoint directory") from None


# ------------------------------------------------------------------------------------------------ the phase setup


@dataclass(frozen=True)
class DeepSpeedSetup:
    stage: int
    offload_optimizer: bool = False
    offload_params: bool = False

    @classmethod
    def read(cls, path: str) -> DeepSpeedSetup:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"deepspeed: not found: {path} (paths are relative to the folder you run from)")
        try:
            zero = json.loads(p.read_text()).get("zero_optimization", {})
        except json.JSONDecodeError as exc:
            raise ConfigError(f"deepspeed: {path} is not valid JSON ({exc})") from None

        def offloaded(key: str) -> bool:
            return (zero.get(key) or {}).get("device", "none") not in ("none", None)

        return cls(stage=int(zero.get("stage", 0)), offload_optimizer=offloaded("offload_optimizer"),
                   offload_params=offloaded("offload_param"))

    def describe(self) -> str:
        off = [w for w, on in (("optimizer", self.offload_optimizer), ("params", self.offload_params)) if on]
        return f"ZeRO-{self.stage}" + (f" (offload {'+'.join(off)})" if off else "")


@dataclass(frozen=True)
class Setup:
    """Everything about one phase that decides its memory and step time; fixes are `dataclasses.replace` of it."""

    kind: str  # cpt | sft | rl
    world: int  # data-parallel ranks (GPUs)
    micro_batch: int  # sequences per rank per forward/backward
    grad_accum: int
    seq_tokens: int  # tokens per sequence, image tokens included
    logit_tokens: int  # positions whose logits are materialised (every position; RL: the completion only)
    patches: int  # vision patches per sequence (before the 2x2 merge)
    checkpointing: bool
    compute_bytes: int  # 2 (bf16/fp16) or 4
    fp32_masters: bool  # weights held in fp32 under autocast (no DeepSpeed, no LoRA; patho_r1.training.precision)
    trainable: int
    lora: bool
    deepspeed: DeepSpeedSetup | None
    reference: bool = False  # beta > 0 without LoRA: a frozen copy of the policy
    vllm_share: float | None = None  # gpu_memory_utilization of a colocated engine
    sleep_mode: bool = False
    tensor_parallel: int = 1
    rollout_sequences: int = 0  # completions one rank's engine holds at once
    rollout_tokens: int = 0  # prompt + completion per rollout sequence
    completion_tokens: int = 0
    num_generations: int = 0


@dataclass
class Row:
    name: str
    bytes: int
    note: str = ""


@dataclass
class PhaseEstimate:
    phase: str
    kind: str
    setup: Setup | None
    rows: list[Row]
    peak: int
    capacity: int | None  # usable bytes per GPU; None on CPU (not checked)
    tokens_per_step: int = 0
    step_seconds: float | None = None
    rollout_seconds: float | None = None
    notes: list[str] = field(default_factory=list)
    fixes: list[tuple[str, int]] = field(default_factory=list)  # (change, peak after it) for changes that fit

    @property
    def fits(self) -> bool:
        return self.capacity is None or self.peak <= self.capacity


@functools.cache
def deepspeed_estimators():
    """DeepSpeed's two model-state estimators, or None without DeepSpeed.  Its import warns on stdout that it found
    no GPU ("Setting accelerator to CPU"), which is true and useless on the machine one plans on: silenced."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    except ImportError:
        return None
    finally:
        logging.disable(previous)
    return estimate_zero2_model_states_mem_needs, estimate_zero3_model_states_mem_needs


def zero2_formula(total: int, world: int, offload: bool) -> int:
    """DeepSpeed's ZeRO-2 GPU bytes: 16-bit weights on every rank (2 B/param), plus 18 B/param sharded (16-bit and
    fp32 gradients, fp32 weights, Adam's m and v); with the optimizer offloaded, the 16-bit weights only."""
    return 2 * total if offload else 2 * total + int(18 * total / world)


def zero3_formula(total: int, largest: int, world: int, offload_optimizer: bool, offload_params: bool) -> int:
    """DeepSpeed's ZeRO-3 GPU bytes: the largest layer gathered in fp32-sized buffers (4 B/param) plus 18 B/param
    sharded; offloading the optimizer leaves the 16-bit weights (2 B/param, sharded), offloading them too, nothing."""
    if offload_optimizer:
        return 4 * largest + (0 if offload_params else int(2 * total / world))
    return 4 * largest + int(18 * total / world)


def zero2_gpu_bytes(total: int, world: int, offload: bool) -> int:
    """DeepSpeed's `estimate_zero2_model_states_mem_needs` where DeepSpeed is installed, else its formula."""
    ds = deepspeed_estimators()
    if ds is None:
        return zero2_formula(total, world, offload)
    return ds[0](total, num_gpus_per_node=world, cpu_offload=offload)[1]


def zero3_gpu_bytes(total: int, largest: int, world: int, offload_optimizer: bool, offload_params: bool) -> int:
    """DeepSpeed's `estimate_zero3_model_states_mem_needs` where DeepSpeed is installed, else its formula."""
    ds = deepspeed_estimators()
    if ds is None:
        return zero3_formula(total, largest, world, offload_optimizer, offload_params)
    return ds[1](total, largest, num_gpus_per_node=world, cpu_offload=offload_optimizer,
                 cpu_offload_params=offload_params)[1]


def _states_source() -> str:
    return "DeepSpeed's estimator" if deepspeed_estimators() else "DeepSpeed's formula (DeepSpeed not installed)"


def model_state_rows(setup: Setup, shape: ModelShape) -> list[Row]:
    """Weights, gradients and optimizer states on one GPU.

    * No DeepSpeed, full training: fp32 weights (4 B/param, frozen ones too), fp32 gradients and AdamW's m and v
      (4 + 8 B per trainable param), plus the bf16 copies autocast caches during a step (2 B per trainable param).
      More than one rank adds DDP's fp32 gradient buckets (4 B per trainable param).
    * No DeepSpeed, LoRA: the base in the compute dtype, the adapters at 16 B/param (PEFT keeps them fp32).
    * DeepSpeed ZeRO-2/3: DeepSpeed's own estimator when every parameter trains; with frozen parameters or LoRA the
      same formula, with the 18 B of trainable state only for the trainable ones.
    """
    p, t, n = shape.total, setup.trainable, setup.world
    ds = setup.deepspeed
    if ds is None or ds.stage == 0:
        rows = []
        if setup.lora:
            rows.append(Row("weights", setup.compute_bytes * p, "frozen base in the compute dtype"))
            rows.append(Row("trainable weights+grads+AdamW", 16 * t, "fp32 (LoRA adapters, trained copies), "
                            "16 B/param"))
        else:
            wbytes = 4 if setup.fp32_masters or setup.compute_bytes == 4 else setup.compute_bytes
            kind = "fp32 masters" if setup.fp32_masters else ("fp32" if wbytes == 4 else "half precision")
            rows.append(Row("weights", wbytes * p, f"{kind}, {wbytes} B/param"))
            rows.append(Row("gradients", wbytes * t, f"{wbytes} B/trainable param"))
            rows.append(Row("AdamW states", 8 * t, "fp32 m and v, 8 B/trainable param"))
            if setup.fp32_masters:
                rows.append(Row("autocast weight copies", 2 * t, "bf16 casts cached during a step"))
        if n > 1 and setup.kind != "embed":  # the embedding head averages its gradients itself
            rows.append(Row("DDP gradient buckets", 4 * t, "fp32, a second copy of the gradients"))
        return rows
    full = t == p and not setup.lora
    if ds.stage in (1, 2):
        if ds.stage == 2 and full:
            return [Row("model states", zero2_gpu_bytes(p, n, ds.offload_optimizer),
                        f"{ds.describe()}, {_states_source()}")]
        opt = 0 if ds.offload_optimizer else (18 * t // n if ds.stage == 2 else (2 * t + 16 * t // n))
        return [Row("model states", 2 * p + opt, f"{ds.describe()}: 16-bit weights on every rank, "
                    f"{'offloaded' if ds.offload_optimizer else 'sharded'} trainable states")]
    if full:
        return [Row("model states", zero3_gpu_bytes(p, shape.largest_layer, n, ds.offload_optimizer,
                                                     ds.offload_params), f"{ds.describe()}, {_states_source()}")]
    frozen = 0 if ds.offload_params else 2 * (p - t) // n
    trained = 0 if ds.offload_optimizer and ds.offload_params else (2 * t // n if ds.offload_optimizer
                                                                   else 18 * t // n)
    return [Row("model states", 4 * shape.largest_layer + frozen + trained,
                f"{ds.describe()}: everything sharded over {n} ranks, plus the largest layer gathered")]


class ActivationModel:
    """Bytes autograd keeps per token, for a Qwen2-style decoder layer and a Qwen2.5-VL vision block.

    A decoder layer saves, in the compute dtype: the two RMSNorm outputs, q, k, v (rotary inputs and outputs), the
    attention output and o_proj's input (about 6h + 4kv), the MLP's gate, up, SiLU and product (4I); and the two
    RMSNorm inputs in fp32 (8h).  Flash/SDPA attention keeps no s x s matrix.  With gradient checkpointing a layer
    keeps only its input (h), and one layer is recomputed with its gradients at a time (twice its full size).
    Vision blocks are the same with kv = h (no GQA).  The logits are counted apart (see `rows`).
    """

    @staticmethod
    def text_layer(shape: ModelShape, a: int) -> int:
        return a * (6 * shape.hidden + 4 * shape.kv_dim + 4 * shape.intermediate) + 8 * shape.hidden

    @staticmethod
    def vision_block(shape: ModelShape, a: int) -> int:
        return a * (10 * shape.vision_hidden + 4 * shape.vision_intermediate) + 8 * shape.vision_hidden

    @classmethod
    def rows(cls, setup: Setup, shape: ModelShape) -> list[Row]:
        a, b = setup.compute_bytes, setup.micro_batch
        tokens, patches = b * setup.seq_tokens, b * setup.patches
        text, vision = cls.text_layer(shape, a), cls.vision_block(shape, a)
        if setup.checkpointing:
            kept = tokens * shape.layers * a * shape.hidden + patches * shape.vision_depth * a * shape.vision_hidden
            working = 2 * max(tokens * text, patches * vision)
            acts = Row("activations", kept + working, f"checkpointed: layer inputs + one layer recomputed "
                       f"({b} x {setup.seq_tokens} tokens, {setup.patches} patches/seq)")
        else:
            acts = Row("activations", tokens * shape.layers * text + patches * shape.vision_depth * vision,
                       f"every layer ({b} x {setup.seq_tokens} tokens, {setup.patches} patches/seq)")
        # SFT/CPT: transformers' loss upcasts the logits to fp32 (a copy and its gradient beside the half-precision
        # logits and theirs); RL: TRL divides by the temperature and log-softmaxes them row by row, in their dtype.
        per_logit = 4 * a if setup.kind == "rl" else 2 * a + (8 if a == 2 else 0)
        if not setup.logit_tokens:
            return [acts]  # the embedding head reads the last hidden state; no LM head runs
        logits = Row("logits", b * setup.logit_tokens * shape.vocab * per_logit,
                     f"{b} x {setup.logit_tokens} positions x {shape.vocab} vocab")
        return [acts, logits]


def vllm_rows(setup: Setup, shape: ModelShape, gpu: GPUSpec) -> tuple[int, list[Row], list[str]]:
    """The colocated engine's share, and whether its weights and the rollouts' KV cache fit in it."""
    share = int(setup.vllm_share * gpu.memory_bytes)
    weights = 2 * shape.total // setup.tensor_parallel
    kv_per_token = 2 * shape.layers * shape.kv_dim * 2 // setup.tensor_parallel
    kv_needed = setup.rollout_sequences * setup.rollout_tokens * kv_per_token
    kv_budget = share - weights - VLLM_RESERVE
    notes = []
    if kv_budget < 0:
        notes.append(f"vLLM: gpu_memory_utilization {setup.vllm_share} gives {share / GIB:.1f} GiB, less than its "
                     f"weights and reserve ({(weights + VLLM_RESERVE) / GIB:.1f} GiB): the engine cannot start")
    elif kv_budget < kv_needed:
        notes.append(f"vLLM: the KV cache ({kv_budget / GIB:.1f} GiB) holds {kv_budget / kv_needed:.0%} of the "
                     f"{setup.rollout_sequences} rollouts' {kv_needed / GIB:.1f} GiB: vLLM will queue or preempt "
                     "sequences, and rollouts get slower")
    row = Row("vLLM colocate share", share, f"{setup.vllm_share} x GPU: weights {weights / GIB:.1f} GiB, KV cache "
              f"{max(kv_budget, 0) / GIB:.1f} GiB for {kv_needed / GIB:.1f} GiB of rollouts")
    return share, [row], notes


def estimate(phase: str, setup: Setup, shape: ModelShape, gpu: GPUSpec | None, mfu: float) -> PhaseEstimate:
    states = model_state_rows(setup, shape)
    activations = ActivationModel.rows(setup, shape)
    rows = states + activations
    resident = sum(r.bytes for r in states)
    if setup.reference:
        ds = setup.deepspeed
        # TRL prepares the reference model with ZeRO-3 inference when the policy uses ZeRO-3, else it is replicated.
        ref = 2 * shape.total // setup.world if ds is not None and ds.stage == 3 else setup.compute_bytes * shape.total
        rows.append(Row("KL reference model", ref, "frozen, compute dtype"))
        resident += ref
    training = resident + sum(r.bytes for r in activations)
    notes: list[str] = []
    peak = training
    if setup.vllm_share and gpu is not None:
        share, vrows, vnotes = vllm_rows(setup, shape, gpu)
        rows += vrows
        notes += vnotes
        if setup.sleep_mode:
            # TRL 1.16 puts the engine to sleep at level 2 (weights and KV cache released) outside generation, so the
            # share and the training activations are never resident together.
            peak = max(training, resident + share)
            notes.append("vLLM sleep mode: the share is released during the training step (peak = the larger of "
                         "training and generation)")
        else:
            peak = training + share
    if gpu is not None:
        rows.append(Row("CUDA context, NCCL, workspaces", RUNTIME_RESERVE))
        peak += RUNTIME_RESERVE
    image_tokens = setup.patches // 4
    if image_tokens > setup.seq_tokens - (setup.completion_tokens or 0):
        notes.append(f"an image at max_pixels is {image_tokens:,} tokens, more than the {setup.seq_tokens:,}-token "
                     "limit it must fit in: lower max_pixels or raise the length limit")
    sequences = setup.micro_batch * setup.grad_accum * setup.world
    tokens = sequences * setup.seq_tokens
    est = PhaseEstimate(phase=phase, kind=setup.kind, setup=setup, rows=rows, peak=peak,
                        capacity=int(gpu.memory_bytes * USABLE_FRACTION) if gpu else None,
                        tokens_per_step=tokens, notes=notes)
    if gpu is not None:
        # 6 N FLOPs per token (the MFU convention), at the stated MFU.
        est.step_seconds = 6 * shape.total * tokens / (setup.world * gpu.bf16_tflops * 1e12 * mfu)
        if setup.kind == "rl":
            # Decoding is memory-bound: each of the completion's tokens reads the weights once, at ~60% of HBM.
            per_rank = 2 * shape.total / setup.tensor_parallel
            est.rollout_seconds = setup.completion_tokens * per_rank / (gpu.hbm_tb_s * 1e12 * 0.6)
    return est


# ------------------------------------------------------------------------------------------- from recipe to setup


def vision_patches(max_pixels: int) -> int:
    """Vision-tower patches of an image at `max_pixels`: one merged token per 28 x 28 pixels, four 14-px patches
    each."""
    return 4 * math.ceil(max_pixels / (28 * 28))
# Qwen2-VL's image processor's max_pixels when a phase sets none (16,384 merged tokens): the planner's upper bound.
PROCESSOR_MAX_PIXELS = 12_845_056


def phase_setup(planned, shape: ModelShape, world: int, default_max_pixels: int = PROCESSOR_MAX_PIXELS) -> Setup | None:
    """A phase's Setup from its validated config, by its type's `plan` hook (the phase table); None for phase types
    the planner does not model.  `default_max_pixels`: the image processor's, for phases that set no max_pixels."""
    setup = get_phase(planned.type).hook("plan")
    if setup is None or planned.config is None:
        return None
    return setup(planned, shape, world, default_max_pixels)


def _trainer_common(planned, shape: ModelShape, world: int, default_max_pixels: int) -> dict:
    """What every HF-Trainer phase's Setup shares: batch, precision, trainable parameters, DeepSpeed."""
    from patho_r1.training import precision

    cfg = planned.config
    mixed = precision(cfg, on_cpu=not planned.resources.use_gpu)
    ds = DeepSpeedSetup.read(cfg.deepspeed) if cfg.deepspeed else None
    if cfg.lora is not None:
        trainable = shape.lora_parameters(cfg.lora.target_modules, cfg.lora.r)
    else:
        trainable = shape.total - (shape.vision if cfg.freeze_vision_tower else 0) \
            - (shape.projector if cfg.freeze_projector else 0)
    return dict(world=world, micro_batch=cfg.per_device_train_batch_size,
                grad_accum=cfg.gradient_accumulation_steps,
                patches=vision_patches(cfg.max_pixels or default_max_pixels),
                checkpointing=cfg.gradient_checkpointing, compute_bytes=4 if mixed.compute == "float32" else 2,
                fp32_masters=mixed.weights == "float32" and mixed.compute != "float32", trainable=trainable,
                lora=cfg.lora is not None, deepspeed=ds)


def trainer_setup(planned, shape: ModelShape, world: int, default_max_pixels: int) -> Setup:
    """The `plan` hook of a supervised HF-Trainer phase (cpt, sft): every position of every sequence is a logit."""
    seq = planned.config.max_length or 2048
    return Setup(kind=planned.type, seq_tokens=seq, logit_tokens=seq,
                 **_trainer_common(planned, shape, world, default_max_pixels))


def rl_setup(planned, shape: ModelShape, world: int, default_max_pixels: int) -> Setup:
    """The `plan` hook of the RL phase: prompt plus completion, logits of the completion only, the KL reference
    model and the vLLM colocate share with its rollouts."""
    cfg = planned.config
    prompt = cfg.max_prompt_length or (cfg.max_length or 2048)
    vllm = cfg.rollout.engine == "vllm" and cfg.rollout.vllm_mode == "colocate"
    steps_per_gen = cfg.steps_per_generation or cfg.gradient_accumulation_steps
    return Setup(kind="rl", seq_tokens=prompt + cfg.max_completion_length, logit_tokens=cfg.max_completion_length,
                 reference=bool(cfg.beta) and cfg.lora is None,
                 vllm_share=cfg.rollout.gpu_memory_utilization if vllm else None,
                 sleep_mode=cfg.rollout.enable_sleep_mode, tensor_parallel=cfg.rollout.tensor_parallel_size,
                 rollout_sequences=cfg.per_device_train_batch_size * steps_per_gen,
                 rollout_tokens=prompt + cfg.max_completion_length, completion_tokens=cfg.max_completion_length,
                 num_generations=cfg.num_generations, **_trainer_common(planned, shape, world, default_max_pixels))


def embed_setup(planned, shape: ModelShape, world: int, default_max_pixels: int) -> Setup:
    """The `plan` hook of the embedding head."""
    return _embed_setup(planned.config, shape, world, default_max_pixels, on_cpu=not planned.resources.use_gpu)


# The embedding head's inputs: the summary prompt and a caption, besides the image's tokens (an assumption: the phase
# has no length limit of its own).
EMBED_TEXT_TOKENS = 64


def _embed_setup(cfg, shape: ModelShape, world: int, default_max_pixels: int, on_cpu: bool) -> Setup:
    """The embedding head: a LoRA adapter on the frozen backbone (in the compute dtype), plus the vision tower and
    projector when they train (peft copies them; fp32 masters, 16 B/param).  Activations: stage 2's (else stage 1's)
    GradCache chunk, or without GradCache both sides of its batch, every sequence an image plus
    `EMBED_TEXT_TOKENS`.  No LM head runs, so no logits; gradients are averaged by hand, so no DDP buckets."""
    from patho_r1.training import compute_dtype

    compute = compute_dtype(cfg.dtype, on_cpu)
    trainable = shape.lora_parameters(cfg.lora.target_modules, cfg.lora.r)
    if cfg.train_vision_tower:
        trainable += shape.vision + shape.projector
    elif cfg.train_projector:
        trainable += shape.projector
    largest = cfg.stage2 or cfg.stage1  # stage 2's images dominate; stage 1 is text only
    live = largest.grad_cache_chunk or 2 * largest.batch_size
    chunks = math.ceil(2 * largest.batch_size / live)  # queries and positives, a chunk at a time
    patches = vision_patches(cfg.max_pixels or default_max_pixels) if cfg.stage2 else 0
    return Setup(kind="embed", world=world, micro_batch=live, grad_accum=chunks,
                 seq_tokens=patches // 4 + EMBED_TEXT_TOKENS, logit_tokens=0, patches=patches,
                 checkpointing=cfg.gradient_checkpointing, compute_bytes=4 if compute == "float32" else 2,
                 fp32_masters=False, trainable=trainable, lora=True, deepspeed=None)


def candidate_fixes(setup: Setup, shape: ModelShape) -> list[tuple[str, Setup]]:
    """Changes a user can make in the recipe, most conservative first: each is re-planned, and those that fit are
    named in the error."""
    r = dataclasses.replace
    out: list[tuple[str, Setup]] = []
    if setup.kind == "embed":  # no DeepSpeed path: checkpointing, a smaller GradCache chunk
        if not setup.checkpointing:
            out.append(("gradient_checkpointing: true", r(setup, checkpointing=True)))
        if setup.micro_batch > 1:
            out.append((f"grad_cache_chunk: {setup.micro_batch // 2} (the same contrastive batch)",
                        r(setup, micro_batch=setup.micro_batch // 2)))
        return out
    ds = setup.deepspeed
    if ds is None or ds.stage < 2:
        out.append(("ZeRO-2 (resources.deepspeed: recipes/deepspeed/zero2.json)",
                    r(setup, deepspeed=DeepSpeedSetup(2), fp32_masters=False)))
    if ds is None or ds.stage < 3:
        out.append(("ZeRO-3 (resources.deepspeed: recipes/deepspeed/zero3.json)",
                    r(setup, deepspeed=DeepSpeedSetup(3), fp32_masters=False)))
    elif not ds.offload_optimizer:
        out.append(("ZeRO-3 with the optimizer offloaded to CPU (offload_optimizer: {device: cpu})",
                    r(setup, deepspeed=DeepSpeedSetup(3, offload_optimizer=True))))
    if not setup.checkpointing:
        out.append(("gradient_checkpointing: true", r(setup, checkpointing=True)))
    if setup.micro_batch > 1:
        half = setup.micro_batch // 2
        if setup.kind != "rl" or (half * setup.grad_accum * 2) % max(setup.num_generations, 1) == 0:
            out.append((f"per_device_train_batch_size: {half} with gradient_accumulation_steps: "
                        f"{setup.grad_accum * 2} (same global batch)",
                        r(setup, micro_batch=half, grad_accum=setup.grad_accum * 2)))
    if setup.vllm_share and not setup.sleep_mode:
        out.append(("rollout.enable_sleep_mode: true", r(setup, sleep_mode=True)))
    if setup.vllm_share and setup.vllm_share > 0.25:
        out.append(("rollout.gpu_memory_utilization: 0.25", r(setup, vllm_share=0.25)))
    if not setup.lora:
        from patho_r1.config import LoraSpec

        adapters = shape.lora_parameters(LoraSpec().target_modules, 64)
        out.append(("lora: {r: 64}", r(setup, lora=True, trainable=adapters, fp32_masters=False, reference=False)))
    return out


def _setting(change: str) -> str:
    return change.split(":")[0].split(" ")[0]


def fitting_fixes(phase: str, setup: Setup, shape: ModelShape, gpu: GPUSpec | None, mfu: float,
                  limit: int = 4) -> list[tuple[str, int]]:
    """The single changes that make the phase fit, then pairs of them (the second chosen after the first is
    applied), each with the peak it gives: singles first, each group smallest peak first."""
    singles: list[tuple[str, int]] = []
    pairs: list[tuple[str, int]] = []
    seen: set[frozenset[str]] = set()
    for change, fixed in candidate_fixes(setup, shape):
        after = estimate(phase, fixed, shape, gpu, mfu)
        if after.fits:
            singles.append((change, after.peak))
            seen.add(frozenset([change]))
    for change, fixed in candidate_fixes(setup, shape):
        if frozenset([change]) in seen:
            continue  # it fits alone; adding to it is not a smaller change
        for second, both in candidate_fixes(fixed, shape):
            # a second change of the same setting (two ZeRO stages, two chunk sizes) replaces the first; the same pair
            # in the other order is the same fix
            same = _setting(change) == _setting(second) or (change.startswith("ZeRO") and second.startswith("ZeRO"))
            label = second if same else f"{change} and {second}"
            key = frozenset(label.split(" and "))
            if key in seen or frozenset([second]) in seen:
                continue
            after = estimate(phase, both, shape, gpu, mfu)
            if after.fits:
                seen.add(key)
                pairs.append((label, after.peak))
    return (sorted(singles, key=lambda f: f[1]) + sorted(pairs, key=lambda f: f[1]))[:limit]


@dataclass
class RecipePlan:
    recipe: str
    gpu: GPUSpec | None
    model_source: str
    shape: ModelShape | None  # None: no phase trains the backbone
    phases: list[PhaseEstimate]
    mfu: float

    @property
    def misfits(self) -> list[PhaseEstimate]:
        return [p for p in self.phases if not p.fits]

    def describe(self) -> str:
        s = self.shape
        head = [f"memory plan: {self.recipe}"]
        if s is not None:
            head.append(f"  model: {self.model_source}: {s.total / 1e9:.2f}B parameters (vision {s.vision / 1e9:.2f}B, "
                        f"projector {s.projector / 1e9:.3f}B, largest layer {s.largest_layer / 1e9:.3f}B)")
        if self.gpu:
            head.append(f"  GPU: {self.gpu.name}, {self.gpu.memory_bytes / GIB:.1f} GiB, planned within "
                        f"{USABLE_FRACTION:.0%}; step times at {self.mfu:.0%} MFU of {self.gpu.bf16_tflops:g} "
                        "TFLOP/s bf16")
        else:
            head.append("  CPU phases: memory is shown, not checked")
        return "\n".join(head + [_phase_table(p) for p in self.phases])

    def error(self) -> str:
        lines = [f"{self.recipe}: {len(self.misfits)} phase(s) do not fit on {self.gpu.name} "
                 f"({self.gpu.memory_bytes / GIB:.1f} GiB, planned within {USABLE_FRACTION:.0%}); --force runs anyway"]
        for p in self.misfits:
            lines.append(f"  {p.phase}: needs {p.peak / GIB:.1f} GiB per GPU, {p.capacity / GIB:.1f} GiB usable")
            if p.fixes:
                lines += [f"    fits with {change} -> {peak / GIB:.1f} GiB" for change, peak in p.fixes]
            else:
                lines.append("    no single change fits: combine ZeRO-3 with LoRA or offload, or use more GPUs")
        return "\n".join(lines)


def _phase_table(p: PhaseEstimate) -> str:
    if p.setup is None:
        return f"  {p.phase} [{p.kind}]: not planned ({'; '.join(p.notes)})"
    s = p.setup
    how = s.deepspeed.describe() if s.deepspeed else ("one process" if s.world == 1 else
                                                      "gradients all-reduced" if s.kind == "embed" else "DDP")
    head = (f"  {p.phase} [{p.kind}] {s.world} rank(s), {how}, {'LoRA' if s.lora else 'full'}, trainable "
            f"{s.trainable / 1e9:.3f}B, micro-batch {s.micro_batch} x {s.seq_tokens} tokens")
    width = max(len(r.name) for r in p.rows)
    lines = [head] + [f"    {r.name:<{width}} {r.bytes / GIB:8.2f} GiB  {r.note}" for r in p.rows]
    verdict = "" if p.capacity is None else (" fits" if p.fits else " DOES NOT FIT") + \
        f" ({p.capacity / GIB:.1f} GiB usable, margin {(p.capacity - p.peak) / GIB:+.1f} GiB)"
    where = "peak per GPU" if p.capacity is not None else "peak per worker"
    lines.append(f"    {where:<{width}} {p.peak / GIB:8.2f} GiB {verdict}")
    step = f"    tokens/step {p.tokens_per_step:,} (upper bound: every sequence at its length limit)"
    if p.step_seconds is not None:
        step += f"; training ~{p.step_seconds:.1f} s/step"
    if p.rollout_seconds is not None:
        step += f"; rollout >= {p.rollout_seconds:.1f} s per generation round (memory-bound decode)"
    lines.append(step)
    lines += [f"    note: {n}" for n in p.notes]
    return "\n".join(lines)


def plan_recipe(plan, gpu_name: str | None = None, mfu: float = 0.35) -> RecipePlan:
    """Plan every phase of a validated recipe (`patho_r1.launch.recipe.Plan`)."""
    if not 0 < mfu <= 1:
        raise ConfigError(f"plan: --mfu {mfu} is not a fraction of the GPU's peak; give one in (0, 1], e.g. 0.35")
    recipe = plan.recipe
    if not any(get_phase(p.type).plan for p in plan.phases):
        return RecipePlan(recipe=plan.source, gpu=None, model_source="", shape=None, mfu=mfu,
                          phases=[PhaseEstimate(p.name, p.type, None, [], 0, None, notes=[_unplanned_reason(p.type)])
                                  for p in plan.phases])
    if recipe.model.base == "tiny":
        from patho_r1.fixtures.tiny import TinySpec, build_tokenizer, tiny_config

        spec = TinySpec(**recipe.model.tiny.model_dump())
        config, source = tiny_config(build_tokenizer(spec), spec), "the tiny random-init model"
        default_max_pixels = spec.max_pixels
    else:
        default_max_pixels = PROCESSOR_MAX_PIXELS
        config, source = resolve_config(recipe.model.base)
    shape = model_shape(config)
    uses_gpu = any(p.resources.use_gpu for p in plan.phases)
    name = gpu_name or next((p.resources.gpu_type for p in plan.phases if p.resources.gpu_type), None) or DEFAULT_GPU
    if name not in GPUS:
        raise ConfigError(f"plan: unknown GPU {name!r}; known: {', '.join(GPUS)}")
    gpu = GPUS[name] if uses_gpu else None
    estimates = []
    for planned in plan.phases:
        res = planned.resources
        world = res.num_workers * max(1, int(res.gpus_per_worker)) if res.use_gpu else res.num_workers
        setup = phase_setup(planned, shape, world, default_max_pixels)
        if setup is None:
            estimates.append(PhaseEstimate(planned.name, planned.type, None, [], 0, None,
                                           notes=[_unplanned_reason(planned.type)]))
            continue
        phase_gpu = gpu if res.use_gpu else None
        est = estimate(planned.name, setup, shape, phase_gpu, mfu)
        if not est.fits:
            est.fixes = fitting_fixes(planned.name, setup, shape, phase_gpu, mfu)
        estimates.append(est)
    return RecipePlan(recipe=plan.source, gpu=gpu, model_source=source, shape=shape, phases=estimates, mfu=mfu)


def _unplanned_reason(phase_type: str) -> str:
    return get_phase(phase_type).not_planned


# ------------------------------------------------------------------------------------------------- the data kinds

SNIFF_ROWS = 5  # rows read from the head of a data file to tell its kind


@functools.lru_cache(maxsize=1)
def _kind_fields() -> dict[str, tuple[str, ...]]:
    """Each record kind's required fields (`patho_r1.data.RECORD_TYPES`): a row holds the kinds whose every required
    field it has."""
    from patho_r1.data import RECORD_TYPES

    return {kind: tuple(n for n, f in cls.model_fields.items() if f.is_required())
            for kind, cls in RECORD_TYPES.items()}


def _head(path: Path) -> list:
    from itertools import islice

    from patho_r1.data import iter_raw_rows

    return [raw for _, raw in islice(iter_raw_rows(path), SNIFF_ROWS)]


def file_kinds(path: Path) -> list[str] | None:
    """The record kinds the first rows of a data file all hold (possibly none); None where the file is not one the
    loaders read row by row (a VLMEvalKit TSV holds MCQs)."""
    if path.suffix == ".tsv":
        return ["mcq"]
    if path.suffix not in (".jsonl", ".json", ".parquet"):
        return None
    rows = _head(path)
    if not rows:
        return None  # empty: the phase says so when it starts
    return [kind for kind, need in _kind_fields().items()
            if all(isinstance(row, dict) and all(f in row for f in need) for row in rows)]


def kind_problem(path: Path, need: str, phase_type: str, hint: str = "") -> str | None:
    """Why `path` cannot feed a phase that reads `need` rows, in one line; None where it can (or cannot be told
    cheaply: a `datasets` folder, an empty file).  Reads the first rows of a file, or a curate stage folder's
    manifest.  `hint` says what makes the right rows (default: the kind's usual source)."""
    from patho_r1.data import parse_record
    from patho_r1.errors import DataError
    from patho_r1.launch.phases import KIND_SOURCES

    hint = hint or KIND_SOURCES.get(need, "")
    try:
        if path.is_dir():
            from patho_r1.curate.store import read_stage_manifest

            manifest = read_stage_manifest(path)
            if manifest is None:
                return None
            files = [name for name in manifest.files if name.endswith(".jsonl")
                     and need in (file_kinds(path / name) or [])]
            if files:
                return f"{path} is a curate stage folder; give its file {path / files[0]} (its {need} rows)"
            kinds = [k for k, n in manifest.counts.get("kinds", {}).items() if n] or ["no"]
            return (f"{path} is a curate stage folder of {', '.join(kinds)} rows, but the {phase_type} phase reads "
                    f"{need} rows; {hint}")
        kinds = file_kinds(path)
        if kinds is None or need in kinds:
            return None
        if kinds:
            return f"{path} holds {kinds[0]} rows, but the {phase_type} phase reads {need} rows; {hint}"
        for row, raw in enumerate(_head(path), 1):  # rows of no kind: the loader's own error for the first bad one
            parse_record(raw, need, path=path, row=row, check_images=False)
    except DataError as exc:
        return str(exc)
    return None


def data_kind_problems(phase_type, config, where: str = "", skip=lambda path: False) -> list[str]:
    """One line per input of `config` whose rows are not the kind its phase type reads (`PhaseType.reads`).  Inputs
    that do not exist yet, or for which `skip(path)` is true, are not checked."""
    problems = []
    for name, value in config.input_paths().items():
        need = phase_type.kind_of(name)
        path = Path(value)
        if need is None or not path.exists() or skip(path):
            continue
        problem = kind_problem(path, need, phase_type.name, phase_type.makes)
        if problem:
            problems.append(f"{where}{name}: {problem}")
    return problems


def check_data_kinds(plan, selected=None) -> None:
    """Refuse a recipe whose phases would read the wrong record kind (an MCQ file given to SFT), one line each.

    A file inside the output folder of an earlier phase that this run runs is made by that phase and not checked
    here (what is there now is an older run's); the phase checks its rows when it starts."""
    from patho_r1.launch.phases import get_phase

    selected = plan.phases if selected is None else selected
    names = {p.name for p in selected}
    problems, made = [], []
    for i, planned in enumerate(plan.phases):
        if planned.name in names and planned.config is not None:
            problems += data_kind_problems(
                get_phase(planned.type), planned.config, f"phases[{i}] ({planned.name}).config.",
                skip=lambda path, made=tuple(made): any(path.resolve().is_relative_to(d) for d in made))
        if planned.name in names:
            out = getattr(planned.config, "output_dir", None) or Path(plan.recipe.output_root) / planned.name
            made.append(Path(out).resolve())
    if problems:
        raise ConfigError("\n".join(f"{plan.source}: {p}" for p in problems))
