"""Records -> TRL-ready rows.  Images stay as references; the collator decodes them per batch."""

from __future__ import annotations

import json
from collections.abc import Iterator

from datasets import Dataset, IterableDataset

from patho_r1.data import CaptionRecord, ConversationRecord, iter_records
from patho_r1.errors import DataError


def caption_rows(source: str, instruction: str) -> Iterator[dict]:
    for rec in iter_records(source, "caption"):
        assert isinstance(rec, CaptionRecord)
        content = [{"type": "image", "text": None} for _ in rec.images]
        content.append({"type": "text", "text": instruction})
        yield {"prompt": [{"role": "user", "content": content}],
               "completion": [{"role": "assistant", "content": rec.caption}],
               "images": list(rec.images)}


def conversation_rows(source: str) -> Iterator[dict]:
    for rec in iter_records(source, "conversation"):
        assert isinstance(rec, ConversationRecord)
        messages = [m.model_dump(exclude_none=True) for m in rec.messages]
        # Stored as JSON: user turns hold content lists while assistant turns hold strings, which Arrow cannot mix.
        yield {"conversation": json.dumps(messages, ensure_ascii=False), "images": list(rec.images)}


def to_dataset(rows_fn, *, streaming: bool = False, **kwargs) -> Dataset | IterableDataset:
    """A streaming `IterableDataset` (never materialised) or an in-memory `Dataset`.

    `Dataset.from_generator` is avoided on purpose: it caches by the generator's arguments, so an edited data file
    at the same path would silently reuse stale rows.
    """
    if streaming:
        return IterableDataset.from_generator(rows_fn, gen_kwargs=kwargs)
    rows = list(rows_fn(**kwargs))
    if not rows:  # TRL would stop at its first batch with a bare StopIteration
        raise DataError(kwargs.get("source", "<data>"), None, None, "no rows to train on")
    return Dataset.from_list(rows)
