"""`patho-r1 embed train CONFIG` and `patho-r1 embed eval --model BASE --adapter ADAPTER ...`."""

from __future__ import annotations

from pathlib import Path


def _cmd_train(args) -> int:
    from patho_r1.config import load_config
    from patho_r1.embed.config import EmbedPhaseConfig
    from patho_r1.embed.train import run_embed

    cfg = load_config(EmbedPhaseConfig, args.config)
    result = run_embed(cfg)
    print(f"embed: {result.global_step} steps; adapter in {result.model_dir}")
    return 0


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


def register(sub) -> None:
    p = sub.add_parser("embed", help="train or evaluate the embedding head")
    esub = p.add_subparsers(dest="embed_command", required=True)
    t = esub.add_parser("train", help="stage 1 + stage 2 contrastive training")
    t.add_argument("config")
    t.set_defaults(func=_cmd_train)
    e = esub.add_parser("eval", help="composed retrieval, zero-shot classification, modality gap")
    e.add_argument("--model", required=True, help="base checkpoint (the reasoner)")
    e.add_argument("--adapter", help="embedding adapter directory (the embed phase's model/)")
    e.add_argument("--composed", help="composed-query JSONL")
    e.add_argument("--classification", help="labelled JSONL (MCQ records with category)")
    e.add_argument("--out", default="runs/embed-eval")
    e.add_argument("--batch-size", type=int, default=32)
    e.set_defaults(func=_cmd_eval)
