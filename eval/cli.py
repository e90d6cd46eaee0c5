"""`patho-r1 eval mcq | bench | score | rubric | vlmeval`."""

from __future__ import annotations

from patho_r1.outputs import check_output_file, check_output_folder


def _cmd_mcq(args) -> int:
    from patho_r1.config import validate_config
    from patho_r1.eval.phase import EvalPhaseConfig, run_eval

    check_output_folder(args.out, "eval mcq", ours=True)
    cfg = validate_config(EvalPhaseConfig, {
        "data": args.data, "checkpoints": {args.label: args.model}, "output_dir": args.out, "engine": args.engine,
        "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "limit": args.limit,
        "scorer": args.scorer, "wrong_image_control": not args.no_control,
    })
    run_eval(cfg)
    print(f"results in {args.out}/{args.label}/ (results.json, predictions.jsonl, results.md)")
    return 0


def _judge_from_args(args, cache: str | None):
    """An LLM judge from --judge-url/--judge-model, else from the environment, else None."""
    import os

    from patho_r1.eval.judge import LLMJudge

    if args.judge_model or args.judge_url:
        if not (args.judge_model and args.judge_url):
            raise SystemExit("error: --judge-url and --judge-model go together")
        judge = LLMJudge(base_url=args.judge_url, model=args.judge_model, api_key=os.environ.get("OPENAI_API_KEY"),
                         cache=cache)
    elif (os.environ.get("PATHO_JUDGE_BASE_URL") or os.environ.get("OPENAI_API_BASE")) and \
            (os.environ.get("PATHO_JUDGE_MODEL") or os.environ.get("LOCAL_LLM")):
        judge = LLMJudge.from_env(cache=cache)
    else:
        return None
    judge.concurrency, judge.show_progress = args.judge_concurrency, True
    judge.timeout, judge.max_retries = args.judge_timeout, args.judge_max_retries
    judge.deadline, judge.max_unscored = args.judge_deadline, args.judge_max_unscored
    _check_judge_limits(judge)
    return judge


def _check_judge_limits(judge) -> None:
    from patho_r1.errors import ConfigError

    if judge.timeout <= 0 or judge.max_retries < 0 or (judge.deadline is not None and judge.deadline <= 0):
        raise ConfigError("judge: --judge-timeout and --judge-deadline must be > 0, --judge-max-retries >= 0")
    if not 0 <= judge.max_unscored <= 1:
        raise ConfigError("judge: --judge-max-unscored is a share of the items, from 0 to 1")


def _add_judge_args(p, short: bool = False) -> None:
    """The judge's flags; `short`: also without the `judge-` prefix, where the judge is the command's only server."""
    from patho_r1.eval.judge import LLMJudge

    def names(name: str) -> list[str]:
        return [f"--judge-{name}", *([f"--{name}"] if short else [])]

    default = LLMJudge(base_url="", model="")
    p.add_argument("--judge-url", help="an OpenAI-compatible /v1 endpoint for the LLM judge (or PATHO_JUDGE_BASE_URL)")
    p.add_argument("--judge-model", help="the judge's model name (or PATHO_JUDGE_MODEL); key from OPENAI_API_KEY")
    p.add_argument("--judge-concurrency", type=int, default=16)
    p.add_argument(*names("timeout"), dest="judge_timeout", type=float, default=default.timeout,
                   help="seconds a judge request waits on the server: to connect, or for the next bytes of the reply, "
                   "per attempt (default %(default)g)")
    p.add_argument(*names("max-retries"), dest="judge_max_retries", type=int, default=default.max_retries,
                   help="retries per judge request on 429, 5xx, timeouts and dropped connections (default "
                   "%(default)s)")
    p.add_argument(*names("deadline"), dest="judge_deadline", type=float,
                   help="seconds per judge request, every attempt together: a held connection or a trickling reply "
                   "then fails that item (default: timeout x (retries + 1) + 10 s a retry)")
    p.add_argument(*names("max-unscored"), dest="judge_max_unscored", type=float, default=default.max_unscored,
                   help="the share of items that may go unscored (failed requests, replies that are not a verdict; "
                   "left out of the scores, never counted as 0) before the command fails (default %(default)g)")


def _cmd_bench(args) -> int:
    from pathlib import Path

    from patho_r1.eval.benchmarks import get_benchmark, run_benchmark

    bench = get_benchmark(args.name)
    out = Path(args.out or f"runs/bench/{args.name}")
    check_output_folder(out, "eval bench", ours=True)  # it writes only its own files: a path that is a file is refused
    judge = _bench_judge(args, bench, out)
    if args.detail_completion or args.detail_config or args.slides:  # either of the two implies it
        return _bench_with_details(args, out, judge)
    report = run_benchmark(args.name, args.data, args.model, out, engine=args.engine, prompt=args.prompt,
                           split=args.split, subsets=args.subsets, question_filter=args.question_filter,
                           images=args.images, limit=args.limit, on_error=args.on_error,
                           max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, scorer=args.scorer,
                           llm_judge=judge, seed=args.seed, show_progress=True)
    _print_report("bench", report, out)
    return 0


def _bench_with_details(args, out, judge) -> int:
    """`eval bench --detail-completion`: the benchmark without and with OmniPath-style detail completion, paired
    (`patho_r1.eval.detail_completion`)."""
    from patho_r1.eval.detail_completion import DETAIL_DIR, load_detail_config, run_detail_benchmark

    detail = load_detail_config(args.detail_config, slides_dir=args.slides)
    comparison = run_detail_benchmark(
        args.name, args.data, args.model, out, detail=detail, engine=args.engine, prompt=args.prompt,
        split=args.split, subsets=args.subsets, question_filter=args.question_filter, images=args.images,
        limit=args.limit, on_error=args.on_error, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
        scorer=args.scorer, llm_judge=judge, seed=args.seed, show_progress=True)
    paired, counts = comparison["paired"], comparison["detail"]
    test = paired["mcnemar"] or {}
    print(f"[bench] {args.name}: n={paired['n']} accuracy without {paired['without']['accuracy']}, with detail "
          f"completion {paired['with']['accuracy']} (McNemar +{test.get('gained', 0)}/-{test.get('lost', 0)}, "
          f"p={test.get('p_value', 1.0):.3g}); crops {counts['cropped']} ({counts['from_slide']} from the slide), "
          f"fell back {counts['fell_back']} {counts['fallback_reasons']}; tables in {out}/results.md and "
          f"{out}/{DETAIL_DIR}/")
    return 0


def _cmd_score(args) -> int:
    from pathlib import Path

    from patho_r1.eval.benchmarks import get_benchmark, score_predictions

    bench = get_benchmark(args.name)
    out = Path(args.out or f"runs/score/{args.name}")
    check_output_folder(out, "eval score", ours=True)
    report = score_predictions(args.name, args.data, args.predictions, out, split=args.split, subsets=args.subsets,
                               question_filter=args.question_filter, images=args.images, on_error=args.on_error,
                               scorer=args.scorer, llm_judge=_bench_judge(args, bench, out), seed=args.seed)
    _print_report("score", report, out)
    return 0


def _bench_judge(args, bench, out):
    judge = _judge_from_args(args, str(out / "judge_cache.jsonl"))
    if bench.task == "vqa" and judge is None:
        print(f"[{args.eval_command}] no LLM judge configured: open answers get token recall/F1 only "
              "(--judge-url, --judge-model)")
    return judge


def _print_report(command: str, report: dict, out) -> None:
    """One line: the headline numbers, official and corrected, and what was not scored."""
    parts = [f"n={report['n']}"]
    for part, label in (("mcq", "accuracy"), ("closed", "closed")):
        if part in report:
            m = report[part]
            parts.append(f"{label}={m['accuracy']:.3f} (official {m['official']['accuracy']:.3f}, corrected "
                         f"{m['corrected']['accuracy']:.3f})")
    if "classes" in report:
        parts.append(f"balanced={report['classes']['balanced_accuracy']:.3f}")
    if "open" in report:
        parts.append(f"open recall={report['open']['recall']:.3f}")
    for key, what in (("missing", "items without a prediction"), ("outside_selection", "predictions outside the "
                      "selection"), ("skipped", "bad rows skipped")):
        if report.get(key):
            parts.append(f"{report[key]} {what}")
    print(f"[{command}] {report['benchmark']} ({report['scorer']}): {', '.join(parts)}; tables in {out}/results.md")


def _cmd_rubric(args) -> int:
    import json
    from pathlib import Path

    from patho_r1.data import iter_raw_rows
    from patho_r1.errors import DataError
    from patho_r1.rewards.parsing import split_thinking

    check_output_file(args.out, "--out")
    judge = _judge_from_args(args, args.cache)
    if judge is None:
        raise SystemExit("error: the rubric needs a judge: --judge-url and --judge-model (or PATHO_JUDGE_*)")
    items = []
    for row_no, row in iter_raw_rows(Path(args.predictions)):
        if not isinstance(row, dict):
            raise DataError(args.predictions, row_no, None, "expected a JSON object")
        for key in ("question", "answer", "response"):
            if not isinstance(row.get(key), str):
                raise DataError(args.predictions, row_no, key, "missing (each row needs question, answer, response)")
        prediction, thinking = split_thinking(row["response"])
        items.append((row["question"], row["answer"], thinking, prediction))
    result = judge.rubric(items)  # too many unscored items: JudgeError, one line, non-zero exit
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    unscored = f" ({result['failed']} failed, {result['unparsed']} unparsed: left out)" if result["unscored"] else ""
    print(f"[rubric] {result['scored']}/{result['n']} scored{unscored}, total {result['total']} / 100; "
          f"{judge.prompt_tokens + judge.completion_tokens} tokens, {judge.cache_hits} cached; -> {args.out}")
    return 0


def _cmd_vlmeval(args) -> int:
    from patho_r1.eval.vlmeval_hook import run_vlmeval

    run_vlmeval(model_path=args.model, datasets=args.data, work_dir=args.out, name=args.name,
                max_new_tokens=args.max_new_tokens, vlmeval_judge=args.judge_model or args.vlmeval_judge,
                judge_url=args.judge_url)
    return 0


def _add_scorer_arg(p) -> None:
    from patho_r1.eval.rules import SCORERS

    p.add_argument("--scorer", choices=SCORERS, default="official",
                   help="the headline rule: the benchmark's own evaluation code, quirks included (default), or our "
                   "corrected rules; the results show both columns")


def _add_benchmark_args(p, default_out: str) -> None:
    from patho_r1.eval.benchmarks import BENCHMARKS, ON_ERROR, QUESTION_FILTERS

    p.add_argument("--name", required=True, choices=list(BENCHMARKS),
                   help="; ".join(f"{b.name}: {b.summary}" for b in BENCHMARKS.values()))
    p.add_argument("--data", required=True, help="the benchmark's files (its release layout, or a VLMEvalKit TSV)")
    p.add_argument("--out", help=f"results folder (default {default_out})")
    p.add_argument("--split", help="only this split (PathMMU: val, test, test_tiny; PathVQA: test, ...)")
    p.add_argument("--subsets", nargs="+", help="only these subsets (PathMMU: PubMed EduContent ...)")
    p.add_argument("--question-filter", choices=list(QUESTION_FILTERS),
                   help="MedXpertQA: `pathology`, our pathology keyword subset")
    p.add_argument("--images", help="image folder, when not where the release puts it")
    # `fail`: the old spelling of `raise`, still taken (curate import spells it `raise` too)
    p.add_argument("--on-error", choices=[*ON_ERROR, "fail"], default="raise", metavar="{" + ",".join(ON_ERROR) + "}",
                   help="a bad row (a missing image, ...) stops the run (raise, the default), or is skipped and "
                   "counted (skip)")
    p.add_argument("--seed", type=int, default=42, help="PathMMU's official rule guesses unparsed answers with this "
                   "seed, once per run, in row order")
    _add_scorer_arg(p)
    _add_judge_args(p)


def register(sub) -> None:
    from patho_r1.eval.benchmarks import PROMPTS
    from patho_r1.eval.generation import ENGINES
    from patho_r1.eval.vlmeval_hook import EXACT_MATCHING

    p = sub.add_parser("eval", help="evaluate checkpoints (built-in MCQ scorer or VLMEvalKit)")
    esub = p.add_subparsers(dest="eval_command", required=True)
    m = esub.add_parser("mcq", help="MCQ / Yes-No accuracy on a VLMEvalKit TSV or MCQ JSONL")
    m.add_argument("--model", required=True, help="checkpoint directory or hub id")
    m.add_argument("--data", "--tsv", dest="data", required=True)
    m.add_argument("--out", default="runs/eval")
    m.add_argument("--label", default="model", help="name of this checkpoint in the results")
    m.add_argument("--engine", choices=ENGINES, default="hf")
    m.add_argument("--max-new-tokens", type=int, default=512)
    m.add_argument("--batch-size", type=int, default=16)
    m.add_argument("--limit", type=int)
    _add_scorer_arg(m)
    m.add_argument("--no-control", action="store_true", help="skip the wrong-image control (images shuffled)")
    m.set_defaults(func=_cmd_mcq)
    b = esub.add_parser("bench", help="a pathology benchmark from its own files (PathMMU, PathVQA, ...): generate, "
                        "then score as `eval score` does")
    _add_benchmark_args(b, "runs/bench/NAME")
    b.add_argument("--model", required=True, help="checkpoint directory or hub id")
    b.add_argument("--engine", choices=ENGINES, default="hf")
    b.add_argument("--prompt", choices=list(PROMPTS), default="cot",
                   help="chain of thought (Patho-R1's prompt), chain of draft, or answer directly")
    b.add_argument("--limit", type=int)
    b.add_argument("--max-new-tokens", type=int, default=512)
    b.add_argument("--batch-size", type=int, default=16)
    b.add_argument("--detail-completion", action="store_true",
                   help="also answer in two passes (OmniPath's detail completion): the model names a box, its crop "
                   "at a higher magnification is appended, the model answers; both accuracies, paired")
    b.add_argument("--detail-config", help="YAML of the two passes' prompts and crop settings (DetailConfig; "
                   "implies --detail-completion)")
    b.add_argument("--slides", help="folder of the slides that tile rows name (`slide`): crops are read from "
                   "them (implies --detail-completion)")
    b.set_defaults(func=_cmd_bench)
    s = esub.add_parser("score", help="score predictions that already exist (ours, {id, prediction} JSONL, or "
                        "VLMEvalKit's .xlsx/.tsv/.json) without loading a model")
    _add_benchmark_args(s, "runs/score/NAME")
    s.add_argument("--predictions", required=True,
                   help="our predictions.jsonl, a JSONL of {id, prediction}, or VLMEvalKit's {model}_{dataset}.xlsx "
                   "(.tsv, .json): matched to the data's rows by id (VLMEvalKit: index)")
    s.set_defaults(func=_cmd_score)
    r = esub.add_parser("rubric", help="score reasoning chains on the ten-criteria rubric with an LLM judge")
    r.add_argument("--predictions", required=True, help="JSONL rows with question, answer, response")
    r.add_argument("--out", default="runs/rubric.json")
    r.add_argument("--cache", help="judge cache JSONL (a re-run costs no request)")
    _add_judge_args(r, short=True)
    r.set_defaults(func=_cmd_rubric)
    v = esub.add_parser("vlmeval", help="run VLMEvalKit's own inference and evaluation (needs the [eval] extra)")
    v.add_argument("--model", required=True)
    v.add_argument("--data", nargs="+", required=True, help="VLMEvalKit dataset names, e.g. PathMMU_VAL")
    v.add_argument("--out", default="runs/vlmeval")
    v.add_argument("--name", default="patho-r1")
    v.add_argument("--max-new-tokens", type=int, default=2048)
    v.add_argument("--judge", dest="vlmeval_judge", default=EXACT_MATCHING,
                   help="how VLMEvalKit scores: exact_matching (its rule-based matcher), or an OpenAI judge model name")
    v.add_argument("--judge-url", help="an OpenAI-compatible /v1 endpoint VLMEvalKit's judge calls (PathVQA needs one)")
    v.add_argument("--judge-model", help="the model name at --judge-url")
    v.set_defaults(func=_cmd_vlmeval)
