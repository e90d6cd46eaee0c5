"""The flags of each stage's subcommand (`patho-r1 curate <stage>`), named by the stage table (`curate/stages.py`).

Each `<stage>_arguments(parser)` adds the stage's own flags and returns what turns the parsed flags into the stage's
config (without `stage`); `curate/cli.py` adds the parent folder, --out, --force, --overwrite and --seed to every
stage.  Kept apart from the stage modules so that building the command line imports none of them.
"""

from __future__ import annotations

from collections.abc import Callable

from patho_r1.curate.config import ENGINES

ToConfig = Callable[..., dict]


def engine_option(q) -> None:
    q.add_argument("--engine", choices=ENGINES, default="auto",
                   help="where the per-row work runs: local (this process), processes (a pool, one per core), ray "
                   "(Ray Data); auto: in process under 50k rows, else Ray on 8+ CPUs, else the pool")


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


def _set(config: dict) -> dict:
    """The flags given: an unset one leaves the config's default."""
    return {k: v for k, v in config.items() if v is not None}


def import_arguments(q) -> ToConfig:
    from patho_r1.data import MAX_TEXT_CHARS

    q.description = (
        "Import a public corpus in its own format.  Each row is refused (stops the import, naming file, row and "
        "field; with --on-error skip, written to rejects.jsonl with the reason) when: an image file resolves "
        "outside the image folder (a '..' name, an absolute path elsewhere, a symbolic link out of it; "
        "--allow-outside-images takes them); an image is missing, not a regular file, damaged or truncated, or has "
        "more than PIL's Image.MAX_IMAGE_PIXELS pixels (89,478,485: its decompression-bomb guard, under which "
        f"training opens images); a text field holds more than {MAX_TEXT_CHARS:,} characters (about 25k tokens: "
        "longer is a broken export, such as a whole article in one cell); its id is an earlier row's (both rows "
        "are named).  A source with no rows is an error.")
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
    return lambda a: {"on_error": a.on_error, "images": "link" if a.link_images else "copy", "sources": [
        {"format": a.format, "path": a.source, "images": a.images, "kind": a.kind, "columns": _columns(a.columns),
         "license": a.license, "allow_outside_images": a.allow_outside_images}]}


def dedup_arguments(q) -> ToConfig:
    q.add_argument("--threshold", type=float, default=0.8)
    engine_option(q)
    return lambda a: {"threshold": a.threshold, "engine": a.engine}


def decontaminate_arguments(q) -> ToConfig:
    q.add_argument("--against", nargs="+", required=True, help="benchmark TSVs or curated benchmark folders")
    q.add_argument("--threshold", type=float, default=0.7)
    engine_option(q)  # the run's engine only: not part of the stage's config
    return lambda a: {"against": a.against, "threshold": a.threshold}


def _embedder(q) -> Callable[..., dict]:
    q.add_argument("--embedder", choices=["features", "patho", "hf"], default="features",
                   help="features: image statistics + hashed words, no model; patho: our embedding head; "
                   "hf: a Hugging Face image encoder")
    q.add_argument("--model", help="model path for the patho / hf embedder")
    q.add_argument("--adapter", help="embedding adapter for the patho embedder")
    engine_option(q)
    return lambda a: {"kind": a.embedder, "model": a.model, "adapter": a.adapter}


def tag_arguments(q) -> ToConfig:
    q.add_argument("--seed-labels", "--labels", dest="labels", help="CSV or JSONL of id, subfield")
    q.add_argument("--corrections", nargs="*", default=[], help="reviewed review.csv files")
    q.add_argument("--review", type=int, default=50, help="least confident rows to write to review.csv")
    spec = _embedder(q)
    return lambda a: {"seed": a.labels, "corrections": a.corrections, "review": a.review, "embedder": spec(a),
                      "engine": a.engine}


def cluster_arguments(q) -> ToConfig:
    q.add_argument("--criterion", choices=["term_density", "centroid_distance", "caption_length"],
                   default="term_density")
    q.add_argument("--truth", help="CSV of id, difficulty: report the adjusted Rand index against it")
    spec = _embedder(q)
    return lambda a: {"criterion": a.criterion, "truth": a.truth, "embedder": spec(a), "engine": a.engine}


def _endpoint(q, required: bool = True) -> Callable[..., dict | None]:
    """The teacher's flags; returns what makes the stage's `endpoint` of them (None without --base-url)."""
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
    _timeouts(q)
    return _endpoint_spec


def _timeouts(q) -> None:
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


def _endpoint_spec(a) -> dict | None:
    if not a.base_url:
        return None
    limits = {"timeout": a.timeout, "max_retries": a.max_retries, "deadline": a.deadline}
    return {"base_url": a.base_url, "model": a.teacher_model, "api_key_env": a.api_key_env,
            "concurrency": a.concurrency, "max_tokens": a.max_tokens, "temperature": a.temperature,
            "price_in_per_mtok": a.price_in, "price_out_per_mtok": a.price_out,
            **_set(limits)}  # unset: the config's defaults


def generate_arguments(q) -> ToConfig:
    endpoint = _endpoint(q)
    q.add_argument("--tasks", nargs="+", choices=["mcq", "description", "reasoning", "conversation"])
    q.add_argument("--tasks-per-record", type=int, help="draw this many tasks per record (default: all)")
    q.add_argument("--fraction", type=float, default=1.0, help="share of the records to send (the rest are left "
                   "for the RL MCQs)")
    q.add_argument("--limit", type=int, help="at most N requests")
    q.add_argument("--labels", help="CSV or JSONL of id, diagnosis (the gold for the answer check)")
    q.add_argument("--dry-run", action="store_true", help="print the request count and estimated tokens; send "
                   "nothing")
    return lambda a: _set({
        "endpoint": endpoint(a), "tasks": a.tasks, "tasks_per_record": a.tasks_per_record, "fraction": a.fraction,
        "limit": a.limit, "labels": a.labels, "prompts": a.prompts, "with_image": a.with_image})


def filter_arguments(q) -> ToConfig:
    q.add_argument("--input", dest="input_file", help="a JSONL of teacher outputs: id, response, ...")
    q.add_argument("--rules", nargs="+", help="filter rules to run (default: all built in)")
    q.add_argument("--tokenizer", help="a local tokenizer for the length rule")
    return lambda a: _set({"input": a.input_file, "rules": a.rules, "tokenizer": a.tokenizer})


def mcq_arguments(q) -> ToConfig:
    q.add_argument("--n", type=int, default=10_000)
    q.add_argument("--source", choices=["rules", "teacher"], default="rules")
    q.add_argument("--labels", help="CSV or JSONL of id, diagnosis[, tissue_system]")
    q.add_argument("--pool", help="curated folder of captions to draw from (default: up the parent chain)")
    q.add_argument("--exclude", nargs="*", default=[], help="more SFT data to stay apart from")
    q.add_argument("--n-options", type=int, default=4)
    q.add_argument("--teacher-distractors", choices=["balance", "keep"], default=None,
                   help="source teacher: re-draw the distractors so no option text gives the answer away (balance, "
                   "the default) or keep the teacher's own")
    endpoint = _endpoint(q, required=False)
    return lambda a: _set({
        "n": a.n, "source": a.source, "labels": a.labels, "pool": a.pool, "exclude": a.exclude,
        "n_options": a.n_options, "endpoint": endpoint(a), "prompts": a.prompts, "with_image": a.with_image,
        "teacher_distractors": a.teacher_distractors})


def wsi_arguments(q) -> ToConfig:
    q.description = (
        "Tile whole slides (SVS, NDPI, MRXS, SCN, tiled TIFF... through OpenSlide; tifffile for the pyramidal TIFFs "
        "OpenSlide cannot open) where the thumbnail shows tissue, at microns per pixel (--mpp) or at pyramid levels "
        "(--levels).  A slide that cannot be read, states no microns per pixel when --mpp asks for them, lacks a "
        "level asked for or cannot decode it, or shows no tissue stops the stage with one line naming it and why "
        "(--on-error skip: it goes to rejects.jsonl and the rest are tiled).  A GeoJSON of regions beside a slide "
        "(QuPath's export, <slide stem>.geojson or .json) gives grounding rows.  A rerun tiles only the slides not "
        "done before (finished slides are kept in .<out>.wsi-parts beside --out).")
    q.add_argument("--slides", help="a slide file or a folder of slides (required)")
    q.add_argument("--annotations", help="a folder of <slide stem>.geojson (or .json) files (default: beside each "
                   "slide)")
    scale = q.add_mutually_exclusive_group()
    scale.add_argument("--mpp", type=float, nargs="+", help="microns per pixel of the tiles, one grid each "
                       "(default 0.5); e.g. --mpp 0.5 2.0 for detail and context")
    scale.add_argument("--levels", type=int, nargs="+", help="pyramid levels to tile as stored (slides without MPP)")
    q.add_argument("--tile", type=int, help="tile side in pixels (default 224)")
    q.add_argument("--min-tissue", type=float, help="share of a tile that must be tissue (default 0.5)")
    q.add_argument("--details", type=int, help="multi-scale rows: detail tiles per context tile (default 4)")
    q.add_argument("--on-error", choices=["raise", "skip"], default="raise",
                   help="skip: a bad slide goes to rejects.jsonl with the reason")
    engine_option(q)
    return lambda a: _set({"slides": a.slides, "annotations": a.annotations, "mpp": a.mpp, "levels": a.levels,
                           "tile": a.tile, "min_tissue": a.min_tissue, "details": a.details,
                           "on_error": a.on_error, "engine": a.engine})
