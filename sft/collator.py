"""The VLM collator for CPT and SFT: TRL's `DataCollatorForVisionLanguageModeling`, plus what it lacks here.

What we add, and why:

* **Image references.**  Rows carry image paths or base64 (light, streamable datasets); images are decoded per batch,
  optionally stain-augmented, and handed to TRL's collation as PIL images.
* **Loss on every assistant turn** of `messages` conversations, on any transformers version.  TRL's own
  `assistant_only_loss` needs a `{% generation %}` chat template and transformers >= 5.18, while the `[vllm]` extra
  pins transformers < 5.18.  We let TRL tokenise (so image tokens, `mm_token_type_ids` and padding stay TRL's) and
  then derive the assistant mask from the token ids: the spans after `<|im_start|>assistant\\n` up to and including
  `<|im_end|>`.
* **A system prompt** (the Patho-R1 reasoning prompt by default) inserted into conversations that have none.
* **The vision tower's index tensors, computed here on the CPU** (`patho_r1.attention.vision_index_kwargs`), so the
  model's vision forward reads nothing back from the device.
* **Packed batches** (`packing=True`, `sft/packing.py`): the micro-batch's samples end to end in one row, no padding.

Prompt/completion rows (CPT captions) go through TRL's prompt-completion path unchanged, which masks the prompt.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

from patho_r1.attention import vision_index_kwargs
from patho_r1.data import load_image
from patho_r1.sft.packing import IGNORE_INDEX, RopeIndex, pack_batch


def assistant_token_mask(input_ids: torch.Tensor, start_ids: list[int], end_id: int) -> torch.Tensor:
    """True on tokens inside assistant turns: after each `start_ids` marker, up to and including `end_id`.

    Vectorised: a token is inside a turn when the latest turn opening at or before it is later than the latest turn
    closing (the position after an `end_id`) at or before it.
    """
    batch, length = input_ids.shape
    n = len(start_ids)
    pos = torch.arange(length, device=input_ids.device).expand(batch, length)
    opens = torch.zeros_like(input_ids, dtype=torch.bool)
    if length > n:
        marker = torch.tensor(start_ids, device=input_ids.device)
        is_start = (input_ids.unfold(1, n, 1) == marker).all(-1)  # [B, L - n + 1]
        opens[:, n:] = is_start[:, : length - n]
    closes = torch.zeros_like(opens)
    closes[:, 1:] = input_ids[:, :-1] == end_id
    last_open = torch.where(opens, pos, -1).cummax(dim=1).values
    last_close = torch.where(closes, pos, -1).cummax(dim=1).values
    return last_open > last_close


@dataclass
class PathoVLMCollator(DataCollatorForVisionLanguageModeling):
    """Collates rows of either shape:

    * `{"conversation": <JSON messages>, "images": [refs]}`: SFT; loss on all assistant turns.
    * `{"prompt": [...], "completion": [...], "images": [refs]}`: CPT; loss on the completion (TRL's path).
    """

    system_prompt: str | None = None
    augment: Callable[[Any, np.random.Generator], Any] | None = None
    augment_seed: int = 0
    # The model's config: with it, the vision indices are precomputed here and `packing` can compute mRoPE positions.
    model_config: Any = None
    packing: bool = False

    def __post_init__(self):
        tok = self.processor.tokenizer
        self._assistant_start = tok.encode("<|im_start|>assistant\n", add_special_tokens=False)
        self._im_end = tok.convert_tokens_to_ids("<|im_end|>")
        self._calls = 0
        if self.packing and self.model_config is None:
            raise ValueError("packing needs the model's config (model_config) to compute the mRoPE positions")
        self._rope_index = RopeIndex(self.model_config) if self.model_config is not None else None

    def _images(self, refs: list) -> list:
        images = [load_image(r) for r in refs or []]
        if self.augment is not None:
            rng = np.random.default_rng([self.augment_seed, self._calls])
            images = [self.augment(img, rng) for img in images]
        return images

    def _messages(self, conversation) -> list[dict]:
        messages = json.loads(conversation) if isinstance(conversation, str) else conversation
        if self.system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        return messages

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        self._calls += 1
        if "conversation" in examples[0]:
            rows = [{"messages": self._messages(ex["conversation"]), "images": self._images(ex.get("images"))}
                    for ex in examples]
            batch = self._collate_language_modeling(rows)
            keep = assistant_token_mask(batch["input_ids"], self._assistant_start, self._im_end)
            batch["labels"][~keep] = IGNORE_INDEX
        else:
            rows = []
            for ex in examples:
                prompt = ex["prompt"]
                if self.system_prompt and prompt[0]["role"] != "system":
                    prompt = [{"role": "system", "content": self.system_prompt}, *prompt]
                rows.append({"prompt": prompt, "completion": ex["completion"],
                             "images": self._images(ex.get("images"))})
            batch = self._collate_prompt_completion(rows)
        return self._finish(batch)

    def _finish(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Precompute, on the CPU, what the model's forward would otherwise compute on the device with host reads:
        the vision tower's index tensors and the mRoPE positions (as the model does, only for batches with images;
        always when packing, which needs them per sample), then pack."""
        images = batch.get("image_grid_thw")
        if self._rope_index is not None and images is not None:
            batch.update(vision_index_kwargs(images, self.model_config.vision_config))
        if self._rope_index is not None and (images is not None or self.packing):
            batch["position_ids"] = self._rope_index(batch["input_ids"], batch["attention_mask"], images,
                                                     batch.get("mm_token_type_ids"))
        if self.packing:
            batch = pack_batch(batch)
        return batch
