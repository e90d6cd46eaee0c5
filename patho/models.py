"""Loading the Qwen2.5-VL backbone: one code path for the tiny local model and for hub checkpoints.

`load_backbone("Qwen/Qwen2.5-VL-7B-Instruct")` on a cluster and `load_backbone("runs/demo/tiny")` on a laptop go
through the same calls; only the recipe differs.  `trust_remote_code` is never set.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    PreTrainedModel,
    Qwen2_5_VLConfig,
    Qwen2_5_VLProcessor,
)

from patho_r1.attention import apply_vision_attention, resolve_text_attention


class Qwen2_5_VLImageOnlyProcessor(Qwen2_5_VLProcessor):
    """`Qwen2_5_VLProcessor` without the video sub-processor.

    transformers 5.x type-checks every sub-processor named in `__init__`; the video processor class only exists when
    torchvision imports, and PyPI's torchvision does not import beside the CPU torch wheel.  Leaving `video_processor`
    out of the signature drops it from `ProcessorMixin.get_attributes()`, so construction, `save_pretrained` and
    `from_pretrained` work with the PIL image processor alone.  Video is handled as a list of frames (images) everywhere
    in patho-r1, so nothing is lost.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        kwargs.pop("video_processor", None)
        super().__init__(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=None,
            chat_template=chat_template,
            **kwargs,
        )


def register_processor() -> None:
    """Make `AutoProcessor` return our image-only processor for Qwen2.5-VL configs.

    Without this, `AutoProcessor.from_pretrained(tiny_dir)` silently returns the bare tokenizer, and TRL then treats the
    model as text-only (`_is_vlm=False`) and fails at train time with `KeyError: 'pixel_values'`.
    """
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING

    AutoProcessor.register(Qwen2_5_VLConfig, Qwen2_5_VLImageOnlyProcessor, exist_ok=True)
    # transformers 5.17 (what the [vllm] extra installs) ignores registrations keyed by a native config class; a
    # name key still lets AutoProcessor resolve `processor_class` from a saved processor_config.json.
    PROCESSOR_MAPPING.register(Qwen2_5_VLImageOnlyProcessor.__name__, Qwen2_5_VLImageOnlyProcessor, exist_ok=True)


@dataclass
class Backbone:
    model: PreTrainedModel
    processor: Qwen2_5_VLImageOnlyProcessor

    @property
    def tokenizer(self):
        return self.processor.tokenizer


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"dtype must be one of {sorted(names)} or 'auto', got {dtype!r}")
    return names[dtype]


def load_processor(
    path_or_name: str | Path,
    *,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    padding_side: str = "left",
) -> Qwen2_5_VLImageOnlyProcessor:
    """Load the processor, optionally overriding the native-resolution pixel budget."""
    register_processor()
    kwargs: dict[str, Any] = {}
    if min_pixels is not None:
        kwargs["min_pixels"] = min_pixels
    if max_pixels is not None:
        kwargs["max_pixels"] = max_pixels
    processor = Qwen2_5_VLImageOnlyProcessor.from_pretrained(str(path_or_name), trust_remote_code=False)
    image_processor = processor.image_processor
    if min_pixels is not None or max_pixels is not None:
        # transformers 5.x stores the budget as size={"shortest_edge", "longest_edge"}; keep both views in sync.
        lo = min_pixels if min_pixels is not None else image_processor.size["shortest_edge"]
        hi = max_pixels if max_pixels is not None else image_processor.size["longest_edge"]
        if lo > hi:
            raise ValueError(f"min_pixels ({lo}) must not exceed max_pixels ({hi})")
        image_processor.size = {"shortest_edge": lo, "longest_edge": hi}
        for name, value in (("min_pixels", lo), ("max_pixels", hi)):
            if hasattr(image_processor, name):
                setattr(image_processor, name, value)
    processor.tokenizer.padding_side = padding_side
    return processor


def load_backbone(
    path_or_name: str | Path,
    *,
    dtype: str | torch.dtype | None = "auto",
    attn_implementation: str | None = None,
    vision_attention: str = "auto",
    on_gpu: bool | None = None,
    device_map: str | dict | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    padding_side: str = "left",
) -> Backbone:
    """Load a Qwen2.5-VL checkpoint (hub id or local `save_pretrained` directory) and its processor.

    `attn_implementation` is the language model's (None or "auto": flash_attention_2 where flash-attn is installed on
    a GPU, else SDPA); `vision_attention` the vision tower's (see `patho_r1.attention`).  `on_gpu`: whether the model
    will run on a GPU (None: whether one is visible).
    """
    path = str(path_or_name)
    local = Path(path)
    if (local / "adapter_config.json").is_file():
        return _load_adapter_checkpoint(local, dtype=dtype, attn_implementation=attn_implementation,
                                        vision_attention=vision_attention, on_gpu=on_gpu, device_map=device_map,
                                        min_pixels=min_pixels, max_pixels=max_pixels, padding_side=padding_side)
    if (local.exists() or path.startswith((".", "/"))) and not (local / "config.json").is_file():
        raise FileNotFoundError(
            f"{path}: not a model directory (no config.json). Build a tiny model with `patho-r1 tiny-model {path}` "
            "or pass a hub id such as Qwen/Qwen2.5-VL-7B-Instruct."
        )
    register_processor()
    on_gpu = torch.cuda.is_available() if on_gpu is None else on_gpu
    model_kwargs: dict[str, Any] = {"dtype": resolve_dtype(dtype), "trust_remote_code": False,
                                    "attn_implementation": resolve_text_attention(attn_implementation, on_gpu=on_gpu)}
    if device_map is not None:
        model_kwargs["device_map"] = device_map
    model = AutoModelForImageTextToText.from_pretrained(path, **model_kwargs)
    apply_vision_attention(model, vision_attention, on_gpu=on_gpu)
    processor = load_processor(path, min_pixels=min_pixels, max_pixels=max_pixels, padding_side=padding_side)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    return Backbone(model=model, processor=processor)


def _load_adapter_checkpoint(path: Path, **kwargs) -> Backbone:
    """A LoRA checkpoint (adapter + processor): load its base model, apply the adapter and merge it for inference."""
    import json

    from peft import PeftModel

    base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise FileNotFoundError(f"{path}/adapter_config.json names no base_model_name_or_path")
    backbone = load_backbone(base, **{k: v for k, v in kwargs.items() if k not in ("min_pixels", "max_pixels",
                                                                                   "padding_side")})
    model = PeftModel.from_pretrained(backbone.model, str(path)).merge_and_unload()
    processor = load_processor(path, min_pixels=kwargs.get("min_pixels"), max_pixels=kwargs.get("max_pixels"),
                               padding_side=kwargs.get("padding_side", "left"))
    return Backbone(model=model, processor=processor)
