"""The embedder: one vector for any interleaved input, from the same Qwen2.5-VL backbone as the reasoner.

HOMIE / E5-V recipe: wrap the input in a one-word summary prompt, run the backbone, take the final hidden state of
the last token (the position where the model would write that one word), L2-normalise.  The head is a peft LoRA
adapter named `embed` (optionally with the vision tower and/or projector trainable, saved with the adapter), so one
base checkpoint serves both reasoning (adapter off) and retrieval (adapter on).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from patho_r1.data import load_image
from patho_r1.models import Backbone, load_backbone

ADAPTER_NAME = "embed"

# HOMIE's summary prompts.
IMAGE_PROMPT = "Summarize above image in one word:"
TEXT_PROMPT = "Summarize above sentence in one word:"
MIXED_PROMPT = "Summarize above image and sentence in one word:"
VIDEO_PROMPT = "Summarize above video in one word:"
VIDEO_TEXT_PROMPT = "Summarize above video and sentence in one word:"


@dataclass
class EmbedInput:
    """Any mix of text, images and video frames.  Images and frames may be PIL images or references."""

    text: str | None = None
    images: list = field(default_factory=list)
    frames: list = field(default_factory=list)

    @classmethod
    def of(cls, item: Any) -> EmbedInput:
        if isinstance(item, EmbedInput):
            return item
        if isinstance(item, str):
            return cls(text=item)
        if isinstance(item, Image.Image):
            return cls(images=[item])
        if isinstance(item, dict):
            return cls(text=item.get("text"), images=list(item.get("images") or []),
                       frames=list(item.get("frames") or []))
        if hasattr(item, "model_dump"):  # patho_r1.data.EmbedSide
            return cls.of(item.model_dump())
        raise TypeError(f"cannot embed an item of type {type(item).__name__}")

    def n_visual(self) -> int:
        return len(self.images) + len(self.frames)


def summary_messages(item: EmbedInput) -> list[dict]:
    """The one-word summary prompt for an input: visual parts first, then the text, then the instruction."""
    parts: list[dict] = [{"type": "image"} for _ in range(item.n_visual())]
    if item.frames:
        prompt = VIDEO_TEXT_PROMPT if item.text else VIDEO_PROMPT
    elif item.images:
        prompt = MIXED_PROMPT if item.text else IMAGE_PROMPT
    else:
        prompt = TEXT_PROMPT
    body = f"{item.text}\n{prompt}" if item.text else prompt
    parts.append({"type": "text", "text": body})
    return [{"role": "user", "content": parts}]


class Embedder(torch.nn.Module):
    def __init__(self, backbone: Backbone, image_transform=None):
        super().__init__()
        self.model = backbone.model  # a PeftModel once `add_adapter` ran
        self.processor = backbone.processor
        self.processor.tokenizer.padding_side = "left"  # the last token is then at position -1 in every row
        self.image_transform = image_transform
        self.autocast_dtype: torch.dtype | None = None  # set by `keep_fp32_masters`

    # -- construction ---------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model_path: str | Path, adapter: str | Path | None = None, *, dtype="auto",
                        min_pixels: int | None = None, max_pixels: int | None = None, trainable: bool = False):
        backbone = load_backbone(model_path, dtype=dtype, min_pixels=min_pixels, max_pixels=max_pixels,
                                 padding_side="left")
        emb = cls(backbone)
        if adapter is not None:
            from peft import PeftModel

            path = Path(adapter)
            if not (path / "adapter_config.json").is_file() and (path / ADAPTER_NAME).is_dir():
                path = path / ADAPTER_NAME  # peft saves a named adapter in a sub-folder
            emb.model = PeftModel.from_pretrained(backbone.model, str(path), adapter_name=ADAPTER_NAME,
                                                  is_trainable=trainable)
        return emb

    def add_adapter(self, lora_config) -> None:
        from peft import get_peft_model

        self.model = get_peft_model(self.model, lora_config, adapter_name=ADAPTER_NAME)

    def keep_fp32_masters(self) -> int:
        """Trainable weights in fp32, the forward under half-precision autocast: a half-precision base model's
        trainable vision tower or projector (peft's `modules_to_save` copies them in the base dtype) would
        otherwise take AdamW steps in bf16, which round away every update below half an ulp
        (`patho_r1.training.Precision`).  LoRA adapters are fp32 already.  Returns the parameters upcast."""
        half = [p for p in self.model.parameters() if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16)]
        base = {p.dtype for p in self.model.parameters() if not p.requires_grad}
        for p in half:
            p.data = p.data.float()
        if torch.bfloat16 in base or torch.float16 in base:
            self.autocast_dtype = torch.bfloat16 if torch.bfloat16 in base else torch.float16
        return sum(p.numel() for p in half)

    def enable_gradient_checkpointing(self) -> None:
        """HF's per-layer checkpointing (non-reentrant: it works with a frozen base and PEFT adapters, whose inputs
        carry no gradient of their own), in the language model and the vision tower."""
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.config.use_cache = False

    @contextlib.contextmanager
    def reasoning(self):
        """The same weights as the reasoner: the embedding adapter switched off."""
        if hasattr(self.model, "disable_adapter"):
            with self.model.disable_adapter():
                yield self.model
        else:
            yield self.model

    def save_adapter(self, directory: str | Path) -> None:
        self.model.save_pretrained(str(directory), selected_adapters=[ADAPTER_NAME])
        self.processor.save_pretrained(str(directory))
        # peft writes the adapter under a sub-folder named after it; point the root at it for loaders.
        (Path(directory) / "embedder.json").write_text(json.dumps({"adapter": ADAPTER_NAME}) + "\n")

    # -- inputs ---------------------------------------------------------------------------------------------------
    def _visuals(self, item: EmbedInput, rng: np.random.Generator | None) -> list[Image.Image]:
        out = []
        for ref in [*item.images, *item.frames]:
            img = ref if isinstance(ref, Image.Image) else load_image(ref)
            if self.image_transform is not None and rng is not None:
                img = self.image_transform(img, rng)
            out.append(img)
        return out

    def prepare(self, items: Sequence[EmbedInput], rng: np.random.Generator | None = None) -> dict:
        texts = [self.processor.apply_chat_template(summary_messages(it), tokenize=False, add_generation_prompt=True)
                 for it in items]
        images = [img for it in items for img in self._visuals(it, rng)]
        device = next(self.model.parameters()).device
        return self.processor(text=texts, images=images or None, return_tensors="pt", padding=True).to(device)

    # -- forward --------------------------------------------------------------------------------------------------
    def _language_model_body(self):
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return base.model  # Qwen2_5_VLModel: vision tower + language model, no LM head

    def forward(self, items: Sequence[Any], rng: np.random.Generator | None = None) -> torch.Tensor:
        """L2-normalised embeddings [len(items), hidden], differentiable."""
        batch = self.prepare([EmbedInput.of(x) for x in items], rng)
        device = batch["input_ids"].device.type
        with torch.autocast(device, dtype=self.autocast_dtype) if self.autocast_dtype else contextlib.nullcontext():
            out = self._language_model_body()(**batch)
        last = out.last_hidden_state[:, -1]
        return F.normalize(last.float(), dim=-1)

    @torch.no_grad()
    def encode(self, items: Iterable[Any], batch_size: int = 32, bucket_by_length: bool = True) -> np.ndarray:
        """Embed any mix of text, images and frames.  Batches group inputs of similar length to limit padding."""
        items = [EmbedInput.of(x) for x in items]
        if not items:
            return np.zeros((0, self.hidden_size), np.float32)
        order = list(range(len(items)))
        if bucket_by_length:
            order.sort(key=lambda i: (items[i].n_visual(), len(items[i].text or "")))
        was_training = self.training
        self.eval()
        out = np.zeros((len(items), self.hidden_size), np.float32)
        try:
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                out[idx] = self.forward([items[i] for i in idx]).cpu().numpy()
        finally:
            self.train(was_training)
        return out

    @property
    def hidden_size(self) -> int:
        cfg = self._language_model_body().config
        return getattr(cfg, "text_config", cfg).hidden_size

    def padding_fraction(self, items: Sequence[Any], batch_size: int, bucket_by_length: bool) -> float:
        """Share of padded positions when encoding `items` (for benchmarks)."""
        items = [EmbedInput.of(x) for x in items]
        order = sorted(range(len(items)), key=lambda i: (items[i].n_visual(), len(items[i].text or ""))) \
            if bucket_by_length else list(range(len(items)))
        pad = total = 0
        for start in range(0, len(order), batch_size):
            batch = self.prepare([items[i] for i in order[start:start + batch_size]])
            mask = batch["attention_mask"]
            pad += int((mask == 0).sum())
            total += mask.numel()
        return pad / max(total, 1)


