"""Runtime pieces the phases share: TrainingArguments fields, metrics logging, wandb, freezing, resume, final save."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from patho_r1.checkpoint import Manifest, checkpoint_problem, save_checkpoint
from patho_r1.config import PhaseConfig, PhaseResult, TrainConfig, WandbConfig
from patho_r1.errors import ConfigError

logger = logging.getLogger(__name__)

CHECKPOINTS_SUBDIR = "checkpoints"
FINAL_SUBDIR = "model"


def final_model_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.output_dir) / FINAL_SUBDIR


def setup_wandb(cfg: WandbConfig, run_name: str, output_dir: str | Path | None = None) -> None:
    """wandb runs offline unless the user says otherwise; an explicit WANDB_MODE in the environment wins.  Offline
    runs are written next to the phase's outputs (`wandb sync <dir>/wandb/offline-run-*` uploads them later)."""
    if cfg.mode == "disabled":
        return
    if output_dir is not None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("WANDB_DIR", str(Path(output_dir).resolve()))
    os.environ.setdefault("WANDB_MODE", cfg.mode)
    os.environ.setdefault("WANDB_PROJECT", cfg.project)
    if cfg.entity:
        os.environ.setdefault("WANDB_ENTITY", cfg.entity)
    os.environ.setdefault("WANDB_NAME", cfg.run_name or run_name)


@contextlib.contextmanager
def wandb_run(cfg: PhaseConfig, run_name: str):
    """A wandb run for a phase that has no HF Trainer to log for it (embed, eval); yields `log(metrics, step)`.

    Offline by default, like the trainer phases (see `setup_wandb`); with `wandb.mode: disabled` nothing is created.
    """
    if cfg.wandb.mode == "disabled":
        yield lambda metrics, step=None: None
        return
    import wandb

    out = Path(cfg.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=cfg.wandb.project, entity=cfg.wandb.entity, name=cfg.wandb.run_name or run_name,
                     dir=str(out), mode=os.environ.get("WANDB_MODE", cfg.wandb.mode),
                     config=cfg.model_dump(mode="json"), reinit="finish_previous")
    try:
        yield lambda metrics, step=None: run.log(_flat_numbers(metrics), step=step)
    finally:
        run.finish()


def _flat_numbers(metrics: dict, prefix: str = "") -> dict[str, float]:
    """Nested metric dicts as `a/b/c` keys, numbers only (wandb charts scalars)."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat_numbers(value, f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


@dataclass(frozen=True)
class Precision:
    """How a trainer phase holds and computes its numbers.

    `compute` is the matmul precision (`dtype` in the config; `auto`: bf16 on a GPU, fp32 on a CPU).  `weights` is
    what the model is loaded in, and so what the optimizer updates.  Half-precision weights updated by a plain
    optimizer round away every step smaller than half an ulp: at the RL learning rate (1e-6), bf16 weights of size
    ~0.02 (ulp ~1.2e-4) almost never move.  So the weights that the optimizer owns stay fp32 and half precision is
    used only inside autocast, unless something else keeps fp32 master weights:
    * DeepSpeed with bf16/fp16 keeps an fp32 master copy in its optimizer, so the model loads in half precision;
    * LoRA trains only the adapters, which PEFT creates in fp32 (`autocast_adapter_dtype`), so the frozen base
      model loads in half precision.
    Bytes per trained parameter: fp32 weights 4 + fp32 gradients 4 + AdamW states 8 = 16 (pure bf16 was 8).
    """

    compute: str  # float32 | bfloat16 | float16
    weights: str  # the dtype the model is loaded in

    @property
    def bf16(self) -> bool:
        return self.compute == "bfloat16"

    @property
    def fp16(self) -> bool:
        return self.compute == "float16"


def compute_dtype(dtype: str, on_cpu: bool) -> str:
    """A phase's `dtype` as the precision it computes in: `auto` is bf16 on a GPU and fp32 on a CPU."""
    return ("float32" if on_cpu else "bfloat16") if dtype == "auto" else dtype


def precision(cfg: TrainConfig, on_cpu: bool | None = None) -> Precision:
    """`on_cpu`: the device the phase will run on, when it is not this machine's (the planner plans GPU phases on a
    CPU machine); None reads the config."""
    cpu = cfg.runs_on_cpu() if on_cpu is None else on_cpu
    compute = compute_dtype(cfg.dtype, cpu)
    if compute == "float16" and cpu:
        compute = "float32"  # CPU autocast has no fp16; bf16 works there
    master_elsewhere = cfg.deepspeed is not None or cfg.lora is not None
    weights = compute if compute == "float32" or master_elsewhere else "float32"
    return Precision(compute=compute, weights=weights)


def training_arguments(cfg: TrainConfig, run_name: str) -> dict[str, Any]:
    """The `transformers.TrainingArguments` fields our TrainConfig decides (TRL's configs extend these)."""
    cpu = cfg.runs_on_cpu()
    mixed = precision(cfg)
    return dict(
        output_dir=str(Path(cfg.output_dir) / CHECKPOINTS_SUBDIR),
        run_name=run_name,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio of the total steps
        weight_decay=cfg.weight_decay,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        gradient_checkpointing=cfg.gradient_checkpointing,
        bf16=mixed.bf16,
        fp16=mixed.fp16,
        use_cpu=cpu,
        deepspeed=cfg.deepspeed,
        seed=cfg.seed,
        data_seed=cfg.seed,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        report_to=cfg.wandb.report_to(),
        dataloader_num_workers=cfg.dataloader_num_workers,
        ddp_find_unused_parameters=may_skip_parameters(cfg),
        remove_unused_columns=False,  # our collators read the raw columns (image references, extra fields)
        disable_tqdm=True,  # JsonlMetricsCallback prints one progress line per log instead
    )


def may_skip_parameters(cfg: TrainConfig) -> bool:
    """Whether a trainable parameter can sit out a step, so DDP must look for unused ones after every backward.

    Only a trainable vision tower or projector can (a batch without images skips them); the language model and its
    LoRA adapters are used by every token.  Left at HF's default (True), DDP searches every step and warns that it
    found nothing, as in the demo, whose vision tower is frozen."""
    if cfg.lora is not None and not cfg.lora.modules_to_save:
        return False
    return not (cfg.freeze_vision_tower and cfg.freeze_projector)


class JsonlMetricsCallback(TrainerCallback):
    """Appends every log event to `metrics.jsonl` and prints a one-line progress report."""

    def __init__(self, path: str | Path, phase: str, print_progress: bool = True):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.phase = phase
        self.print_progress = print_progress
        self._t0 = time.time()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        row = {"phase": self.phase, "step": state.global_step, "total": state.max_steps, "epoch": state.epoch,
               "time": round(time.time() - self._t0, 3), **logs}
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row, default=float) + "\n")
        if self.print_progress:
            shown = {k: v for k, v in logs.items() if isinstance(v, (int, float)) and not k.startswith("total_flos")}
            keys = [k for k in ("loss", "reward", "rewards/accuracy/mean", "learning_rate", "grad_norm") if k in shown]
            keys += [k for k in shown if k not in keys][: max(0, 6 - len(keys))]
            text = " ".join(f"{k}={shown[k]:.4g}" for k in keys)
            print(f"[{self.phase}] step {state.global_step}/{state.max_steps} {text}", flush=True)


def load_phase_backbone(cfg: TrainConfig, padding_side: str):
    """The phase's backbone with the config's dtype, attention, pixel budget and freezing applied."""
    from patho_r1.models import load_backbone

    backbone = load_backbone(cfg.model, dtype=precision(cfg).weights, attn_implementation=cfg.attn_implementation,
                             vision_attention=cfg.vision_attention, on_gpu=not cfg.runs_on_cpu(),
                             min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels, padding_side=padding_side)
    if cfg.freeze_vision_tower or cfg.freeze_projector:
        counts = apply_freezing(backbone.model, freeze_vision_tower=cfg.freeze_vision_tower,
                                freeze_projector=cfg.freeze_projector)
        logger.info("%d of %d parameters trainable", counts["trainable"], counts["total"])
    return backbone


def quiet_trainer_printing(trainer) -> None:
    """With tqdm off, transformers prints every log dict; JsonlMetricsCallback already prints one line per log."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)


def apply_freezing(model, *, freeze_vision_tower: bool, freeze_projector: bool) -> dict[str, int]:
    """Freeze the vision tower blocks and/or the patch merger (projector).  Returns trainable counts for the log."""
    visual = model.model.visual
    for name, param in visual.named_parameters():
        is_projector = name.startswith("merger.")
        if (is_projector and freeze_projector) or (not is_projector and freeze_vision_tower):
            param.requires_grad_(False)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}


class ResumeWeightsMixin:
    """Restore model weights on resume through `from_pretrained`, not a raw `load_state_dict`.

    transformers 5 saves Qwen2.5-VL checkpoints under the original key names (`model.layers.*`, `visual.*`) while the
    live model uses `model.language_model.*` / `model.visual.*`; `Trainer._load_from_checkpoint` loads the file with
    `load_state_dict(strict=False)`, so on resume *no* weight is restored and training silently restarts from the
    phase's initial weights with a restored optimizer.  `from_pretrained` applies the key conversion.  PEFT adapters,
    DeepSpeed and FSDP checkpoints keep transformers' own loading.
    """

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        target = model if model is not None else self.model
        plain = (not getattr(self, "is_deepspeed_enabled", False) and not getattr(self, "is_fsdp_enabled", False)
                 and hasattr(target, "config") and not hasattr(target, "peft_config")
                 and (Path(resume_from_checkpoint) / "config.json").is_file())
        if not plain:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        restored = type(target).from_pretrained(resume_from_checkpoint, dtype=target.dtype)
        target.load_state_dict(restored.state_dict(), strict=True)
        del restored


_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def _trainer_state_problem(checkpoint: Path) -> str | None:
    """HF writes trainer_state.json last, but not atomically: a kill while it is written leaves it empty or cut off,
    and resuming from it fails deep inside `Trainer.train` (found by tests/test_liveness.py's kill-anywhere)."""
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError) as exc:
        return f"trainer_state.json unreadable, cut off while it was written ({type(exc).__name__})"
    return None


def latest_checkpoint(cfg: TrainConfig) -> str | None:
    """Newest intermediate checkpoint that is whole: fully written (HF writes trainer_state.json last; it must parse),
    with every safetensors file matching its header.  A damaged newer one is skipped, and the log says which and why."""
    root = Path(cfg.output_dir) / CHECKPOINTS_SUBDIR
    if not root.is_dir():
        return None
    found = []
    for d in root.iterdir():
        m = _CHECKPOINT_RE.match(d.name)
        if m and (d / "trainer_state.json").is_file():
            found.append((int(m.group(1)), d))
    for _, d in sorted(found, reverse=True):
        problem = _trainer_state_problem(d) or checkpoint_problem(d)
        if problem is None:
            return str(d)
        logger.warning("checkpoint %s is damaged (%s); trying an older one", d, problem)
    return None


def _zero3(trainer) -> bool:
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    return plugin is not None and plugin.zero_stage == 3


def finalize(trainer, processor, cfg: TrainConfig, phase: str, metrics: dict[str, float] | None = None) -> Path:
    """Write the phase's final `save_pretrained` directory (model + processor + manifest), atomically.

    A LoRA run saves its adapter, or with `merge_lora` the merged full model, which then loads anywhere as a plain
    Qwen2.5-VL checkpoint.
    """
    model = trainer.accelerator.unwrap_model(trainer.model) if hasattr(trainer, "accelerator") else trainer.model
    extra: dict[str, Any] = {"lora": cfg.lora is not None, "merged": False}
    deepspeed = getattr(trainer, "is_deepspeed_enabled", False)
    zero3 = deepspeed and _zero3(trainer)
    if zero3 and cfg.lora is not None and cfg.merge_lora:
        raise ConfigError("merge_lora: not supported with ZeRO-3 (the adapter would be merged into weight "
                          "partitions); save the adapter and merge it afterwards")
    if cfg.lora is not None and cfg.merge_lora:
        model = model.merge_and_unload()
        extra["merged"] = True
    compute = precision(cfg).compute
    if model.dtype == torch.float32 and compute != "float32" and not deepspeed:
        # fp32 master weights were for the optimizer; the checkpoint is what inference and the next phase load, in the
        # precision they compute in (vLLM reads the saved dtype), as Hugging Face checkpoints are.
        model = model.to(getattr(torch, compute))
        extra["saved_dtype"] = compute
    state_dict = None
    if zero3:
        # Under ZeRO-3 each rank holds a slice of every weight, and the unwrapped model's `save_pretrained` would
        # write those slices (empty tensors).  accelerate gathers the 16-bit weights (DeepSpeed's
        # stage3_gather_16bit_weights_on_model_save, on in recipes/deepspeed/zero3.json); a collective, so every
        # rank calls it, and rank 0 writes.
        state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped)
        extra["zero3_gathered"] = True
    manifest = Manifest.of_phase(cfg, phase, int(trainer.state.global_step), extra=extra,
                                 metrics={k: float(v) for k, v in (metrics or {}).items()
                                          if isinstance(v, (int, float))})
    if trainer.args.should_save:
        out = save_checkpoint(model, processor, final_model_dir(cfg), manifest, state_dict=state_dict)
        logger.info("%s: final model written to %s", phase, out)
    return final_model_dir(cfg)


def skip_deepspeed_shm_kernel(trainer) -> bool:
    """On a CPU, DeepSpeed JIT-compiles a shared-memory all-reduce kernel (`deepspeed_shm_comm`: g++ with OpenMP,
    about 40 s of CPU on a machine that has not built it before) when its process group starts, whatever the world
    size.  One process never reduces across ranks, so for a one-process CPU run (checking a ZeRO config before the
    cluster) we leave the kernel out; DeepSpeed then reduces through torch.distributed, as on every machine without
    the kernel.  Multi-process CPU runs and GPU runs keep DeepSpeed's own choice.  True when it was left out."""
    if not getattr(trainer, "is_deepspeed_enabled", False) or trainer.args.world_size != 1 \
            or trainer.args.device.type != "cpu":
        return False
    import importlib

    # by module name: as an attribute, `deepspeed.comm.torch` is the torch library (deepspeed.comm star-imports it)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    return True


def train_and_finalize(trainer, processor, cfg: TrainConfig, phase: str,
                       after_train: Callable[[], object] | None = None) -> PhaseResult:
    """An HF-Trainer phase from its built trainer to its final model: with `resume`, continue from the newest whole
    checkpoint (`latest_checkpoint`); train; then write the final directory (`finalize`).  `after_train` runs once
    training stops, even when it fails (RL closes its reward clients), before the final save."""
    resume_from = latest_checkpoint(cfg) if cfg.resume else None
    if resume_from:
        print(f"[{phase}] resuming from {resume_from}", flush=True)
    skip_deepspeed_shm_kernel(trainer)
    try:
        result = trainer.train(resume_from_checkpoint=resume_from)
    finally:
        if after_train is not None:
            after_train()
    model_dir = finalize(trainer, processor, cfg, phase, result.metrics)
    return PhaseResult(model_dir=model_dir, global_step=int(trainer.state.global_step), metrics=result.metrics)
