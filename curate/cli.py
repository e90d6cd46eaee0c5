"""`patho-r1 curate <stage>`: run one data-engine stage from the command line.

    patho-r1 curate formats
    patho-r1 curate import --format pathvqa path-vqa/data --out cur/01-import [--on-error skip] [--license STR]
    patho-r1 curate dedup cur/01-import --out cur/02-dedup
    patho-r1 curate decontaminate cur/02-dedup --against PathMMU_TEST.tsv --out cur/03-decon
    patho-r1 curate tag cur/03-decon --seed seed.csv [--corrections review.csv] --out cur/04-tag
    patho-r1 curate cluster cur/04-tag --out cur/05-cluster [--truth truth.csv]
    patho-r1 curate prompts [--list | --show CELL] [--prompts OVERRIDES]
    patho-r1 curate generate cur/05-cluster --base-url URL --model M --out cur/06-generate [--dry-run] [--limit N]
    patho-r1 curate filter --input cur/06-generate/generations.jsonl --out cur/07-filter
    patho-r1 curate mcq cur/07-filter --n 10000 --out cur/08-mcq [--source teacher --base-url URL --model M]

A stage whose output is already there, from the same config and inputs, is skipped (`--force` reruns it).  The
console shows a progress bar and one summary line; everything is in OUT/manifest.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from patho_r1.curate.config import ENGINES


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
    if "answered" in counts:
        extra.append(f"{counts['answered']} teacher replies ({counts.get('resumed', 0)} already there), "
                     f"{counts.get('prompt_tokens', 0):,} tokens in, {counts.get('completion_tokens', 0):,} out"
                     + (f", ${counts['cost_usd']}" if "cost_usd" in counts else ""))
    if "rejected_by_rule" in counts:
        extra.append(f"{counts['kept']} kept, {counts['rejected']} rejected (filter_report.md)")
    if "letters" in counts:
        b = counts.get("no_image") or {}
        extra.append(f"letters {counts['letters']}; best no-image rule {b.get('best')} vs chance {b.get('chance')}")
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

    parent = None if stage["stage"] == "import" or not args.input else Path(args.input)

    try:
        validated = TypeAdapter(Stage).validate_python(stage)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source=f"curate {stage['stage']}")) from None
    started = time.time()
    dry_run = getattr(args, "dry_run", False)
    manifest = run_stage(validated, parent, Path(args.out), engine=getattr(args, "engine", None),
                         show_progress=True, model_encoder=model_encoder, resume=not args.force, seed=args.seed,
                         dry_run=dry_run, overwrite=getattr(args, "overwrite", False))
    if dry_run:
        c = manifest.counts
        cost = f", at most ${c['est_max_cost_usd']:,.2f}" if c.get("est_max_cost_usd") is not None else ""
        print(f"generate (dry run): {c['requests']:,} requests, about {c['est_prompt_tokens']:,} prompt tokens and "
              f"at most {c['max_completion_tokens']:,} completion tokens{cost}; nothing sent")
        return 0
    if not manifest.complete:
        failures = Path(args.out) / "failures.jsonl"
        last = failures.read_text().splitlines()[-1:] if failures.is_file() else []
        print(_summary(manifest))
        print(f"{manifest.stage}: {manifest.counts.get('failed', 0)} requests failed after every retry "
              f"({failures}); run the same command again to retry them"
              + (f"\n  last error: {json.loads(last[0])['error']}" if last else ""))
        return 1
    if manifest.created < started:
        print(f"{manifest.stage}: up to date (same config and inputs), skipped; --force runs it again")
    print(_summary(manifest))
    print(f"  -> {Path(args.out).resolve()} (manifest.json)")
    return 0


def _cmd_formats(args) -> int:
    from patho_r1.formats import FORMATS

    for fmt in FORMATS.values():
        print(f"{fmt.name:12s} {fmt.summary}" + (f"  [license: {fmt.license}]" if fmt.license else ""))
    return 0


def engine_option(q) -> None:
    q.add_argument("--engine", choices=ENGINES, default="auto",
                   help="where the per-row work runs: local (this process), processes (a pool, one per core), ray "
                   "(Ray Data); auto: in process under 50k rows, else Ray on 8+ CPUs, else the pool")


def register(sub, model_encoder=None) -> None:
    """`model_encoder`: the top floor's factory for model embedders (tag and cluster with `--embedder patho|hf`)."""
    p = sub.add_parser("curate", help="the data engine: import, dedup, decontaminate, tag, cluster, prompts, "
                       "generate, filter, mcq")
    stages = p.add_subparsers(dest="curate_command", required=True)

    f = stages.add_parser("formats", help="list the import formats")
    f.set_defaults(func=_cmd_formats)

    def common(q, with_input=True):
        if with_input:
            q.add_argument("input", help="the folder of the stage before")
        q.add_argument("--out", required=True, help="output folder")
        q.add_argument("--force", action="store_true", help="rerun even if the output is up to date")
        q.add_argument("--overwrite", action="store_true", help="write --out even if it is a folder holding files "
                       "that are not this command's output (they are deleted); without it such a folder, or a "
                       "path that is a file, is refused")
        q.add_argument("--seed", type=int, default=0,
                       help="random seed (held-out splits, K-means, task draws, MCQ sampling)")

    def embedder(q):
        q.add_argument("--embedder", choices=["features", "patho", "hf"], default="features",
                       help="features: image statistics + hashed words, no model; patho: our embedding head; "
                       "hf: a Hugging Face image encoder")
        q.add_argument("--model", help="model path for the patho / hf embedder")
        q.add_argument("--adapter", help="embedding adapter for the patho embedder")
        engine_option(q)

    def spec(a):
        return {"kind": a.embedder, "model": a.model, "adapter": a.adapter}

    from patho_r1.data import MAX_TEXT_CHARS

    q = stages.add_parser("import", help="import a public corpus in its own format", description=(
        "Import a public corpus in its own format.  Each row is refused (stops the import, naming file, row and "
        "field; with --on-error skip, written to rejects.jsonl with the reason) when: an image file resolves "
        "outside the image folder (a '..' name, an absolute path elsewhere, a symbolic link out of it; "
        "--allow-outside-images takes them); an image is missing, not a regular file, damaged or truncated, or has "
        "more than PIL's Image.MAX_IMAGE_PIXELS pixels (89,478,485: its decompression-bomb guard, under which "
        f"training opens images); a text field holds more than {MAX_TEXT_CHARS:,} characters (about 25k tokens: "
        "longer is a broken export, such as a whole article in one cell); its id is an earlier row's (both rows "
        "are named).  A source with no rows is an error."))
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
    q.add_argument("--allow-outside-images", action="store_true", help="take image files that resolve outside "
                   "the image folder (refused by default, so that a dataset's rows cannot pull other files in)")
    engine_option(q)
    common(q, with_input=False)
    q.set_defaults(func=lambda a: _run(a, {"stage": "import", "on_error": a.on_error,
                                           "images": "link" if a.link_images else "copy", "sources": [
        {"format": a.format, "path": a.source, "images": a.images, "kind": a.kind, "columns": _columns(a.columns),
         "license": a.license, "allow_outside_images": a.allow_outside_images}]}, model_encoder))

    q = stages.add_parser("dedup", help="exact image duplicates and near-duplicate texts (MinHash LSH)")
    q.add_argument("--threshold", type=float, default=0.8)
    engine_option(q)
    common(q)
    q.set_defaults(func=lambda a: _run(a, {"stage": "dedup", "threshold": a.threshold, "engine": a.engine},
                                       model_encoder))

    q = stages.add_parser("decontaminate", help="remove rows whose image or text is in an evaluation set")
    q.add_argument("--against", nargs="+", required=True, help="benchmark TSVs or curated benchmark folders")
    q.add_argument("--threshold", type=float, default=0.7)
    engine_option(q)
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


    q = stages.add_parser("prompts", help="the teacher prompt grid: 5 subfields x 3 levels x 4 tasks")
    q.add_argument("--list", action="store_true", help="list the 60 cells and the file each renders from")
    q.add_argument("--show", metavar="CELL", help="render one cell (subfield/level/task) with --caption")
    q.add_argument("--caption", default="H&E-stained section of colon showing gland-like rings lined by crowded "
                   "nuclei, consistent with adenocarcinoma.")
    q.add_argument("--prompts", help="a folder of overrides laid out like curate/prompts")
    q.set_defaults(func=_cmd_prompts)

    def endpoint(q, required=True):
        q.add_argument("--base-url", required=required, help="the teacher's OpenAI-compatible /v1 URL")
        q.add_argument("--model", dest="teacher_model", required=required, help="the teacher's model name")
        q.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
        q.add_argument("--concurrency", type=int, default=8)
        q.add_argument("--max-tokens", type=int, default=4096)
        q.add_argument("--temperature", type=float, default=0.6)
        q.add_argument("--price-in", type=float, help="USD per million prompt tokens (cost estimate)")
        q.add_argument("--price-out", type=float, help="USD per million completion tokens")
        q.add_argument("--prompts", help="a folder of prompt overrides laid out like curate/prompts")
        q.add_argument("--with-image", action="store_true", help="send the image too (a VLM teacher)")
        timeouts(q)

    def timeouts(q):
        from patho_r1.llm import EndpointConfig

        default = {name: EndpointConfig.model_fields[name].default for name in ("timeout", "max_retries")}
        q.add_argument("--timeout", type=float, help="seconds a request waits on the server: to connect, or for the "
                       f"next bytes of the reply, per attempt (default {default['timeout']:g}, for a local model "
                       "server)")
        q.add_argument("--max-retries", type=int, help="retries per request on 429, 5xx, timeouts and dropped "
                       f"connections, with backoff (default {default['max_retries']})")
        q.add_argument("--deadline", type=float, help="seconds per request, every attempt together: a held "
                       "connection or a trickling reply then fails that request (default: timeout x (retries + 1) "
                       "+ 10 s a retry)")

    def endpoint_spec(a):
        if not a.base_url:
            return None
        limits = {"timeout": a.timeout, "max_retries": a.max_retries, "deadline": a.deadline}
        return {"base_url": a.base_url, "model": a.teacher_model, "api_key_env": a.api_key_env,
                "concurrency": a.concurrency, "max_tokens": a.max_tokens, "temperature": a.temperature,
                "price_in_per_mtok": a.price_in, "price_out_per_mtok": a.price_out,
                **{k: v for k, v in limits.items() if v is not None}}  # unset: the config's defaults

    q = stages.add_parser("generate", help="teacher chain-of-thought from captions through the prompt grid")
    endpoint(q)
    q.add_argument("--tasks", nargs="+", choices=["mcq", "description", "reasoning", "conversation"])
    q.add_argument("--tasks-per-record", type=int, help="draw this many tasks per record (default: all)")
    q.add_argument("--fraction", type=float, default=1.0, help="share of the records to send (the rest are left "
                   "for the RL MCQs)")
    q.add_argument("--limit", type=int, help="at most N requests")
    q.add_argument("--labels", help="CSV or JSONL of id, diagnosis (the gold for the answer check)")
    q.add_argument("--dry-run", action="store_true", help="print the request count and estimated tokens; send "
                   "nothing")
    common(q)
    q.set_defaults(func=lambda a: _run(a, {k: v for k, v in {
        "stage": "generate", "endpoint": endpoint_spec(a), "tasks": a.tasks, "tasks_per_record": a.tasks_per_record,
        "fraction": a.fraction, "limit": a.limit, "labels": a.labels, "prompts": a.prompts,
        "with_image": a.with_image}.items() if v is not None}, model_encoder))

    q = stages.add_parser("filter", help="rule filters over teacher outputs -> SFT conversations")
    q.add_argument("parent", nargs="?", help="a generate stage folder (or give --input)")
    q.add_argument("--input", dest="input_file", help="a JSONL of teacher outputs: id, response, ...")
    q.add_argument("--rules", nargs="+", help="filter rules to run (default: all built in)")
    q.add_argument("--tokenizer", help="a local tokenizer for the length rule")
    common(q, with_input=False)
    q.set_defaults(func=lambda a: _run(_Args(a, input=a.parent), {k: v for k, v in {
        "stage": "filter", "input": a.input_file, "rules": a.rules, "tokenizer": a.tokenizer}.items()
        if v is not None}, model_encoder))

    q = stages.add_parser("mcq", help="stratified RL MCQs from captions the SFT data does not use")
    q.add_argument("--n", type=int, default=10_000)
    q.add_argument("--source", choices=["rules", "teacher"], default="rules")
    q.add_argument("--labels", help="CSV or JSONL of id, diagnosis[, tissue_system]")
    q.add_argument("--pool", help="curated folder of captions to draw from (default: up the parent chain)")
    q.add_argument("--exclude", nargs="*", default=[], help="more SFT data to stay apart from")
    q.add_argument("--n-options", type=int, default=4)
    q.add_argument("--teacher-distractors", choices=["balance", "keep"], default=None,
                   help="source teacher: re-draw the distractors so no option text gives the answer away (balance, "
                   "the default) or keep the teacher's own")
    endpoint(q, required=False)
    common(q)
    q.set_defaults(func=lambda a: _run(a, {k: v for k, v in {
        "stage": "mcq", "n": a.n, "source": a.source, "labels": a.labels, "pool": a.pool, "exclude": a.exclude,
        "n_options": a.n_options, "endpoint": endpoint_spec(a), "prompts": a.prompts,
        "with_image": a.with_image, "teacher_distractors": a.teacher_distractors}.items() if v is not None},
        model_encoder))


class _Args:
    """argparse's namespace with `input` replaced (the filter's optional parent folder)."""

    def __init__(self, args, **overrides):
        self.__dict__.update(vars(args), **overrides)


def _cmd_prompts(args) -> int:
    from patho_r1.curate.grid import PromptGrid

    grid = PromptGrid(Path(args.prompts) if args.prompts else None)
    if args.show:
        if args.show not in grid.cells():
            print(f"prompts: no cell {args.show!r}; cells are subfield/level/task (see --list)")
            return 2
        print(grid.render(args.show, caption=args.caption))
        return 0
    problems = grid.check()
    if args.list:
        for cell in grid.cells():
            print(f"{cell:34s} {grid.source_of(cell)}")
    overridden = grid.overridden()
    print(f"{len(grid.cells())} cells" + (f"; overridden: {', '.join(overridden)}" if overridden else "")
          + f"; digest {grid.digest()}")
    for line in problems:
        print(f"  broken: {line}")
    return 1 if problems else 0
