"""`patho-r1 curate <stage>`: run one data-engine stage from the command line.

    patho-r1 curate formats
    patho-r1 curate import --format pathvqa path-vqa/data --out cur/01-import [--on-error skip] [--license STR]
    patho-r1 curate dedup cur/01-import --out cur/02-dedup
    patho-r1 curate decontaminate cur/02-dedup --against PathMMU_TEST.tsv --out cur/03-decon
    patho-r1 curate tag cur/03-decon --seed seed.csv [--corrections review.csv] --out cur/04-tag
    patho-r1 curate cluster cur/04-tag --out cur/05-cluster [--truth truth.csv]

A stage whose output is already there, from the same config and inputs, is skipped (`--force` reruns it).  The
console shows a progress bar and one summary line; everything is in OUT/manifest.json.
"""

from __future__ import annotations

import time
from pathlib import Path


def _columns(text: str | None) -> dict[str, str]:
    if not text:
        return {}
    out = {}
    for pair in text.split(","):
        ours, sep, theirs = pair.partition("=")
        if not sep:
            raise ValueError(f"--columns: expected ours=theirs, got {pair!r}")
        out[ours.strip()] = theirs.strip()
    return out


def _summary(manifest) -> str:
    counts = manifest.counts
    kinds = ", ".join(f"{n} {k}" for k, n in counts.get("kinds", {}).items()) or "no rows"
    extra = []
    if counts.get("rows.rejects"):
        extra.append(f"{counts['rows.rejects']} rejected (rejects.jsonl)")
    if counts.get("rows.removed"):
        extra.append(f"{counts['rows.removed']} removed (removed.jsonl)")
    if "adjusted_rand_index" in counts:
        extra.append(f"ARI vs truth {counts['adjusted_rand_index']}")
    if counts.get("holdout"):
        extra.append(f"held-out accuracy {counts['holdout'].get('accuracy')}")
    tail = f"; {'; '.join(extra)}" if extra else ""
    return f"{manifest.stage}: {kinds}{tail} in {manifest.seconds:.1f}s ({counts.get('rows_per_s', 0):,.0f} rows/s)"


def _run(args, stage, model_encoder) -> int:
    from pydantic import TypeAdapter, ValidationError

    from patho_r1.config import format_validation_error
    from patho_r1.curate.config import Stage
    from patho_r1.curate.pipeline import run_stage
    from patho_r1.errors import ConfigError

    parent = None if stage["stage"] == "import" else Path(args.input)

    try:
        validated = TypeAdapter(Stage).validate_python(stage)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source=f"curate {stage['stage']}")) from None
    started = time.time()
    manifest = run_stage(validated, parent, Path(args.out), engine=getattr(args, "engine", None),
                         show_progress=True, model_encoder=model_encoder, resume=not args.force, seed=args.seed)
    if manifest.created < started:
        print(f"{manifest.stage}: up to date (same config and inputs), skipped; --force runs it again")
    print(_summary(manifest))
    print(f"  -> {Path(args.out).resolve()} (manifest.json)")
    return 0


def _cmd_formats(args) -> int:
    from patho_r1.curate.formats import FORMATS

    for fmt in FORMATS.values():
        print(f"{fmt.name:12s} {fmt.summary}" + (f"  [license: {fmt.license}]" if fmt.license else ""))
    return 0


def register(sub, model_encoder=None) -> None:
    """`model_encoder`: the top floor's factory for model embedders (tag and cluster with `--embedder patho|hf`)."""
    p = sub.add_parser("curate", help="the data engine: import, dedup, decontaminate, tag, cluster")
    stages = p.add_subparsers(dest="curate_command", required=True)

    f = stages.add_parser("formats", help="list the import formats")
    f.set_defaults(func=_cmd_formats)

    def common(q, with_input=True):
        if with_input:
            q.add_argument("input", help="the folder of the stage before")
        q.add_argument("--out", required=True, help="output folder")
        q.add_argument("--force", action="store_true", help="rerun even if the output is up to date")
        q.add_argument("--seed", type=int, default=0, help="random seed (tagging's held-out split, K-means)")

    def embedder(q):
        q.add_argument("--embedder", choices=["features", "patho", "hf"], default="features",
                       help="features: image statistics + hashed words, no model; patho: our embedding head; "
                       "hf: a Hugging Face image encoder")
        q.add_argument("--model", help="model path for the patho / hf embedder")
        q.add_argument("--adapter", help="embedding adapter for the patho embedder")
        q.add_argument("--engine", choices=["auto", "local", "ray"], default="auto")

    def spec(a):
        return {"kind": a.embedder, "model": a.model, "adapter": a.adapter}

    q = stages.add_parser("import", help="import a public corpus in its own format")
    q.add_argument("source", help="the corpus file or folder")
    q.add_argument("--format", required=True, help="see `patho-r1 curate formats`")
    q.add_argument("--images", help="the image folder, where the format names image files")
    q.add_argument("--kind", choices=["caption", "mcq", "conversation"], help="csv/jsonl: the rows' kind")
    q.add_argument("--columns", help="csv/jsonl: ours=theirs,... (e.g. caption=text,images=file)")
    q.add_argument("--license", help="the license to record (default: the one the dataset card states)")
    q.add_argument("--on-error", choices=["raise", "skip"], default="raise",
                   help="skip: bad rows go to rejects.jsonl with the reason")
    q.add_argument("--link-images", action="store_true", help="hard-link image files into the store instead of "
                   "copying them (no second copy; the sources must then not be edited in place)")
    q.add_argument("--engine", choices=["auto", "local", "ray"], default="auto")
    common(q, with_input=False)
    q.set_defaults(func=lambda a: _run(a, {"stage": "import", "on_error": a.on_error,
                                           "images": "link" if a.link_images else "copy", "sources": [
        {"format": a.format, "path": a.source, "images": a.images, "kind": a.kind, "columns": _columns(a.columns),
         "license": a.license}]}, model_encoder))

    q = stages.add_parser("dedup", help="exact image duplicates and near-duplicate texts (MinHash LSH)")
    q.add_argument("--threshold", type=float, default=0.8)
    q.add_argument("--engine", choices=["auto", "local", "ray"], default="auto")
    common(q)
    q.set_defaults(func=lambda a: _run(a, {"stage": "dedup", "threshold": a.threshold, "engine": a.engine},
                                       model_encoder))

    q = stages.add_parser("decontaminate", help="remove rows whose image or text is in an evaluation set")
    q.add_argument("--against", nargs="+", required=True, help="benchmark TSVs or curated benchmark folders")
    q.add_argument("--threshold", type=float, default=0.7)
    q.add_argument("--engine", choices=["auto", "local", "ray"], default="auto")
    common(q)
    q.set_defaults(func=lambda a: _run(a, {"stage": "decontaminate", "against": a.against,
                                           "threshold": a.threshold}, model_encoder))

    q = stages.add_parser("tag", help="subfield labels: a classifier on embeddings from a labelled seed")
    q.add_argument("--seed-labels", "--labels", dest="labels", help="CSV or JSONL of id, subfield")
    q.add_argument("--corrections", nargs="*", default=[], help="reviewed review.csv files")
    q.add_argument("--review", type=int, default=50, help="least confident rows to write to review.csv")
    embedder(q)
    common(q)
    q.set_defaults(func=lambda a: _run(a, {"stage": "tag", "seed": a.labels, "corrections": a.corrections,
                                           "review": a.review, "embedder": spec(a), "engine": a.engine},
                                       model_encoder))

    q = stages.add_parser("cluster", help="easy / medium / hard within each subfield (K-means)")
    q.add_argument("--criterion", choices=["term_density", "centroid_distance", "caption_length"],
                   default="term_density")
    q.add_argument("--truth", help="CSV of id, difficulty: report the adjusted Rand index against it")
    embedder(q)
    common(q)
    q.set_defaults(func=lambda a: _run(a, {"stage": "cluster", "criterion": a.criterion, "truth": a.truth,
                                           "embedder": spec(a), "engine": a.engine}, model_encoder))

