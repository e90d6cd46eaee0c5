"""PathoCLIP's model: a CLIP dual encoder (transformers' `CLIPModel`) behind the same `encode(items)` interface as the
HOMIE embedder, so every retrieval and classification evaluator scores both.

Any Hugging Face CLIP directory loads: `openai/clip-vit-base-patch16`, `openai/clip-vit-large-patch14`, PLIP, a
PathoCLIP checkpoint this package wrote, or the tiny random-init CLIP of `patho-r1 tiny-model --clip`.  open_clip is
not used: it needs torchvision, which does not install beside the CPU torch.  Remote code is never trusted.

A CLIP cannot fuse an image and a text into one query; an input with both is embedded as the normalised sum of its
parts ("simple add", the baseline HOMIE's paper gives such models).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from patho_r1.data import load_image
from patho_r1.embed.model import EmbedInput


class ClipEmbedder(torch.nn.Module):
    def __init__(self, model, tokenizer, image_processor):
        super().__init__()
        self.model, self.tokenizer, self.image_processor = model, tokenizer, image_processor
        # Training keeps fp32 weights (the optimizer's masters) and computes in this dtype under autocast (None: the
        # weights' own dtype).  Set by the clip phase from its `dtype`.
        self.autocast_dtype: torch.dtype | None = None

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: str | torch.dtype | None = None) -> ClipEmbedder:
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        dtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
        # without torchvision, transformers falls back to the PIL image processor by itself
        model = CLIPModel.from_pretrained(str(path), dtype=dtype or torch.float32, trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
        image_processor = AutoImageProcessor.from_pretrained(str(path), trust_remote_code=False)
        return cls(model, tokenizer, image_processor)

    def save_pretrained(self, directory: str | Path) -> None:
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        self.image_processor.save_pretrained(directory)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def hidden_size(self) -> int:
        return self.model.config.projection_dim

    @property
    def vision_parameters(self) -> list[torch.nn.Parameter]:
        """The image tower and its projection (stage II may train them at a lower rate)."""
        return [*self.model.vision_model.parameters(), *self.model.visual_projection.parameters()]

    def temperature(self) -> torch.Tensor:
        """1 / CLIP's learned logit scale, clamped as CLIP clamps it (scale <= 100); differentiable."""
        return 1.0 / self.model.logit_scale.clamp(max=float(np.log(100.0))).exp()

    def embed_images(self, images: Sequence[Any]) -> torch.Tensor:
        pixels = self.image_processor(images=[load_image(i) for i in images], return_tensors="pt")["pixel_values"]
        out = self.model.get_image_features(pixel_values=pixels.to(self.device, self.model.dtype))
        return F.normalize(_features(out), dim=-1)

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        batch = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt").to(self.device)
        out = self.model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return F.normalize(_features(out), dim=-1)

    def forward(self, items: Sequence[Any]) -> torch.Tensor:
        """L2-normalised embeddings [len(items), projection_dim], differentiable: images through the image tower,
        texts through the text tower, an input with several parts as the normalised sum of its parts."""
        items = [EmbedInput.of(x) for x in items]
        images = [(i, ref) for i, it in enumerate(items) for ref in [*it.images, *it.frames]]
        texts = [(i, it.text) for i, it in enumerate(items) if it.text]
        if any(not it.text and not it.n_visual() for it in items):
            raise ValueError("an input to embed has neither text nor images")
        fused = torch.zeros(len(items), self.hidden_size, device=self.device, dtype=torch.float32)
        autocast = torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype \
            else contextlib.nullcontext()
        with autocast:
            if images:
                fused = fused.index_add(0, torch.tensor([i for i, _ in images], device=self.device),
                                        self.embed_images([ref for _, ref in images]).float())
            if texts:
                fused = fused.index_add(0, torch.tensor([i for i, _ in texts], device=self.device),
                                        self.embed_texts([t for _, t in texts]).float())
        return F.normalize(fused, dim=-1)

    def encode(self, items: Iterable[Any], batch_size: int = 32) -> np.ndarray:
        items = list(items)
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                parts = [self.forward(items[s:s + batch_size]).float().cpu().numpy()
                         for s in range(0, len(items), batch_size)]
        finally:
            self.train(was_training)
        return np.concatenate(parts) if parts else np.zeros((0, self.hidden_size), np.float32)


def _features(out) -> torch.Tensor:
    """transformers 5 returns a model output whose `pooler_output` holds the projected features; 4.x a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output
