"""Attention for Qwen2.5-VL's vision tower in a few kernel calls per layer, and the choice of attention per tower.

Why this exists: in transformers 5.x, `Qwen2_5_VLVisionAttention` makes one variable-length call per layer only when
the attention implementation's name contains "flash".  For every other implementation (SDPA included) each layer
splits its input with `cu_seqlens.tolist()` (a device->host sync per layer) and calls attention once per 64-token
window: 28 * ceil(h/8) * ceil(w/8) + 4 calls per image per forward (452 for a 448-px image, 2,272 for 1008 px), and
backward and checkpoint recompute repeat them.

So we register our own attention functions through transformers' `AttentionInterface`, under names that contain
"flash" (the model then hands them `cu_seqlens` and the maximum length), and apply them to the vision tower only:

* `batched` (any device, the CPU default and the fallback): the windows grouped by length, one SDPA call per
  distinct length with the windows as the batch dimension.  Nearly every window holds 64 tokens, so a window layer is
  one call (plus one per odd length at the image's right and bottom edges); a full-attention layer is one call per
  distinct image size.
* `varlen` (CUDA, bf16/fp16): PyTorch's own variable-length flash kernel, `torch.nn.attention.varlen.varlen_attn`
  (forward and backward registered in torch >= 2.10): one call per layer, no flash-attn wheel needed.
* `flash_attn` (CUDA, the flash-attn package installed): `flash_attn_varlen_func`, one call per layer.
* `transformers`: leave the vision tower on the text model's implementation (transformers' own loop for SDPA/eager).

`auto` picks the fastest one the machine has.  The host syncs that remain are removed by passing the index tensors
precomputed on the CPU (`vision_index_kwargs`, called by the collator): transformers 5.24 pops `image_`-prefixed
kwargs (`image_cu_seqlens`, `image_window_index`, ...) instead of computing them on the device, and our own
`image_segment_groups` reach the attention function through the same `**kwargs`.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from typing import get_args

import torch
import torch.nn.functional as F

from patho_r1.config import VisionAttention

VISION_ATTENTION_CHOICES: tuple[str, ...] = get_args(VisionAttention)

# Registered names: "flash" in the name routes the vision tower to its `cu_seqlens` path (transformers'
# `is_flash_attention_requested` is a substring test).  One name per kernel, so no global state picks the kernel.
REGISTERED_NAMES = {"batched": "flash_patho_vision_batched", "varlen": "flash_patho_vision_varlen",
                    "flash_attn": "flash_patho_vision_fa2"}


def flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def torch_varlen_available() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_vision_attention(choice: str, *, on_gpu: bool) -> str:
    """The kernel `choice` names on this machine: `auto` is flash-attn, then torch's varlen kernel on a GPU, and the
    length-batched SDPA path everywhere else."""
    if choice not in VISION_ATTENTION_CHOICES:
        raise ValueError(f"vision_attention: {choice!r} is not one of {', '.join(VISION_ATTENTION_CHOICES)}")
    if choice != "auto":
        return choice
    if on_gpu and flash_attn_installed():
        return "flash_attn"
    if on_gpu and torch_varlen_available():
        return "varlen"
    return "batched"


def resolve_text_attention(attn_implementation: str | None, *, on_gpu: bool) -> str:
    """The language model's implementation: `auto`/None is flash_attention_2 where flash-attn is installed on a GPU,
    SDPA otherwise; any other value is kept (transformers checks it when the model loads)."""
    if attn_implementation in (None, "auto"):
        return "flash_attention_2" if on_gpu and flash_attn_installed() else "sdpa"
    return attn_implementation


def attention_problems(attn_implementation: str | None, vision_attention: str, *, on_gpu: bool) -> list[str]:
    """One line per attention setting this machine cannot run, each with its fix (empty: all good).  Meant for
    `--dry-run` and `plan`, so that a missing wheel is found before Ray starts, not after the model loads."""
    problems = []
    text = attn_implementation or "auto"
    if text.startswith("flash_attention") and not on_gpu:
        problems.append(f"attn_implementation: {text} needs a CUDA GPU; use auto (SDPA here) or sdpa")
    elif text == "flash_attention_2" and not flash_attn_installed():
        problems.append("attn_implementation: flash_attention_2 needs the flash-attn package (not installed): "
                        "pip install -e '.[flash]' --no-build-isolation, or set attn_implementation: auto")
    elif text == "flash_attention_3" and importlib.util.find_spec("flash_attn_interface") is None:
        problems.append("attn_implementation: flash_attention_3 needs flash-attn 3 (flash_attn_interface, not "
                        "installed); set attn_implementation: auto")
    if vision_attention in ("varlen", "flash_attn") and not on_gpu:
        problems.append(f"vision_attention: {vision_attention} needs a CUDA GPU; use auto (batched here)")
    elif vision_attention == "varlen" and not torch_varlen_available():
        problems.append(f"vision_attention: varlen needs torch >= 2.10 (torch {torch.__version__} installed); "
                        "use auto")
    elif vision_attention == "flash_attn" and not flash_attn_installed():
        problems.append("vision_attention: flash_attn needs the flash-attn package (not installed): "
                        "pip install -e '.[flash]' --no-build-isolation, or use auto")
    return problems


def apply_vision_attention(model, choice: str, *, on_gpu: bool) -> str:
    """Route the model's vision tower to our attention function for `choice`; returns the kernel used.

    transformers' `set_attn_implementation` would treat any name containing "flash" as a flash-attn build or Hub
    kernel to import (and fail); ours is a registered Python function that needs no import, so the vision config's
    implementation is set directly, as `set_attn_implementation` itself does once its checks pass.  The vision
    attention reads `config._attn_implementation` at every call, so this takes effect on a loaded model.
    """
    kernel = resolve_vision_attention(choice, on_gpu=on_gpu)
    if kernel == "transformers":
        return kernel
    register_vision_attention()
    vision_config = _vision_config(model)
    if vision_config is None:
        return "transformers"
    vision_config._attn_implementation_internal = REGISTERED_NAMES[kernel]
    return kernel


def _vision_config(model):
    config = getattr(model, "config", None)
    return getattr(config, "vision_config", None)


def register_vision_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(REGISTERED_NAMES["batched"], batched_vision_attention)
    AttentionInterface.register(REGISTERED_NAMES["varlen"], varlen_vision_attention)
    AttentionInterface.register(REGISTERED_NAMES["flash_attn"], flash_attn_vision_attention)


# --------------------------------------------------------------------------------------------- segment groups


@dataclass(frozen=True)
class SegmentGroups:
    """The segments of one `cu_seqlens`, grouped by length: for each distinct length, the token positions of its
    segments in order (`[n_segments * length]`), or None when the group is the whole sequence in order."""

    n_segments: int
    groups: tuple[tuple[int, torch.Tensor | None], ...]

    @classmethod
    def from_lengths(cls, lengths: Sequence[int]) -> SegmentGroups:
        lengths = [int(n) for n in lengths]
        distinct = sorted(set(lengths))
        if len(distinct) == 1:
            return cls(len(lengths), ((distinct[0], None),))
        starts, total = [], 0
        for n in lengths:
            starts.append(total)
            total += n
        groups = []
        for length in distinct:
            firsts = torch.tensor([s for s, n in zip(starts, lengths, strict=True) if n == length], dtype=torch.long)
            index = (firsts[:, None] + torch.arange(length)[None, :]).reshape(-1)
            groups.append((length, index))
        return cls(len(lengths), tuple(groups))

    def to(self, device) -> SegmentGroups:
        return SegmentGroups(self.n_segments, tuple((n, None if idx is None else idx.to(device, non_blocking=True))
                                                    for n, idx in self.groups))


def _groups_for(cu_seqlens: torch.Tensor, segment_groups: dict | None) -> SegmentGroups:
    """The groups of this layer's `cu_seqlens`: precomputed by the collator (window layers and full-attention
    layers each have theirs; the number of segments, a shape, tells which without reading the device), or computed
    once per forward and kept on the tensor itself, which every layer of that kind shares."""
    n_segments = cu_seqlens.shape[0] - 1
    for groups in (segment_groups or {}).values():
        # Equal counts mean the same segments: an image with as many windows as images has one window per image.
        if groups.n_segments == n_segments:
            return groups if cu_seqlens.device.type == "cpu" else groups.to(cu_seqlens.device)
    cached = getattr(cu_seqlens, "_patho_segment_groups", None)
    if cached is None:
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()  # one host read per tensor per forward, not per layer
        cached = SegmentGroups.from_lengths(lengths).to(cu_seqlens.device)
        cu_seqlens._patho_segment_groups = cached
    return cached


# ------------------------------------------------------------------------------------------- the three kernels


def batched_vision_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                             cu_seq_lens_q=None, segment_groups=None, **kwargs):
    """Block-diagonal attention as one SDPA call per distinct segment length.  `query` etc.: [1, heads, seq, dim]
    (the vision tower's layout); returns [1, seq, heads, dim] as transformers' attention functions do."""
    q, k, v = query[0], key[0], value[0]  # [heads, seq, dim]
    heads, seq, dim = q.shape
    dropout = dropout if module.training else 0.0
    if cu_seq_lens_q is None:  # called once per window by a transformers that routes only its own names to varlen
        return _sdpa_segments(q, k, v, seq, scaling, dropout).transpose(0, 1)[None], None
    groups = _groups_for(cu_seq_lens_q, segment_groups)
    if len(groups.groups) == 1 and groups.groups[0][1] is None:
        length = groups.groups[0][0]
        out = _sdpa_segments(q, k, v, length, scaling, dropout)
    else:
        out = q.new_empty(heads, seq, dim)
        for length, index in groups.groups:
            part = _sdpa_segments(q[:, index], k[:, index], v[:, index], length, scaling, dropout)
            out = out.index_copy(1, index, part)
    return out.transpose(0, 1).unsqueeze(0), None


def _sdpa_segments(q, k, v, length: int, scaling, dropout: float) -> torch.Tensor:
    """SDPA over equal-length segments laid end to end: [heads, n*length, dim] -> the same shape."""
    heads, total, dim = q.shape
    n = total // length

    def split(t):
        return t.reshape(heads, n, length, dim).transpose(0, 1)  # [n, heads, length, dim]

    out = F.scaled_dot_product_attention(split(q), split(k), split(v), dropout_p=dropout, scale=scaling)
    return out.transpose(0, 1).reshape(heads, total, dim)


def varlen_vision_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                            cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None, max_length_k=None, **kwargs):
    """PyTorch's variable-length flash kernel (CUDA, half precision); other inputs fall back to `batched`."""
    if (cu_seq_lens_q is None or not query.is_cuda or query.dtype not in (torch.float16, torch.bfloat16)
            or (dropout and module.training)):
        return batched_vision_attention(module, query, key, value, scaling=scaling, dropout=dropout,
                                        cu_seq_lens_q=cu_seq_lens_q, **kwargs)
    from torch.nn.attention.varlen import varlen_attn

    q, k, v, cu, max_len = _varlen_inputs(query, key, value, cu_seq_lens_q, max_length_q)
    out = varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scaling)
    return out.unsqueeze(0), None


def flash_attn_vision_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                                cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None, max_length_k=None,
                                **kwargs):
    """flash-attn's `flash_attn_varlen_func` (CUDA, half precision); other inputs fall back to `batched`."""
    if cu_seq_lens_q is None or not query.is_cuda or query.dtype not in (torch.float16, torch.bfloat16):
        return batched_vision_attention(module, query, key, value, scaling=scaling, dropout=dropout,
                                        cu_seq_lens_q=cu_seq_lens_q, **kwargs)
    from flash_attn import flash_attn_varlen_func

    q, k, v, cu, max_len = _varlen_inputs(query, key, value, cu_seq_lens_q, max_length_q)
    out = flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, dropout_p=dropout if module.training else 0.0,
                                 softmax_scale=scaling, causal=False)
    return out.unsqueeze(0), None


def _varlen_inputs(query, key, value, cu_seq_lens, max_length):
    """What a variable-length kernel takes: q, k, v as [seq, heads, dim], int32 boundaries, the longest segment (read
    back from the device only when the collator did not precompute it)."""
    cu = cu_seq_lens.to(torch.int32)
    max_len = int(max_length) if max_length is not None else int((cu[1:] - cu[:-1]).max())
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    return q, k, v, cu, max_len


# ------------------------------------------------------------------------------- indices precomputed on the CPU


def vision_index_kwargs(image_grid_thw: torch.Tensor, vision_config) -> dict:
    """The vision tower's index tensors for one batch, computed on the CPU with transformers' own functions, as the
    `image_`-prefixed kwargs Qwen2.5-VL pops instead of computing them on the device (transformers >= 5.24), plus our
    segment groups.  Returns {} on a transformers without that hook (the model then computes them itself)."""
    try:
        from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index
    except ImportError:
        return {}
    grid = image_grid_thw.to("cpu")
    merge = vision_config.spatial_merge_size
    cu_seqlens = get_vision_cu_seqlens(grid)
    window_index, cu_window_seqlens = get_vision_window_index(
        grid, spatial_merge_size=merge, window_size=vision_config.window_size, patch_size=vision_config.patch_size)
    full_lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    window_lengths = (cu_window_seqlens[1:] - cu_window_seqlens[:-1]).tolist()
    return {
        "image_position_ids": get_vision_position_ids(grid, merge),
        "image_cu_seqlens": cu_seqlens,
        "image_max_seqlen": max(full_lengths),
        "image_window_index": window_index,
        "image_cu_window_seqlens": cu_window_seqlens,
        "image_max_window_seqlen": max(window_lengths),
        "image_segment_groups": {"full": SegmentGroups.from_lengths(full_lengths),
                                 "window": SegmentGroups.from_lengths(window_lengths)},
    }
