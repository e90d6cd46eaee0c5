"""One-GPU smoke and efficiency check of our SFT and RL runners, for a single H100/H200 machine with no internet.

    python bench/gpu_smoke.py                          # 3B shapes, then 7B shapes; every part
    python bench/gpu_smoke.py --shapes 3b --parts sft,rl --steps 10
    python bench/gpu_smoke.py --shapes tiny --steps 2  # the same code on CPU with the tiny model (CI runs this)
    python bench/gpu_smoke.py --check                  # CPU: build every part's configs and plans, train nothing

Each model is a random-init Qwen2.5-VL built from the published config's layer shapes (`launch/planner.py`'s
KNOWN_CONFIGS) with the tiny tokenizer's vocabulary, saved once and trained through our own runners
(`build_sft_trainer`, `build_rl_trainer`) on a synthetic world of 448-px tiles (256 visual tokens each).

Parts, each in its own process so one failure (an OOM, a missing wheel) does not hide the others:
* `sft`: steady-state s/step, tokens/s, MFU (6 N tokens/s over the GPU's dense bf16 peak), peak memory, a
  `torch.profiler` table of the top CUDA kernels and the host-side op counts of one step;
* `rl`: a DAPO step with HF rollouts: rollout, reward and update time (the trainer's `timing/*` metrics) and
  generation tokens/s;
* `zero2`, `zero3`: the SFT step under DeepSpeed on one GPU (skipped where DeepSpeed is not installed);
* every part also reports the planner's predicted peak against the measured one (`torch.cuda.max_memory_reserved`).

Prints one JSON object and writes it to `--out` (default `bench/results/gpu_smoke-<date>.json`).  The whole run is
meant to finish within 8 minutes on one H200: `--budget` seconds are shared out over the parts.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("sft", "sft_packed", "rl", "zero2", "zero3")
SHAPES = {"3b": "Qwen/Qwen2.5-VL-3B-Instruct", "7b": "Qwen/Qwen2.5-VL-7B-Instruct", "tiny": None}


# ------------------------------------------------------------------------------------------------------ the model


def model_config(shape: str):
    """The shape's Qwen2.5-VL config, with the tiny tokenizer's vocabulary and special-token ids."""
    from transformers import Qwen2_5_VLConfig

    from patho_r1.fixtures.tiny import TinySpec, build_tokenizer, tiny_config
    from patho_r1.launch.planner import KNOWN_CONFIGS

    tokenizer = build_tokenizer(TinySpec())
    tiny = tiny_config(tokenizer, TinySpec())
    if SHAPES[shape] is None:
        return tiny, tokenizer
    known = json.loads(json.dumps(KNOWN_CONFIGS[SHAPES[shape]]))
    known["text_config"].update(vocab_size=tiny.text_config.vocab_size, bos_token_id=tiny.text_config.bos_token_id,
                                eos_token_id=tiny.text_config.eos_token_id,
                                pad_token_id=tiny.text_config.pad_token_id)
    ids = {k: getattr(tiny, k) for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                         "vision_end_token_id")}
    return Qwen2_5_VLConfig(**known, **ids), tokenizer


def build_workspace(shape: str, work: Path, on_gpu: bool) -> tuple[Path, Path]:
    """The random-init model (saved once per shape) and a small world of 448-px tiles (56-px on CPU)."""
    import torch

    from patho_r1.checkpoint import seal
    from patho_r1.fixtures.synth import WorldConfig, generate_world
    from patho_r1.fixtures.tiny import TinySpec, build_processor, register_processor

    model_dir, world = work / f"model-{shape}", work / ("world-448" if on_gpu else "world-56")
    if not (model_dir / "config.json").is_file():
        from transformers import Qwen2_5_VLForConditionalGeneration

        register_processor()
        config, tokenizer = model_config(shape)
        spec = TinySpec(min_pixels=448 * 448, max_pixels=448 * 448) if on_gpu else TinySpec()
        with torch.device("cuda" if on_gpu else "cpu"):
            model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16 if on_gpu
                                                                     else torch.float32)

        def write(tmp: Path) -> None:
            model.save_pretrained(tmp)
            build_processor(tokenizer, spec).save_pretrained(tmp)

        seal(model_dir, None, write)
        del model
    if not (world / "manifest.json").is_file():
        generate_world(world, seed=0, config=WorldConfig(tile_size=448 if on_gpu else 56, n_train_tiles=64,
                                                         n_heldout_tiles=8, n_sft=64, n_rl=32, n_rl_heldout=4,
                                                         n_embed_pairs=4, n_composed_per_task=1, n_eval_tiles=4,
                                                         n_eval_mcq=4))
    return model_dir, world


# ------------------------------------------------------------------------------------------------------ the parts


def phase_configs(model_dir: Path, world: Path, out: Path, on_gpu: bool, steps: int) -> dict:
    """Every part's phase config, as a recipe would give it."""
    from patho_r1.config import validate_config
    from patho_r1.rl.config import RLPhaseConfig
    from patho_r1.sft.config import SFTPhaseConfig

    gpu = dict(dtype="bfloat16", use_cpu=False, attn_implementation="sdpa", gradient_checkpointing=True) if on_gpu \
        else dict(use_cpu=True)
    common = dict(model=str(model_dir), learning_rate=1e-5, warmup_ratio=0.0, max_steps=steps, save_steps=10_000,
                  logging_steps=1, wandb={"mode": "disabled"}, **gpu)
    sft = dict(common, data=str(world / "sft/train.jsonl"), per_device_train_batch_size=8, max_length=1024)
    rl = dict(common, learning_rate=1e-6, data=str(world / "rl/train.jsonl"), output_dir=str(out / "rl"),
              algorithm="dapo", num_generations=8, per_device_train_batch_size=16,
              max_completion_length=128 if on_gpu else 16)
    raw = {"sft": (SFTPhaseConfig, dict(sft, output_dir=str(out / "sft"))),
           "sft_packed": (SFTPhaseConfig, dict(sft, output_dir=str(out / "sft_packed"), packing=True)),
           "rl": (RLPhaseConfig, rl)}
    for stage in (2, 3):
        raw[f"zero{stage}"] = (SFTPhaseConfig, dict(sft, output_dir=str(out / f"zero{stage}"),
                                                     deepspeed=str(ROOT / f"recipes/deepspeed/zero{stage}.json")))
    # the runners check the files when they start; --check plans models and worlds that were never built
    return {part: validate_config(cls, data, prefix=f"{part}.", defer_path_checks=True)
            for part, (cls, data) in raw.items()}


def plan_part(cfg, part: str, shape, gpu_name: str | None):
    """The planner's estimate for this very config, on one rank (448-px images)."""
    from patho_r1.launch.planner import GPUS, estimate, phase_setup

    kind = "rl" if part == "rl" else "sft"
    planned = SimpleNamespace(type=kind, config=cfg, resources=SimpleNamespace(use_gpu=not cfg.use_cpu))
    setup = phase_setup(planned, shape, world=1, default_max_pixels=448 * 448)
    return estimate(part, setup, shape, GPUS.get(gpu_name) if gpu_name else None, mfu=0.35)


def predicted_peak(est, shape, gpu_name: str | None) -> dict:
    """The planner's per-GPU peak, without the runtime reserve it adds (what `max_memory_reserved` can see)."""
    from patho_r1.launch.planner import RUNTIME_RESERVE

    reserve = RUNTIME_RESERVE if gpu_name else 0
    return {"predicted_peak_gib": round((est.peak - reserve) / 2**30, 3), "parameters": shape.total,
            "rows_gib": {r.name: round(r.bytes / 2**30, 3) for r in est.rows}}


def fit_or_lora(cfg, part: str, shape, gpu_name: str):
    """The part's config as it is if the planner says it fits one GPU, else with LoRA r=64 (a 7B model's full
    fine-tuning with fp32 masters needs ~130 GiB of model states alone).  Returns the config, what was chosen and
    the planner's estimate for it."""
    from patho_r1.config import LoraSpec

    est = plan_part(cfg, part, shape, gpu_name)
    if est.fits:
        return cfg, "full", est
    lora = cfg.model_copy(update={"lora": LoraSpec(r=64)})
    return lora, f"lora r=64 (full needs {est.peak / 2**30:.0f} GiB)", plan_part(lora, part, shape, gpu_name)


def _gpu_name() -> str | None:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return "H200" if "H200" in name else "H100-80GB" if "H100" in name else "A100-80GB" if "A100" in name else None


class StepClock:
    """Wall time of each optimizer step (CUDA synchronised), and the tokens each one saw."""

    def __init__(self):
        import torch

        self.cuda = torch.cuda.is_available()
        self.times: list[float] = []
        self._t0 = 0.0

    def _sync(self):
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def callback(self):
        from transformers import TrainerCallback

        clock = self

        class _Clock(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                clock._sync()
                clock._t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                clock._sync()
                clock.times.append(time.perf_counter() - clock._t0)

        return _Clock()


class StepProfiler:
    """`torch.profiler` over the last training step only (the steps before it are the timed ones): the top CUDA
    kernels by time and the host-side ops by call count."""

    def __init__(self, steps: int):
        import torch
        from torch.profiler import ProfilerActivity, profile, schedule

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self.prof = profile(activities=activities, schedule=schedule(wait=max(steps - 1, 0), warmup=0, active=1))

    def callback(self):
        from transformers import TrainerCallback

        prof = self.prof

        class _Step(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                prof.step()

        return _Step()

    def table(self) -> dict:
        import torch

        events = self.prof.key_averages()
        by_count = sorted(events, key=lambda e: e.count, reverse=True)[:12]
        out = {"host_ops_by_count": [{"op": e.key, "calls": e.count} for e in by_count]}
        if torch.cuda.is_available():
            by_cuda = sorted(events, key=lambda e: getattr(e, "device_time_total", 0), reverse=True)[:15]
            out["kernels_by_cuda_time"] = [{"op": e.key, "cuda_ms": round(e.device_time_total / 1e3, 2),
                                            "calls": e.count} for e in by_cuda]
        return out


def run_sft_part(cfg, model_dir: Path, gpu_name: str | None, profile: bool) -> dict:
    import torch

    from patho_r1.sft.data import conversation_rows, to_dataset
    from patho_r1.sft.trainer import build_sft_trainer
    from patho_r1.training import skip_deepspeed_shm_kernel

    clock = StepClock()
    profiler = StepProfiler(cfg.max_steps) if profile else None
    trainer, _ = build_sft_trainer(cfg, "sft", to_dataset(conversation_rows, source=cfg.data),
                                   system_prompt=cfg.system_prompt,
                                   callbacks=[clock.callback()] + ([profiler.callback()] if profiler else []))
    skip_deepspeed_shm_kernel(trainer)  # as the SFT phase does: no CPU kernel build for one process on a CPU
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    if profiler:
        with profiler.prof:
            trainer.train()
    else:
        trainer.train()
    tokens = [r["num_tokens"] for r in trainer.state.log_history if "num_tokens" in r]
    per_step = [b - a for a, b in zip([0.0] + tokens[:-1], tokens, strict=True)]
    timed = len(clock.times) - (1 if profiler else 0)  # the profiled step runs slower
    warm = max(1, timed // 3)  # the first steps compile kernels and fill the allocator's cache
    seconds = sum(clock.times[warm:timed]) / max(1, timed - warm)
    tok = sum(per_step[warm:timed]) / max(1, timed - warm)
    result = {"s_per_step": round(seconds, 4), "tokens_per_step": round(tok, 1),
              "tokens_per_s": round(tok / seconds, 1), "steps": len(clock.times)}
    # MFU as EasyR1 and LMMs-Engine count it: 6 x the language model's parameters (the vision tower left out).
    params = sum(p.numel() for name, p in trainer.model.named_parameters() if "visual" not in name)
    result["llm_parameters"] = params
    if gpu_name:
        from patho_r1.launch.planner import GPUS

        result["mfu_llm"] = round(6 * params * tok / seconds / (GPUS[gpu_name].bf16_tflops * 1e12), 4)
        result["measured_peak_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
        result["measured_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    if profiler:
        result["profile"] = profiler.table()
    return result


def run_rl_part(cfg, gpu_name: str | None) -> dict:
    import torch

    from patho_r1.rl.grpo import build_rl_trainer

    trainer = build_rl_trainer(cfg)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    rows = [r for r in trainer.state.log_history if "timing/rollout_s" in r]
    last = rows[-1] if rows else {}
    completions = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    gen_tokens = last.get("completions/mean_length", 0.0) * completions
    result = {"wall_s": round(wall, 2), "steps": len(rows),
              **{k: round(float(last[k]), 4) for k in ("timing/rollout_s", "timing/reward_s", "timing/update_s",
                                                         "dynamic_sampling/rounds") if k in last},
              "generation_tokens_per_s": round(gen_tokens / last["timing/rollout_s"], 1)
              if last.get("timing/rollout_s") else None}
    if gpu_name:
        result["measured_peak_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
    return result


def worker(part: str, shape: str, work: Path, steps: int, profile: bool) -> dict:
    """One part, in this process."""
    import torch

    on_gpu = torch.cuda.is_available() and shape != "tiny"
    gpu_name = _gpu_name() if on_gpu else None
    if part.startswith("zero"):
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            return {"skipped": "deepspeed is not installed"}
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29533"), RANK="0",
                          WORLD_SIZE="1", LOCAL_RANK="0")
    t0 = time.perf_counter()
    model_dir, world = build_workspace(shape, work, on_gpu)
    cfg = phase_configs(model_dir, world, work / f"out-{shape}", on_gpu, steps)[part]
    result = {"build_s": round(time.perf_counter() - t0, 1), "mode": "full"}
    from transformers import AutoConfig

    from patho_r1.launch.planner import model_shape

    planner_shape = model_shape(AutoConfig.from_pretrained(model_dir))
    if gpu_name:
        cfg, result["mode"], est = fit_or_lora(cfg, part, planner_shape, gpu_name)
    else:
        est = plan_part(cfg, part, planner_shape, None)
    result.update(predicted_peak(est, planner_shape, gpu_name))
    if part == "rl":
        result.update(run_rl_part(cfg, gpu_name))
    else:
        result.update(run_sft_part(cfg, model_dir, gpu_name, profile and part == "sft"))
    if "measured_peak_gib" in result:
        result["planner_error"] = round(result["predicted_peak_gib"] / result["measured_peak_gib"] - 1, 3)
    return result


def check(shapes: list[str], work: Path) -> dict:
    """CPU: every part's config validates and the planner plans it, for every shape (models on the meta device)."""
    from patho_r1.launch.planner import model_shape

    out = {}
    for shape in shapes:
        config, _ = model_config(shape)
        planner_shape = model_shape(config)
        configs = phase_configs(work / "unbuilt-model", work / "unbuilt-world", work / "out", True, 4)
        for part, cfg in configs.items():
            _, mode, est = fit_or_lora(cfg, part, planner_shape, "H200")
            out[f"{shape}/{part}"] = {"parameters": planner_shape.total, "mode": mode, "fits_h200": est.fits,
                                      "predicted_peak_gib": round(est.peak / 2**30, 2)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="3b,7b", help="comma-separated: 3b, 7b, tiny")
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--budget", type=float, default=480.0, help="seconds for the whole run, shared by the parts")
    ap.add_argument("--work", default=os.environ.get("PATHO_SMOKE_WORK", "/tmp/patho-gpu-smoke"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--check", action="store_true", help="CPU: build the configs and plans only")
    ap.add_argument("--worker", nargs=2, metavar=("PART", "SHAPE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    shapes = [s for s in args.shapes.split(",") if s]
    unknown = [s for s in shapes if s not in SHAPES] + [p for p in args.parts.split(",") if p not in PARTS]
    if unknown:
        sys.exit(f"gpu_smoke: unknown shape or part {unknown}; shapes {list(SHAPES)}, parts {list(PARTS)}")
    if args.worker:
        part, shape = args.worker
        print("RESULT " + json.dumps(worker(part, shape, work, args.steps, not args.no_profile)), flush=True)
        return
    if args.check:
        print(json.dumps(check(shapes, work), indent=2))
        return
    parts = args.parts.split(",")
    results: dict = {"date": datetime.date.today().isoformat(), "steps": args.steps, "parts": {}}
    deadline = time.monotonic() + args.budget
    jobs = [(shape, part) for shape in shapes for part in parts]
    for i, (shape, part) in enumerate(jobs):
        left = deadline - time.monotonic()
        limit = max(30.0, left / (len(jobs) - i))  # an even share of what is left
        log = work / f"{shape}-{part}.log"
        t0 = time.perf_counter()
        try:
            with open(log, "w") as f:
                proc = subprocess.run([sys.executable, __file__, "--worker", part, shape, "--work", str(work),
                                       "--steps", str(args.steps), *(["--no-profile"] if args.no_profile else [])],
                                      stdout=f, stderr=subprocess.STDOUT, timeout=limit, cwd=ROOT)
            lines = [ln for ln in log.read_text().splitlines() if ln.startswith("RESULT ")]
            entry = json.loads(lines[-1][7:]) if proc.returncode == 0 and lines else \
                {"failed": f"exit {proc.returncode}", "log_tail": log.read_text()[-1500:]}
        except subprocess.TimeoutExpired:
            entry = {"failed": f"timed out after {limit:.0f} s", "log_tail": log.read_text()[-1500:]}
        entry["part_s"] = round(time.perf_counter() - t0, 1)
        results["parts"][f"{shape}/{part}"] = entry
    import torch

    results["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    text = json.dumps(results, indent=2)
    print(text)
    out = Path(args.out) if args.out else ROOT / "bench/results" / f"gpu_smoke-{results['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")


if __name__ == "__main__":
    main()
