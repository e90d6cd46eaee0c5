"""TRL's colocated vLLM engine made safe for images: vLLM's processor gets the HF processor's pixel budget, and
vLLM's multimodal encoder cache is emptied after every rollout (`DynamicSamplingGRPOTrainer` in rl/dapo.py uses both).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def vllm_processor_kwargs(processing_class) -> dict[str, int]:
    """vLLM's `mm_processor_kwargs`: the pixel budget of the HF processor that tokenizes the prompts.

    TRL hands vLLM prompt ids already expanded by the HF processor (one image token per merged 28 x 28 patch) and the
    raw image, which vLLM's own processor resizes again: with another `min_pixels`/`max_pixels` the two image-token
    counts differ, an error or a silently corrupted prompt (trl#6401, #6294).  The budget is read from the HF
    processor itself, which `load_processor` set from the phase's `min_pixels`/`max_pixels` (else the checkpoint's
    own), so one recipe field decides both sides.
    """
    image_processor = getattr(processing_class, "image_processor", None)
    if image_processor is None:  # a text-only tokenizer: no images to resize
        return {}
    size = image_processor.size
    return {"min_pixels": int(size["shortest_edge"]), "max_pixels": int(size["longest_edge"])}


@contextmanager
def vllm_engine_kwargs(**extra: Any) -> Iterator[None]:
    """Add `extra` to the `vllm.LLM(...)` call that TRL makes while the trainer is being built.

    TRL 1.16 builds its colocated engine in `trl/generation/vllm_generation.py` (`VLLMGeneration._init_vllm`) with a
    fixed argument list, and neither `GRPOConfig` nor `VLLMGeneration` takes `mm_processor_kwargs`; so that module's
    `LLM` name is wrapped for the duration of `GRPOTrainer.__init__`, and restored after.
    """
    from trl.generation import vllm_generation

    original = getattr(vllm_generation, "LLM", None)  # absent where vLLM is not installed: no engine to build
    if original is None or not extra:
        yield
        return

    def build_llm(*args, **kwargs):
        return original(*args, **{**kwargs, **extra})

    vllm_generation.LLM = build_llm
    try:
        yield
    finally:
        vllm_generation.LLM = original


def _model_runner(llm):
    """The in-process GPU model runner of a colocated engine (TRL's `external_launcher` backend), or None."""
    worker = getattr(getattr(getattr(llm, "llm_engine", None), "model_executor", None), "driver_worker", None)
    worker = getattr(worker, "worker", worker)  # vLLM wraps the worker in a WorkerWrapperBase
    return getattr(worker, "model_runner", None)


def _encoder_cache(llm) -> dict | None:
    """The model runner's encoder outputs by multimodal hash, or None where that dict is not found."""
    cache = getattr(_model_runner(llm), "encoder_cache", None)
    cache = getattr(cache, "encoder_cache", cache)  # vLLM's model runner V2 keeps the dict inside an object
    return cache if isinstance(cache, dict) else None


def vllm_encoder_cache_entries(llm) -> int | None:
    """How many encoder outputs the engine's model runner holds on the GPU (None: no such cache found)."""
    cache = _encoder_cache(llm)
    return None if cache is None else len(cache)


def clear_vllm_encoder_cache(llm) -> None:
    """Drop vLLM's multimodal encoder outputs after a rollout.

    vLLM V1 keeps each image's encoder output on the GPU (the model runner's `encoder_cache`, by multimodal hash) and
    frees entries only when a new request needs room; sleep mode does not release them.  A colocated loop runs one
    bounded `generate` per step, so that room is never needed and the cache grows, about 0.25 GB a step, until the
    update runs out of memory (EasyR1 #11002).  vLLM's `LLMEngine.reset_encoder_cache()` (vLLM #33452) empties both
    the runner's cache and the scheduler's `EncoderCacheManager`; for an engine without it, EasyR1's reset of the same
    two, each only where its attribute exists (vLLM internals, not an API).  After `generate` no request is left
    running, so nothing still needs an entry.
    """
    reset = getattr(getattr(llm, "llm_engine", None), "reset_encoder_cache", None)
    if callable(reset):
        reset()
        return
    cache = _encoder_cache(llm)
    if cache is not None:
        cache.clear()
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    core = getattr(core, "engine_core", core)  # the in-process client wraps the EngineCore
    scheduler = getattr(core, "scheduler", None)
    manager = getattr(scheduler, "encoder_cache_manager", None)
    if manager is not None and not scheduler.has_unfinished_requests():
        manager.num_free_slots = manager.num_freeable_slots = manager.cache_size
        for name in ("cached", "freeable", "freed"):
            getattr(manager, name, {}).clear()
