"""`patho-r1 rl CONFIG`: run the RL phase alone."""

from __future__ import annotations


def _run(args) -> int:
    from patho_r1.config import load_config
    from patho_r1.rl.config import RLPhaseConfig
    from patho_r1.rl.grpo import run_rl

    cfg = load_config(RLPhaseConfig, args.config, {"resume": True} if args.resume else None)
    result = run_rl(cfg)
    print(f"rl ({cfg.algorithm}): {result.global_step} steps; final model in {result.model_dir}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("rl", help="GRPO / DAPO reinforcement learning on MCQ prompts")
    p.add_argument("config", help="phase config YAML")
    p.add_argument("--resume", action="store_true", help="continue from the newest intermediate checkpoint")
    p.set_defaults(func=_run)
