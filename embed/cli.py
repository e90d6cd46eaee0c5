"""`patho-r1 embed train | eval` (the HOMIE embedding head) and `patho-r1 clip train | eval` (PathoCLIP).

`embed train` and `clip train` are aliases of `patho-r1 phase embed|clip CONFIG` (`add_phase_command`, handed down by
the launcher); the evaluations are this package's own commands.
"""

from __future__ import annotations

from pathlib import Path


def _cmd_eval(args) -> int:
    from patho_r1.embed.evaluate import evaluate_embedder, write_results
    from patho_r1.embed.model import Embedder

    if not (args.composed or args.classification):
        raise ValueError("give --composed and/or --classification data")
    embedder = Embedder.from_pretrained(args.model, adapter=args.adapter)
    metrics = evaluate_embedder(embedder, args.composed, args.classification, args.batch_size)
    write_results(args.out, metrics)
    print((Path(args.out) / "metrics.md").read_text())
    return 0


def _cmd_bench(args) -> int:
    from patho_r1.embed.bench import BenchOptions, load_suite, parse_model, run_bench
    from patho_r1.embed.bench_report import headline, write_outputs
    from patho_r1.errors import ConfigError
    from patho_r1.outputs import check_output_folder

    suite = load_suite(args.suite)  # every input checked before the first model loads
    if not Path(args.data).is_dir():
        raise ConfigError(f"--data: {args.data} is not a folder")
    models = [parse_model(m) for m in args.model]
    ours = (Path(args.out) / "patho_manifest.json").is_file()
    check_output_folder(args.out, "embed bench", ours=ours, overwrite=args.overwrite)
    opts = BenchOptions(tasks=[t for t in (args.tasks or "").split(",") if t] or None, strict=args.strict,
                        batch_size=args.batch_size, n_boot=args.bootstrap, seed=args.seed,
                        allow_outside_images=args.allow_outside_images,
                        max_samples=args.max_samples if args.max_samples is not None else "suite",
                        note=lambda line: print(f"note: {line}"))
    results = run_bench(suite, args.data, models, opts)
    out = write_outputs(args.out, results)
    print((out / "results.md").read_text())
    print(headline(results))
    print(f"written to {out}/ (results.md, results.json, results.png, selection.json)")
    return 0


def register(sub, add_phase_command) -> None:
    p = sub.add_parser("embed", help="train or evaluate the embedding head")
    esub = p.add_subparsers(dest="embed_command", required=True)
    add_phase_command(esub, "train", "embed", help="stage 1 + stage 2 contrastive training")
    e = esub.add_parser("eval", help="composed retrieval, zero-shot classification, modality gap")
    e.add_argument("--model", required=True, help="base checkpoint (the reasoner)")
    e.add_argument("--adapter", help="embedding adapter directory (the embed phase's model/)")
    e.add_argument("--composed", help="composed-query JSONL")
    e.add_argument("--classification", help="labelled JSONL (MCQ records with category)")
    e.add_argument("--out", default="runs/embed-eval")
    e.add_argument("--batch-size", type=int, default=32)
    e.set_defaults(func=_cmd_eval)
    b = esub.add_parser("bench", help="an embedding suite (PMEB: retrieval, composed retrieval, zero-shot "
                        "classification over the public datasets) for one or more models")
    b.add_argument("--suite", default="pmeb", help="a shipped suite (pmeb) or a suite YAML")
    b.add_argument("--data", required=True, help="the folder the suite's task paths are relative to")
    b.add_argument("--model", action="append", required=True,
                   help="[LABEL=][homie:|clip:]PATH: a HOMIE adapter folder or base checkpoint, or any transformers "
                   "CLIP directory (PathoCLIP, PLIP); repeatable")
    b.add_argument("--tasks", help="comma-separated task names (default: every task of the suite)")
    b.add_argument("--strict", action="store_true", help="a missing task folder or a rejected row is an error")
    b.add_argument("--allow-outside-images", action="store_true", help="take image files that a dataset's rows name "
                   "outside its folder (through .., an absolute path or a link); default: such a row is rejected")
    b.add_argument("--max-samples", type=int, help="items per task (default: the suite's, 1,000 for PMEB)")
    b.add_argument("--seed", type=int, help="the selection and bootstrap seed (default: the suite's)")
    b.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% intervals")
    b.add_argument("--batch-size", type=int, default=32, help="inputs per forward pass of a model")
    b.add_argument("--out", default="runs/embed-bench", help="the results folder (results.md, results.json, "
                   "results.png, selection.json)")
    b.add_argument("--overwrite", action="store_true", help="replace an --out folder this command did not write")
    b.set_defaults(func=_cmd_bench)


def _clip_done(cfg, result) -> None:
    """`clip train`'s closing lines: each stage's steps, loss and drift."""
    stages = {k: v for k, v in result.metrics.items() if k.startswith("stage")}
    for name, m in stages.items():
        drift = f", drift {m['drift']:.4f}" if m.get("drift") is not None else ""
        print(f"clip {name}: {m['steps']} steps, loss {m['first_loss']:.3f} -> {m['last_loss']:.3f}{drift}")
    print(f"clip: model in {result.model_dir}")


def _label(path: str) -> str:
    """runs/x/clip/model -> clip; openai/clip-vit-base-patch16 -> clip-vit-base-patch16."""
    p = Path(path)
    return p.parent.name if p.name == "model" and p.parent.name else p.name


def _homie_base(adapter: str) -> str:
    """The base checkpoint a HOMIE adapter folder's manifest names."""
    from patho_r1.checkpoint import read_manifest
    from patho_r1.errors import ConfigError

    manifest = read_manifest(adapter) if Path(adapter).is_dir() else None
    base = (manifest.extra or {}).get("base_model") if manifest else None
    if not base:
        raise ConfigError(f"--homie: {adapter} has no manifest naming the base model (an embed phase's model/ "
                          "folder has one)")
    return base


def _cmd_clip_eval(args) -> int:
    from patho_r1.config import check_model_reference
    from patho_r1.embed.clip import ClipEmbedder
    from patho_r1.embed.clip_config import ClipEvalConfig
    from patho_r1.embed.clip_eval import evaluate_model, write_comparison
    from patho_r1.errors import ConfigError

    world = Path(args.world) if args.world else None

    def pick(given: str | None, in_world: str) -> str | None:
        return given or (str(world / in_world) if world else None)

    cfg = ClipEvalConfig(retrieval=pick(args.retrieval, "cpt/heldout.jsonl"),
                         classification=pick(args.classification, "rl/heldout.jsonl"),
                         few_shot_train=pick(args.few_shot_train, "rl/train.jsonl"), seeds=args.seeds,
                         batch_size=args.batch_size)
    composed = pick(args.composed, "embed/composed_heldout.jsonl")
    if not (args.model or args.homie):
        raise SystemExit("error: give at least one --model CLIP directory or --homie adapter")
    # every input checked before the first model loads
    for flag, given in (("--retrieval", cfg.retrieval), ("--classification", cfg.classification),
                        ("--few-shot-train", cfg.few_shot_train), ("--composed", composed)):
        if given and not Path(given).is_file():
            raise ConfigError(f"{flag}: {given} not found" + (" (in --world)" if world else ""))
    models = [(label or _label(path), path) for label, _, path in (spec.rpartition("=") for spec in args.model or [])]
    for _, path in models:
        check_model_reference("--model", path)
    homie_base = _homie_base(args.homie) if args.homie else None
    results = {}
    for label, path in models:
        results[label] = evaluate_model(ClipEmbedder.from_pretrained(path), cfg, composed)
    if args.homie:
        from patho_r1.embed.model import Embedder

        results["homie"] = evaluate_model(Embedder.from_pretrained(homie_base, adapter=args.homie), cfg, composed)
    out = write_comparison(args.out, results, cfg)
    print((out / "comparison.md").read_text())
    print(f"written to {out}/ (comparison.md, comparison.json, few_shot.png)")
    return 0


def register_clip(sub, add_phase_command) -> None:
    p = sub.add_parser("clip", help="PathoCLIP: two-stage CLIP training and its retrieval/zero-/few-shot evaluation")
    csub = p.add_subparsers(dest="clip_command", required=True)
    add_phase_command(csub, "train", "clip", done=_clip_done,
                      help="stage I (morphology-rich captions), then stage II (a mix, anchored)")
    e = csub.add_parser("eval", help="one comparison table: CLIP directories and the HOMIE embedder")
    e.add_argument("--model", action="append", help="a CLIP directory or hub id, optionally LABEL=PATH; repeatable")
    e.add_argument("--homie", help="the embed phase's adapter folder (its manifest names the base model)")
    e.add_argument("--world", help="a synthetic world: its held-out captions, MCQs and composed queries")
    e.add_argument("--retrieval", help="caption JSONL for image <-> text retrieval")
    e.add_argument("--classification", help="labelled JSONL (MCQ rows with category): zero-shot, probe test set")
    e.add_argument("--few-shot-train", help="labelled JSONL the probe's shots come from")
    e.add_argument("--composed", help="composed-query JSONL (HOMIE's tasks)")
    e.add_argument("--seeds", type=int, default=10)
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--out", default="runs/clip-eval")
    e.set_defaults(func=_cmd_clip_eval)
