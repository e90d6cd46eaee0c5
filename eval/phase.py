"""The `eval` phase: score several checkpoints on one MCQ set and write a comparison table."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from patho_r1.config import PhaseConfig, PhaseResult, check_model_reference
from patho_r1.eval.stats import mcnemar
from patho_r1.rewards.parsing import REASONING_SYSTEM_PROMPT


class CheckpointsPhaseConfig(PhaseConfig):
    """A phase that scores checkpoints (`eval`, `detection`): `model` alone scores one checkpoint (labelled
    `model`); `checkpoints` compares several."""

    checkpoints: dict[str, str] = Field(default_factory=dict, description="label -> checkpoint directory or hub id")

    @model_validator(mode="after")
    def _checkpoints_or_model(self):
        if not self.checkpoints and self.model:
            self.checkpoints = {"model": self.model}
        if not self.checkpoints:
            raise ValueError("checkpoints: name at least one checkpoint to score (or give model)")
        return self

    def check_inputs(self) -> None:
        super().check_inputs()
        for label, path in self.checkpoints.items():
            check_model_reference(f"checkpoints.{label}", path)


class EvalPhaseConfig(CheckpointsPhaseConfig):
    """Score checkpoints on one MCQ set."""

    data: str = Field(..., description="VLMEvalKit TSV or MCQ JSONL")
    engine: Literal["hf", "vllm"] = "hf"
    max_new_tokens: int = Field(128, gt=0)
    batch_size: int = Field(32, gt=0)
    limit: int | None = Field(None, gt=0, description="score only the first N rows")
    system_prompt: str | None = REASONING_SYSTEM_PROMPT
    scorer: Literal["official", "corrected"] = Field(
        "official", description="the headline rule: VLMEvalKit's exact matching (official), or our corrected rules "
        "(patho_r1.eval.rules); both columns are always written")
    wrong_image_control: bool = Field(True, description="also score every checkpoint with the images shuffled "
                                      "across items: a model that reads the image falls to chance")

    def input_paths(self) -> dict[str, str]:
        return {"data": self.data}


def wrong_images(records: list, seed: int) -> list:
    """The same items with every image moved to another item (a seeded derangement): the wrong-image control."""
    if len(records) < 2:
        return list(records)
    rng = random.Random(seed)
    order = list(range(len(records)))
    rng.shuffle(order)
    donor = {order[i]: order[(i + 1) % len(order)] for i in range(len(order))}  # a cycle: nobody keeps its own
    return [r.model_copy(update={"images": records[donor[i]].images}) for i, r in enumerate(records)]


def run_eval(cfg: EvalPhaseConfig) -> PhaseResult:
    """Evaluate each checkpoint through the benchmarks' one scoring path (the `mcq` benchmark: our own sets); writes
    each checkpoint's results, `summary.json` / `summary.md` and `paired.json`, and returns `{"summary": {label:
    numbers}}` as the result's metrics."""
    from patho_r1.eval.benchmarks import evaluate_benchmark, get_benchmark
    from patho_r1.eval.generation import SamplingConfig, make_generator
    from patho_r1.eval.scoring import write_results
    from patho_r1.models import load_backbone
    from patho_r1.training import wandb_run

    cfg.check_inputs()
    bench = get_benchmark("mcq")
    records = bench.read(cfg.data, limit=cfg.limit).records
    llm_judge = None
    if any(r.answer_type not in ("mcq", "yesno") for r in records):
        from patho_r1.eval.judge import LLMJudge

        llm_judge = LLMJudge.from_env()  # open questions need a judge: fail before generating, not after
    shuffled = wrong_images(records, cfg.seed) if cfg.wrong_image_control else None
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=0.0, batch_size=cfg.batch_size)
    out = Path(cfg.output_dir)
    summary: dict[str, dict] = {}
    scored: dict[str, list] = {}
    for label, path in cfg.checkpoints.items():
        t0 = time.time()
        if cfg.engine == "hf":
            backbone = load_backbone(path, dtype=cfg.dtype, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
            if not cfg.runs_on_cpu():
                backbone.model.to("cuda")
            generator, tokenizer = make_generator(backbone), backbone.tokenizer
        else:
            generator, tokenizer = make_generator(path, engine="vllm"), None

        options = dict(system_prompt=cfg.system_prompt, tokenizer=tokenizer, llm_judge=llm_judge, scorer=cfg.scorer,
                       seed=cfg.seed)
        report, rows = evaluate_benchmark(bench, records, generator, sampling, **options)
        write_results(out / label, report, rows, f"{label}: {Path(cfg.data).name}")
        summary[label] = {**checkpoint_numbers(report), "checkpoint": str(path)}
        scored[label] = rows
        if shuffled is not None:
            control, control_rows = evaluate_benchmark(bench, shuffled, generator, sampling, **options)
            write_results(out / label / "wrong_image", control, control_rows, f"{label}: images shuffled")
            summary[label]["wrong_image_accuracy"] = control["overall"]["accuracy"]
        summary[label]["seconds"] = round(time.time() - t0, 2)
        s = summary[label]
        print(f"[eval] {label}: accuracy={s['accuracy']:.3f} ({cfg.scorer}; official={s['official_accuracy']:.3f} "
              f"corrected={s['corrected_accuracy']:.3f}) strict={s['strict_accuracy']:.3f} "
              f"format={s['format_rate']:.3f} wrong-image={s.get('wrong_image_accuracy', 'n/a')} "
              f"(image-blind chance {s['chance']:.3f}, n={s['n']})", flush=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(summary_markdown(summary))
    labels = list(scored)
    paired = [paired_test(a, b, scored[a], scored[b]) for a, b in zip(labels, labels[1:], strict=False)]
    (out / "paired.json").write_text(json.dumps(paired, indent=2) + "\n")
    (out / "samples.json").write_text(json.dumps(sample_generations(records, scored, cfg.seed), indent=2) + "\n")
    with wandb_run(cfg, f"eval-{out.name}") as wandb_log:
        wandb_log(summary)
    return PhaseResult(model_dir=out, metrics={"summary": summary})


def paired_test(a: str, b: str, rows_a: list, rows_b: list) -> dict:
    """McNemar's exact test of two checkpoints on the same items, overall and, on a classification set (the rule
    `class_table` uses: `gold_classes`), within each gold class: an overall gain can hide a class that collapses, and
    the per-class test says whether that fall is more than chance."""
    from patho_r1.eval.scoring import gold_classes

    test = mcnemar(a, b, [bool(r.correct) for r in rows_a], [bool(r.correct) for r in rows_b])
    gold = gold_classes(rows_a)
    if gold is not None:
        test["per_class"] = {}
        for name in sorted(set(gold)):
            items = [i for i, g in enumerate(gold) if g == name]
            part = mcnemar(a, b, [bool(rows_a[i].correct) for i in items], [bool(rows_b[i].correct) for i in items])
            test["per_class"][name] = {k: part[k] for k in ("gained", "lost", "p_value")} | {"n": len(items)}
    return test


SAMPLES = 6  # items shown per run, the same items for every checkpoint
THUMBNAIL_PX = 128


def sample_generations(records: list, scored: dict[str, list], seed: int, n: int = SAMPLES) -> list[dict]:
    """A few items with each checkpoint's response and verdict, for the report: chosen with a fixed seed, half of
    them among the last checkpoint's failures (a page of successes says little), with a small thumbnail of the
    image inline so that the report stays one self-contained file."""
    last = list(scored.values())[-1]
    rng = random.Random(seed)
    failed = [i for i, r in enumerate(last) if not r.correct]
    passed = [i for i, r in enumerate(last) if r.correct]
    chosen = rng.sample(failed, min(len(failed), n // 2))
    chosen += rng.sample(passed, min(len(passed), n - len(chosen)))
    rest = [i for i in failed if i not in chosen]  # too few successes: fill up with more failures
    chosen += rng.sample(rest, min(len(rest), n - len(chosen)))
    samples = []
    for i in sorted(chosen):
        record, row = records[i], last[i]
        samples.append({"id": row.id, "question": row.question, "options": row.options, "answer": row.answer,
                        "thumbnail": _thumbnail(record.images[0]) if record.images else None,
                        "responses": {label: {"response": rows[i].response, "prediction": rows[i].prediction,
                                              "correct": rows[i].correct} for label, rows in scored.items()}})
    return samples


def _thumbnail(ref) -> str | None:
    """The image as a small PNG data URI; None when it cannot be read (the sample is still shown)."""
    import base64
    import io

    from patho_r1.data import load_image

    try:
        image = load_image(ref)
    except (FileNotFoundError, ValueError):
        return None
    image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def checkpoint_numbers(report: dict) -> dict:
    """A checkpoint's line of the phase summary, from its scoring report: the headline accuracy over every decided
    item (the chosen scorer's), both rules' accuracies, and the per-category and per-class numbers."""
    overall = report["overall"]
    return {"n": overall["n"], "accuracy": overall["accuracy"], "ci95": overall["ci95"], "scorer": report["scorer"],
            "official_accuracy": report["official"]["accuracy"], "corrected_accuracy": report["corrected"]["accuracy"],
            "strict_accuracy": report["strict_accuracy"] or 0.0, "format_rate": report["format_rate"],
            "mean_response_tokens": report["mean_response_tokens"], "chance": report["chance"],
            "uniform_chance": report["uniform_chance"], "per_category": report["groups"].get("category", {}),
            "classes": report.get("classes")}


def summary_markdown(summary: dict[str, dict]) -> str:
    lines = ["| checkpoint | accuracy | official | corrected | strict accuracy | format rate | mean tokens | chance | "
             "balanced accuracy |", "|---|---|---|---|---|---|---|---|---|"]
    for label, r in summary.items():
        balanced = f"{r['classes']['balanced_accuracy']:.3f}" if r.get("classes") else "-"
        lines.append(f"| {label} | {r['accuracy']:.3f} | {r['official_accuracy']:.3f} | "
                     f"{r['corrected_accuracy']:.3f} | {r['strict_accuracy']:.3f} | {r['format_rate']:.3f} | "
                     f"{r['mean_response_tokens']:.1f} | {r['chance']:.3f} | {balanced} |")
    return "\n".join(lines) + "\n"
