"""The `curate` phase on the top floor: the data engine's stages, with model embedders taken from `embed/`.

Curate sits on the phase floor and may not import another phase; tagging and clustering with a model embedder need
one, so this module hands `curate` a factory (`model_encoder`) that loads it where the stage runs (a Ray Data actor,
or this process).  The arrow goes down from here to both phases, never across.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np

from patho_r1.curate.config import CuratePhaseConfig, EmbedderSpec
from patho_r1.curate.pipeline import run_chain


def _patho_encoder(model: str, adapter: str | None, batch_size: int) -> Callable[[list[dict]], np.ndarray]:
    from patho_r1.embed.model import Embedder

    embedder = Embedder.from_pretrained(model, adapter)
    return functools.partial(embedder.encode, batch_size=batch_size)


def _hf_image_encoder(model: str, batch_size: int) -> Callable[[list[dict]], np.ndarray]:
    """Any Hugging Face model with `get_image_features` (CLIP, SigLIP): the first image of each item."""
    import torch
    from transformers import AutoImageProcessor, AutoModel

    from patho_r1.data import load_image

    processor = AutoImageProcessor.from_pretrained(model)  # an image encoder needs no tokenizer; no remote code
    net = AutoModel.from_pretrained(model).eval()

    @torch.no_grad()
    def encode(items: list[dict]) -> np.ndarray:
        out = []
        for start in range(0, len(items), batch_size):
            images = [load_image(it["images"][0]) for it in items[start:start + batch_size]]
            inputs = processor(images=images, return_tensors="pt")
            features = net.get_image_features(**inputs)
            # transformers 5 returns a model output whose pooler_output is the projected embedding; 4.x a tensor
            features = getattr(features, "pooler_output", features)
            out.append(features.float().numpy())
        return np.concatenate(out)

    return encode


def model_encoder(spec: EmbedderSpec) -> Callable[[], Callable[[list[dict]], np.ndarray]]:
    """A picklable zero-argument factory that loads the spec's model (once per worker) and returns `encode`."""
    if spec.kind == "patho":
        return functools.partial(_patho_encoder, spec.model, spec.adapter, spec.batch_size)
    if spec.kind == "hf":
        return functools.partial(_hf_image_encoder, spec.model, spec.batch_size)
    raise ValueError(f"embedder {spec.kind!r} needs no model")


SCRIPTED_TEACHER = "synth:teacher"


def run_curate(cfg: CuratePhaseConfig):
    """Stages whose endpoint is `synth:teacher` talk to the scripted teacher (`fixtures/teacher.py`), started here on
    a free port for the phase: the demo's stand-in for a vLLM server of a reasoning model, over real HTTP."""
    endpoints = [s.endpoint for s in cfg.stages if getattr(s, "endpoint", None) is not None
                 and s.endpoint.base_url == SCRIPTED_TEACHER]
    server = None
    if endpoints:
        from patho_r1.fixtures.teacher import serve

        server = serve(flawed=0.1)  # a tenth of its replies carry a defect for the filters to catch
        for endpoint in endpoints:
            endpoint.base_url = server.url  # not part of the stage's config hash: a resumed run skips finished work
    try:
        return run_chain(cfg, model_encoder=model_encoder)
    finally:
        if server is not None:
            server.stop()
