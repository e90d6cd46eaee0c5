"""MCQ records -> GRPO prompts.  Extra columns (`answer`, `answer_type`, `category`) travel to the rewards."""

from __future__ import annotations

import logging

from datasets import Dataset, Image, Sequence

from patho_r1.data import MCQRecord, image_feature_value, iter_records
from patho_r1.errors import DataError

logger = logging.getLogger(__name__)


def mcq_prompt(record: MCQRecord, system_prompt: str | None) -> list[dict]:
    content = [{"type": "image", "text": None} for _ in record.images]
    content.append({"type": "text", "text": record.prompt_text()})
    messages = [{"role": "user", "content": content}]
    if system_prompt:
        messages.insert(0, {"role": "system", "content": [{"type": "text", "text": system_prompt}]})
    return messages


def prompt_length(processor, record: MCQRecord, system_prompt: str | None) -> int:
    """Prompt tokens after image-token expansion, computed from the image grid without decoding pixels twice."""
    from patho_r1.data import load_image

    text = processor.apply_chat_template(mcq_prompt(record, system_prompt), tokenize=False,
                                         add_generation_prompt=True)
    images = [load_image(ref) for ref in record.images]
    enc = processor(text=[text], images=images or None, return_tensors="pt")
    return int(enc["input_ids"].shape[1])


def build_rl_dataset(source: str, system_prompt: str | None, processor=None,
                     max_prompt_length: int | None = None) -> Dataset:
    rows, dropped = [], 0
    for rec in iter_records(source, "mcq"):
        assert isinstance(rec, MCQRecord)
        # Filter after image-token expansion: a prompt cut inside its image tokens fails in the model with
        # "Image features and image tokens do not match".
        if max_prompt_length and processor is not None and prompt_length(processor, rec, system_prompt) \
                > max_prompt_length:
            dropped += 1
            continue
        rows.append({"prompt": mcq_prompt(rec, system_prompt), "images": [image_feature_value(r) for r in rec.images],
                     "answer": rec.answer,
                     "answer_type": rec.answer_type, "category": rec.category or "", "id": rec.id or ""})
    if dropped:
        logger.warning("%s: dropped %d prompts longer than max_prompt_length=%d", source, dropped, max_prompt_length)
    if not rows:
        raise DataError(source, None, None, f"no usable prompts: the file has {dropped} rows and all of them were "
                        f"longer than max_prompt_length={max_prompt_length}" if dropped else "no rows to train on")
    ds = Dataset.from_list(rows)
    return ds.cast_column("images", Sequence(Image()))  # decoded to PIL lazily, per row access
