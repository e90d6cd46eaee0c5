"""`patho-r1 eval mcq | vlmeval`."""

from __future__ import annotations


def _cmd_mcq(args) -> int:
    from patho_r1.config import validate_config
    from patho_r1.eval.phase import EvalPhaseConfig, run_eval

    cfg = validate_config(EvalPhaseConfig, {
        "data": args.data, "checkpoints": {args.label: args.model}, "output_dir": args.out, "engine": args.engine,
        "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "limit": args.limit,
        "yesno_mode": args.yesno_mode, "wrong_image_control": not args.no_control,
    })
    run_eval(cfg)
    print(f"results in {args.out}/{args.label}/ (results.json, predictions.csv, results.md)")
    return 0


def _cmd_vlmeval(args) -> int:
    from patho_r1.eval.vlmeval_hook import run_vlmeval

    run_vlmeval(model_path=args.model, datasets=args.data, work_dir=args.out, name=args.name,
                max_new_tokens=args.max_new_tokens, judge=args.judge)
    return 0


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate checkpoints (built-in MCQ scorer or VLMEvalKit)")
    esub = p.add_subparsers(dest="eval_command", required=True)
    m = esub.add_parser("mcq", help="MCQ / Yes-No accuracy on a VLMEvalKit TSV or MCQ JSONL")
    m.add_argument("--model", required=True, help="checkpoint directory or hub id")
    m.add_argument("--data", "--tsv", dest="data", required=True)
    m.add_argument("--out", default="runs/eval")
    m.add_argument("--label", default="model", help="name of this checkpoint in the results")
    m.add_argument("--engine", choices=["hf", "vllm"], default="hf")
    m.add_argument("--max-new-tokens", type=int, default=512)
    m.add_argument("--batch-size", type=int, default=16)
    m.add_argument("--limit", type=int)
    m.add_argument("--yesno-mode", choices=["patho", "vlmeval"], default="patho",
                   help="yes/no verdicts: semantic (default), or exactly VLMEvalKit's (case-sensitive)")
    m.add_argument("--no-control", action="store_true", help="skip the wrong-image control (images shuffled)")
    m.set_defaults(func=_cmd_mcq)
    v = esub.add_parser("vlmeval", help="run VLMEvalKit's own inference and evaluation (needs the [eval] extra)")
    v.add_argument("--model", required=True)
    v.add_argument("--data", nargs="+", required=True, help="VLMEvalKit dataset names, e.g. PathMMU_VAL")
    v.add_argument("--out", default="runs/vlmeval")
    v.add_argument("--name", default="patho-r1")
    v.add_argument("--max-new-tokens", type=int, default=2048)
    v.add_argument("--judge", default="exact_matching", help="exact_matching, or a judge model name")
    v.set_defaults(func=_cmd_vlmeval)
