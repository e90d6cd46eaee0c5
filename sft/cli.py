"""`patho-r1 cpt CONFIG` and `patho-r1 sft CONFIG`: run one supervised phase alone."""

from __future__ import annotations


def _run(args, phase: str) -> int:
    from patho_r1.config import load_config

    if phase == "cpt":
        from patho_r1.sft.config import CPTPhaseConfig as Config
        from patho_r1.sft.cpt import run_cpt as run
    else:
        from patho_r1.sft.config import SFTPhaseConfig as Config
        from patho_r1.sft.sft import run_sft as run
    overrides = {"resume": True} if args.resume else {}
    cfg = load_config(Config, args.config, overrides)  # validated before any model is loaded
    result = run(cfg)
    print(f"{phase}: {result.global_step} steps; final model in {result.model_dir}")
    return 0


def register(sub) -> None:
    for phase, text in (("cpt", "continued pretraining on image-caption pairs"),
                        ("sft", "chain-of-thought SFT on conversations")):
        p = sub.add_parser(phase, help=text)
        p.add_argument("config", help="phase config YAML")
        p.add_argument("--resume", action="store_true", help="continue from the newest intermediate checkpoint")
        p.set_defaults(func=lambda a, _phase=phase: _run(a, _phase))
