"""`patho-r1 rewards list | score`.  It lives on the top floor because scoring a file reads it through the data
loaders (`patho_r1.data`), which the rewards package, below them, must not import."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from patho_r1.errors import ConfigError, DataError
from patho_r1.outputs import check_output_file
from patho_r1.rewards.accuracy import ANSWER_TYPES, MCQ_MODES
from patho_r1.rewards.registry import PRESETS


def _cmd_list(args) -> int:
    from patho_r1.rewards.registry import REGISTRY

    for name, doc in REGISTRY.describe().items():
        print(f"{name:16s} {doc}")
    print()
    for preset, specs in PRESETS.items():
        print(f"preset {preset}: " + " + ".join(s["name"] for s in specs))
    return 0


def _read_rows(path: Path) -> list[dict]:
    from patho_r1.data import iter_raw_rows

    rows, empty = [], []
    for lineno, row in iter_raw_rows(path):
        if not isinstance(row, dict):
            raise DataError(path, lineno, None, "expected a JSON object")
        if "completion" not in row:
            raise DataError(path, lineno, "completion", "missing")
        completion = row["completion"]
        if not isinstance(completion, str):  # rewards parse text; a number or a list here is a broken export
            raise DataError(path, lineno, "completion", f"a completion is text, not a {type(completion).__name__}")
        if not completion.strip():
            empty.append(lineno)
        rows.append(row)
    if empty:  # a model may answer nothing, but a whole file of blanks is usually a broken export: say so
        print(f"warning: {path}: {len(empty)} of {len(rows)} completions are empty (rows {_row_list(empty)}); they "
              "score as answers that were not given", file=sys.stderr)
    return rows


def _cmd_score(args) -> int:
    from patho_r1.rewards.registry import build_rewards

    specs: str | list[dict] = args.rewards
    if "," in args.rewards or args.rewards not in PRESETS:
        specs = [{"name": n.strip()} for n in args.rewards.split(",") if n.strip()]
        for spec in specs:
            if spec["name"] == "soft_overlong":
                spec.update(max_completion_length=args.max_completion_length, cache_length=args.cache_length)
            if spec["name"] == "accuracy":
                spec.update(mcq_mode=args.mcq_mode, math_workers=args.workers, math_timeout=args.timeout)
    path = Path(args.input)
    check_output_file(args.output, "--output")
    rows = _read_rows(path)
    try:
        reward_set = build_rewards(specs)
    except (KeyError, TypeError, ValueError) as exc:  # an unknown name, or something that is not a reward
        raise ConfigError(f"--rewards: {exc.args[0] if exc.args else exc}") from None
    try:
        needs_gold = "accuracy" in reward_set.names
        columns: dict[str, list] = {}
        if needs_gold:
            for i, row in enumerate(rows, start=1):
                gold = row.get("answer", row.get("solution"))
                if gold is None or (isinstance(gold, str) and not gold.strip()):
                    raise DataError(path, i, "answer", "missing or empty (the accuracy reward needs the gold answer)")
                if not isinstance(gold, (str, int, float)) or isinstance(gold, bool):
                    raise DataError(path, i, "answer", f"a gold answer is a string or a number, not a "
                                    f"{type(gold).__name__}")
            columns["answer"] = [r.get("answer", r.get("solution")) for r in rows]
            if any("answer_type" in r for r in rows):
                for i, row in enumerate(rows, start=1):
                    kind = row.get("answer_type")
                    if kind is not None and kind not in ANSWER_TYPES:
                        raise DataError(path, i, "answer_type", f"{kind!r} is not one of {', '.join(ANSWER_TYPES)} "
                                        "(or leave it out to infer it from the gold answer)")
                columns["answer_type"] = [r.get("answer_type") for r in rows]
        if "soft_overlong" in reward_set.names:
            for i, row in enumerate(rows, start=1):
                length = row.get("completion_length")
                if not isinstance(length, int) or isinstance(length, bool) or length < 0:
                    raise DataError(path, i, "completion_length", "missing, negative or not an integer "
                                    "(soft_overlong needs the completion's token count)")
            columns["completion_length"] = [r["completion_length"] for r in rows]
        scored = reward_set.score([r["completion"] for r in rows], **columns)
    finally:
        reward_set.close()
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for i, row in enumerate(rows):
            fh.write(json.dumps({**row, **{k: v[i] for k, v in scored.items()}}, ensure_ascii=False) + "\n")
    tmp.replace(out)
    means = {k: _mean([x for x in v if x is not None]) for k, v in scored.items()}
    print(json.dumps({"rows": len(rows), "mean": means}, indent=2), file=sys.stdout)
    return 0


def _row_list(rows: list[int], shown: int = 5) -> str:
    return ", ".join(map(str, rows[:shown])) + (f" and {len(rows) - shown} more" if len(rows) > shown else "")


def _mean(values: list[float]) -> float | None:
    """The mean over scored rows; None when no row was scored."""
    return sum(values) / len(values) if values else None


def register(sub) -> None:
    p = sub.add_parser("rewards", help="list and apply reward functions")
    rsub = p.add_subparsers(dest="rewards_command", required=True)
    ls = rsub.add_parser("list", help="show the registered rewards and presets")
    ls.set_defaults(func=_cmd_list)
    sc = rsub.add_parser("score", help="score a JSONL of completions offline")
    sc.add_argument("--rewards", default="format,accuracy",
                    help=f"comma-separated names or import strings, or a preset ({', '.join(PRESETS)})")
    sc.add_argument("--input", required=True, help="JSONL with `completion`, `answer` [, `completion_length`]")
    sc.add_argument("--output", required=True)
    sc.add_argument("--mcq-mode", choices=MCQ_MODES, default="strict")
    sc.add_argument("--max-completion-length", type=int, default=2048)
    sc.add_argument("--cache-length", type=int, default=512)
    sc.add_argument("--workers", type=int, default=1, help="math-verify worker processes (0 = inline)")
    sc.add_argument("--timeout", type=float, default=5.0, help="hard per-sample math-verify limit, seconds")
    sc.set_defaults(func=_cmd_score)
