"""Rollout engines for evaluation: batched generation from chat messages with images.

`engine: hf` runs `model.generate` (CPU or GPU); `engine: vllm` runs vLLM's offline `LLM.chat` (GPU, `[vllm]` extra).
Both take the same `ChatRequest`s and return decoded completions, so scorers never branch on the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

from PIL import Image

# torch and the model loader are imported where a generator is made, so the scorers and the CLI's benchmark table
# load without them


@dataclass
class ChatRequest:
    messages: list[dict]  # content lists with {"type": "image"} placeholders, in order
    images: list[Image.Image] = field(default_factory=list)


@dataclass
class SamplingConfig:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    batch_size: int = 16


class ResponseGenerator(Protocol):
    """What turns chat requests into responses (`HFGenerator`, `VLLMGenerator`, a test's scripted model)."""

    def generate(self, requests: list[ChatRequest], sampling: SamplingConfig) -> list[str]: ...


class HFGenerator:
    """`transformers` generate, batched by prompt length (left padding) to keep padding low."""

    def __init__(self, backbone):
        self.model = backbone.model.eval()
        self.processor = backbone.processor
        self.processor.tokenizer.padding_side = "left"

    def generate(self, requests: list[ChatRequest], sampling: SamplingConfig) -> list[str]:
        import torch

        with torch.no_grad():
            return self._generate(requests, sampling)

    def _generate(self, requests: list[ChatRequest], sampling: SamplingConfig) -> list[str]:
        texts = [self.processor.apply_chat_template(r.messages, tokenize=False, add_generation_prompt=True)
                 for r in requests]
        order = sorted(range(len(requests)), key=lambda i: (len(texts[i]), len(requests[i].images)))
        outputs: list[str] = [""] * len(requests)
        device = next(self.model.parameters()).device
        kwargs = dict(max_new_tokens=sampling.max_new_tokens, do_sample=sampling.temperature > 0)
        if sampling.temperature > 0:
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p)
        for start in range(0, len(order), sampling.batch_size):
            idx = order[start:start + sampling.batch_size]
            images = [img for i in idx for img in requests[i].images]
            inputs = self.processor(text=[texts[i] for i in idx], images=images or None, return_tensors="pt",
                                    padding=True).to(device)
            out = self.model.generate(**inputs, **kwargs)
            new_tokens = out[:, inputs["input_ids"].shape[1]:]
            decoded = self.processor.batch_decode(new_tokens, skip_special_tokens=True)
            for i, text in zip(idx, decoded, strict=True):
                outputs[i] = text
        return outputs


class VLLMGenerator:
    """vLLM offline inference (GPU).  Images go in as OpenAI-style content parts via `LLM.chat`."""

    def __init__(self, model_path: str, tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.8,
                 max_model_len: int | None = None):
        try:
            from vllm import LLM
        except ImportError as exc:
            raise ImportError("engine 'vllm' needs the vllm extra: pip install -e '.[vllm]' (GPU machines only)") \
                from exc
        self.llm = LLM(model=model_path, tensor_parallel_size=tensor_parallel_size,
                       gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                       limit_mm_per_prompt={"image": 8}, trust_remote_code=False)

    def generate(self, requests: list[ChatRequest], sampling: SamplingConfig) -> list[str]:
        import base64
        import io

        from vllm import SamplingParams

        def to_openai(req: ChatRequest) -> list[dict]:
            images = iter(req.images)
            out = []
            for m in req.messages:
                if isinstance(m["content"], str):
                    out.append(m)
                    continue
                parts = []
                for p in m["content"]:
                    if p.get("type") == "image":
                        buf = io.BytesIO()
                        next(images).save(buf, format="PNG")
                        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
                        parts.append({"type": "image_url", "image_url": {"url": url}})
                    else:
                        parts.append({"type": "text", "text": p.get("text", "")})
                out.append({"role": m["role"], "content": parts})
            return out

        params = SamplingParams(max_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                                top_p=sampling.top_p)
        results = self.llm.chat([to_openai(r) for r in requests], params, use_tqdm=False)
        return [r.outputs[0].text for r in results]


ENGINES = ("hf", "vllm")


def make_generator(model, engine: Literal["hf", "vllm"] = "hf", **engine_kwargs) -> ResponseGenerator:
    """A generator for a checkpoint path (or, for `hf`, a loaded `Backbone`)."""
    from patho_r1.models import Backbone, load_backbone

    if engine == "vllm":
        if isinstance(model, Backbone):
            raise ValueError("engine 'vllm' loads the model itself: pass a checkpoint path")
        return VLLMGenerator(str(model), **engine_kwargs)
    if engine != "hf":
        raise ValueError(f"unknown engine {engine!r}; use one of {', '.join(ENGINES)}")
    backbone = model if isinstance(model, Backbone) else load_backbone(model, **engine_kwargs)
    return HFGenerator(backbone)
