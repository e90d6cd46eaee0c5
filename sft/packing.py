"""Packed (padding-free) VLM batches for CPT and SFT: a micro-batch's samples end to end in one row, no padding.

TRL 1.16 refuses `packing` and `padding_free` for vision datasets, because Qwen2.5-VL's multimodal RoPE needs
per-sample 3-D positions that TRL's flattening collator cannot compute.  transformers' contract for packed Qwen2.5-VL
input (`Qwen2_5_VLTextModel.forward`, 5.x) is:

* `position_ids` of shape [4, 1, total]: row 0 the text positions, restarting at 0 for each sample (transformers
  derives the sample boundaries from them); rows 1-3 the mRoPE (temporal, height, width) positions, computed per
  sample exactly as the unpacked forward computes them (`get_rope_index`);
* **no** `attention_mask`.  With SDPA the boundaries become a block-causal mask (the CPU path); with a flash-style
  implementation they become variable-length calls, and `cu_seq_lens_q/k` / `max_length_q/k` are passed
  precomputed here so that the GPU never has to read them back.

The first token of every sample is labelled -100: the loss shifts labels by one, so without it the last token of a
sample would be trained to predict the first token of the next.  (Its label is never a target when the sample is
alone, so the loss is unchanged.)  Images need no change: their pixel patches and grids are already in sample order.
"""

from __future__ import annotations

import inspect

import torch

IGNORE_INDEX = -100


class RopeIndex:
    """Qwen2.5-VL's `get_rope_index` without a model: it reads only the config, so the collator (on the CPU, in a
    dataloader worker) computes the mRoPE positions that the model would otherwise compute on the device, with the
    host reads its Python loop makes."""

    def __init__(self, config):
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

        self.config = config
        self._get_rope_index = Qwen2_5_VLModel.get_rope_index
        # get_rope_index calls self.get_vision_position_ids (transformers >= 5.2x); it reads no model state either.
        if hasattr(Qwen2_5_VLModel, "get_vision_position_ids"):
            self.get_vision_position_ids = Qwen2_5_VLModel.get_vision_position_ids.__get__(self)
        self._takes_token_types = "mm_token_type_ids" in inspect.signature(self._get_rope_index).parameters

    def __call__(self, input_ids, attention_mask, image_grid_thw=None, mm_token_type_ids=None) -> torch.Tensor:
        """[3, batch, length] positions for a padded batch (padding positions are left 0)."""
        kwargs = dict(input_ids=input_ids, image_grid_thw=image_grid_thw, attention_mask=attention_mask)
        if self._takes_token_types:
            if mm_token_type_ids is None:
                mm_token_type_ids = (input_ids == self.config.image_token_id).int()
            kwargs["mm_token_type_ids"] = mm_token_type_ids
        with torch.no_grad():
            position_ids, _ = self._get_rope_index(self, **kwargs)
        return position_ids


def pack_batch(batch: dict) -> dict:
    """A padded collated batch (any padding side) with its [3, batch, length] mRoPE `position_ids` (`RopeIndex`) as
    one packed row.  Keys other than the per-token ones (pixel values, image grids, precomputed vision indices) pass
    through unchanged."""
    mask = batch["attention_mask"].bool()
    lengths = mask.sum(dim=1)
    mrope = batch["position_ids"]
    text_positions = torch.cat([torch.arange(int(n)) for n in lengths])
    packed = {k: v for k, v in batch.items() if k not in ("attention_mask", "position_ids")}
    for key in ("input_ids", "labels", "mm_token_type_ids", "token_type_ids"):
        if key in batch:
            packed[key] = batch[key][mask].unsqueeze(0)
    starts = torch.cumsum(lengths, 0) - lengths
    if "labels" in packed:
        packed["labels"][0, starts] = IGNORE_INDEX
    packed["position_ids"] = torch.cat([text_positions[None, None, :], mrope[:, mask].unsqueeze(1)], dim=0)
    cu = torch.nn.functional.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))
    max_length = int(lengths.max())
    packed.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max_length, max_length_k=max_length)
    # transformers builds the block-causal mask from row 0 only when no cache is passed; a forward that defaults to
    # `use_cache=True` (an eval-mode model) would silently let samples attend to each other.
    packed["use_cache"] = False
    return packed


def padding_fraction(batch: dict) -> float:
    """The share of a batch's token slots that hold padding (0 for a packed batch)."""
    if "attention_mask" not in batch:
        return 0.0
    mask = batch["attention_mask"]
    return float((mask == 0).sum()) / max(mask.numel(), 1)
