"""Teacher chain-of-thought: caption rows, through their prompt-grid cells, to an OpenAI-compatible endpoint.

    DIR/generations.jsonl   one line per finished request, keyed by (record_id, prompt_id): appended as replies
                            arrive, then put in the planned order when the stage ends
    DIR/failures.jsonl      append-only: requests that failed after every retry, or whose reply was not a chat
                            completion with text, with a one-line redacted reason (a re-run asks them again)
    DIR/generate.json       the identity of the run that wrote them (teacher, sampling, prompts), to refuse mixing

A line is written and flushed the moment its reply arrives, so a kill loses at most the requests in flight, and a
re-run sends only the keys `generations.jsonl` does not hold yet.  A torn last line (a kill mid-write) is cut off on
resume.  The stage folder is written in place (not swapped in by one rename like the other stages): the manifest is
what marks it finished.

Each record gets the cells of its subfield and level (from the tag and cluster stages), for `tasks` or a seeded
draw of `tasks_per_record` of them.  The reply keeps everything the filters need: the raw text, a separate
reasoning field, finish_reason, the gold diagnosis where known, and usage.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from patho_r1.curate.config import GenerateStage
from patho_r1.curate.grid import GRID_SUBFIELDS, PromptGrid, cell_id
from patho_r1.curate.rows import image_paths, read_id_table
from patho_r1.curate.stages import StageContext
from patho_r1.curate.store import iter_jsonl, relative_images, stage_files
from patho_r1.errors import ConfigError
from patho_r1.llm import ChatRequest, ChatResult, EndpointConfig, LLMClient, image_part, run
from patho_r1.redact import redact

GENERATIONS = "generations.jsonl"
FAILURES = "failures.jsonl"
IDENTITY = "generate.json"


@dataclass
class Job:
    """One request to send: a record through one cell (rendered only when sent: 500k rendered prompts would not
    fit in memory)."""

    record: dict
    cell: str
    images: list[str]  # relative to the stage folder
    gold: str | None
    grid: PromptGrid
    render_args: dict

    @property
    def key(self) -> str:
        return f"{self.record['id']}|{self.cell}"

    @functools.cached_property
    def text(self) -> str:
        return self.grid.render(self.cell, caption=self.record["caption"], **self.render_args)


def selected(record_id: str, fraction: float, seed: int) -> bool:
    """A stable share of the records: the same ids on every run, whatever the order or the number of workers."""
    if fraction >= 1:
        return True
    h = int(hashlib.sha256(f"{seed}:{record_id}".encode()).hexdigest()[:12], 16)
    return h / float(1 << 48) < fraction


def load_gold(labels: str | None) -> dict[str, str]:
    if not labels:
        return {}
    return {k: fields["diagnosis"] for k, (_, fields) in read_id_table(labels, ("diagnosis",)).items()}


def plan_jobs(stage: GenerateStage, parent: Path, out: Path, grid: PromptGrid, seed: int, counts: dict,
              gold: dict[str, str]) -> Iterator[Job]:
    """The requests the stage makes, in the parent's row order (a pure function of the config and the parent)."""
    files = stage_files(parent)
    if "caption" not in files:
        raise ConfigError(f"{parent}: no caption.jsonl; the teacher writes from captions (run the stage on an "
                          "import, dedup, tag or cluster folder of caption rows)")
    n = 0
    for row in iter_jsonl(files["caption"]):
        rid = str(row["id"])
        if not selected(rid, stage.fraction, seed):
            counts["not_selected"] += 1
            continue
        subfield = row.get("subfield") or "histopathology"
        if subfield not in GRID_SUBFIELDS:
            if stage.other_subfield is None:
                counts[f"skipped_subfield.{subfield}"] += 1
                continue
            subfield = stage.other_subfield
        level = row.get("difficulty") or stage.default_level
        rng = np.random.default_rng([seed, int(hashlib.sha256(rid.encode()).hexdigest()[:8], 16)])
        tasks = list(stage.tasks)
        if stage.tasks_per_record and stage.tasks_per_record < len(tasks):
            weights = np.array([stage.task_weights.get(t, 1.0) for t in tasks])
            draw = rng.choice(len(tasks), stage.tasks_per_record, replace=False, p=weights / weights.sum())
            tasks = [tasks[i] for i in sorted(draw)]
        images = relative_images(row, parent, out).get("images") or []
        refs = row.get("references") or []
        for task in tasks:
            if stage.limit is not None and n >= stage.limit:
                return
            n_turns = int(rng.integers(stage.min_turns, stage.max_turns + 1))
            args = {"references": refs, "with_image": stage.with_image, "n_options": stage.n_options,
                    "n_turns": n_turns}
            yield Job(row, cell_id(subfield, level, task), images, gold.get(rid, row.get("diagnosis")), grid, args)
            n += 1


def request_for(job: Job, out: Path, with_image: bool) -> ChatRequest:
    content: str | list = job.text
    if with_image and job.images:
        parts = [image_part(p) for p in image_paths({"images": job.images}, out)]
        content = [*parts, {"type": "text", "text": job.text}]
    return ChatRequest(key=job, messages=[{"role": "user", "content": content}])


def output_row(job: Job, result: ChatResult, model: str) -> dict:
    subfield, level, task = job.cell.split("/")
    record = job.record
    return {"id": f"{record['id']}#{task}", "record_id": record["id"], "prompt_id": job.cell, "task": task,
            "subfield": subfield, "level": level, "caption": record["caption"], "images": job.images,
            "gold": job.gold, "response": result.text, "reasoning": result.reasoning,
            "finish_reason": result.finish_reason, "model": model,
            "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens},
            "seconds": round(result.seconds, 3)}


def finished_keys(path: Path) -> set[str]:
    """Keys already answered; a torn last line (a kill mid-write) is cut off so appends start on a line."""
    if not path.is_file():
        return set()
    keys, good_end = set(), 0
    with path.open("rb") as fh:
        for line in fh:
            if not line.endswith(b"\n"):
                break
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break
            keys.add(f"{row['record_id']}|{row['prompt_id']}")
            good_end += len(line)
    if good_end != path.stat().st_size:
        with path.open("r+b") as fh:
            fh.truncate(good_end)
    return keys


def guard_identity(out: Path, identity: dict, resume: bool) -> None:
    """Refuse to append one teacher's replies to another's; without resume, move the old ones aside (no loss)."""
    path = out / IDENTITY
    old = json.loads(path.read_text()) if path.is_file() else None
    if old is not None and old != identity and resume:
        raise ConfigError(f"{out}: holds generations from another teacher config ({path}); use another output "
                          "folder, or --force to move them aside and start again")
    if old is not None and not resume:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for name in (GENERATIONS, FAILURES, IDENTITY):
            if (out / name).exists():
                os.replace(out / name, out / f"{Path(name).stem}.{stamp}{Path(name).suffix}")
    path.write_text(json.dumps(identity, indent=2, sort_keys=True) + "\n")


def estimate(jobs: list[Job], endpoint: EndpointConfig) -> dict:
    """What a run would send: requests, and tokens estimated at 4 characters a token (an upper bound out)."""
    tokens_in = sum(len(j.text) for j in jobs) // 4
    tokens_out = len(jobs) * endpoint.max_tokens
    return {"requests": len(jobs), "est_prompt_tokens": tokens_in, "max_completion_tokens": tokens_out,
            "est_max_cost_usd": endpoint.cost(tokens_in, tokens_out)}


def generate(make_jobs: Callable[[], Iterator[Job]], out: Path, endpoint: EndpointConfig, with_image: bool,
             progress, counts: dict) -> None:
    """Send every job not already answered; append replies (and failures) as they arrive.  `make_jobs` is called
    twice: once to count what is left (for the ETA), once to send it, lazily."""
    done = finished_keys(out / GENERATIONS)
    n_jobs = resumed = 0
    for job in make_jobs():  # prompts render lazily: this pass reads rows and draws tasks only
        n_jobs += 1
        resumed += job.key in done
    counts["resumed"] = resumed
    progress.total = counts["requests"] = n_jobs - resumed
    pending = (j for j in make_jobs() if j.key not in done)
    run(_send(pending, out, endpoint, with_image, progress, counts))
    put_in_planned_order(out / GENERATIONS, (job.key for job in make_jobs()))


def put_in_planned_order(path: Path, planned: Iterator[str]) -> None:
    """Rewrite `generations.jsonl` in the order its requests were planned, not the order their replies arrived.
    With several requests in flight the arrival order changes from run to run, and the filter, the MCQ builder and
    SFT's seeded sampler read rows in file order: two identical runs would train on different batches.  Only byte
    offsets are held in memory; rows of keys no longer planned go last in their file order; the rewrite is atomic
    (a kill leaves the arrival-ordered file, which a resume reads as well)."""
    if not path.is_file():
        return
    rank = {key: i for i, key in enumerate(planned)}
    spans = []  # (planned position, offset, length)
    with path.open("rb") as fh:
        offset = 0
        for line in fh:
            row = json.loads(line)
            spans.append((rank.get(f"{row['record_id']}|{row['prompt_id']}", len(rank)), offset, len(line)))
            offset += len(line)
    spans.sort()
    if all(a[1] < b[1] for a, b in zip(spans, spans[1:], strict=False)):
        return  # already in order (one request at a time, or a finished stage read again)
    tmp = path.with_name(path.name + ".tmp")
    with path.open("rb") as src, tmp.open("wb") as dst:
        for _, offset, length in spans:
            src.seek(offset)
            dst.write(src.read(length))
        dst.flush()
        os.fsync(dst.fileno())
    os.replace(tmp, path)


async def _send(pending: Iterator[Job], out: Path, endpoint: EndpointConfig, with_image: bool, progress,
                counts: dict) -> None:
    """Send `pending`, appending each reply (or failure) to its file the moment it arrives."""
    with (out / GENERATIONS).open("a", encoding="utf-8") as gen, (out / FAILURES).open("a", encoding="utf-8") as bad:
        async with LLMClient(endpoint) as client:
            def on_result(request: ChatRequest, result: ChatResult) -> None:
                job: Job = request.key
                if result.error is not None:
                    counts["failed"] += 1
                    # the client redacts its errors; this file is the one a user pastes into an issue
                    bad.write(json.dumps({"record_id": job.record["id"], "prompt_id": job.cell,
                                          "error": redact(result.error), "time": time.time()}) + "\n")
                    bad.flush()
                else:
                    counts["answered"] += 1
                    counts["finish_length"] += result.finish_reason == "length"
                    gen.write(json.dumps(output_row(job, result, endpoint.model), ensure_ascii=False) + "\n")
                    gen.flush()  # in the OS's hands now: a killed process loses nothing written
                cost = client.cost()
                progress.advance(1, tokens_in=client.prompt_tokens, tokens_out=client.completion_tokens,
                                 **({"cost_usd": round(cost, 4)} if cost is not None else {}))

            await client.map((request_for(j, out, with_image) for j in pending), on_result)
            counts["prompt_tokens"] = client.prompt_tokens
            counts["completion_tokens"] = client.completion_tokens
            if client.cost() is not None:
                counts["cost_usd"] = round(client.cost(), 4)


def run_generate(stage: GenerateStage, ctx: StageContext) -> dict:
    """The generate stage's runner (`curate/stages.py`); with `ctx.dry_run`, what it would send, and nothing sent."""
    parent, out, seed = ctx.parent, ctx.work, ctx.seed
    grid = PromptGrid(Path(stage.prompts) if stage.prompts else None)
    gold = load_gold(stage.labels)
    counts: Counter = Counter()
    if ctx.dry_run:
        return {**estimate(list(plan_jobs(stage, parent, out, grid, seed, counts, gold)), stage.endpoint), **counts}
    guard_identity(out, stage.identity(grid.digest()), ctx.resume)
    skipped: Counter = Counter()  # the planning passes count skips; keep one pass's worth

    def make_jobs():
        skipped.clear()
        return plan_jobs(stage, parent, out, grid, seed, skipped, gold)

    generate(make_jobs, out, stage.endpoint, stage.with_image, ctx.progress, counts)
    counts.update(skipped)
    tasks = Counter(r["task"] for r in iter_jsonl(out / GENERATIONS))  # this run's replies and earlier ones
    return {**counts, "generations": sum(tasks.values()), "complete": counts["failed"] == 0, "tasks": dict(tasks)}
