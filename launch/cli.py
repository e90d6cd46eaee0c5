"""`patho-r1 run RECIPE` and `patho-r1 submit RECIPE --address ...`."""

from __future__ import annotations


def _cmd_run(args) -> int:
    from launch.recipe import load_plan
    from launch.runner import run_recipe

    plan = load_plan(args.recipe)  # every field validated before anything starts
    if args.dry_run:
        print(plan.describe())
        return 0
    phases = [p.strip() for p in args.phases.split(",")] if args.phases else None
    run_recipe(plan, phases=phases, resume=args.resume)
    return 0


def _cmd_submit(args) -> int:
    from launch.submit import submit

    return submit(args.recipe, address=args.address, phases=args.phases, resume=args.resume,
                  extra_pip=args.pip, wait=not args.no_wait)


def register(sub) -> None:
    p = sub.add_parser("run", help="run a recipe (all phases, in order) on Ray")
    p.add_argument("recipe")
    p.add_argument("--phases", help="comma-separated phase names to run (default: all)")
    p.add_argument("--resume", action="store_true", help="skip completed phases, resume a half-done one")
    p.add_argument("--dry-run", action="store_true", help="validate and print the phase plan and resources")
    p.set_defaults(func=_cmd_run)

    s = sub.add_parser("submit", help="submit a recipe to a Ray cluster as a Ray job")
    s.add_argument("recipe")
    s.add_argument("--address", required=True, help="Ray dashboard address, e.g. http://head:8265")
    s.add_argument("--phases")
    s.add_argument("--resume", action="store_true")
    s.add_argument("--pip", action="append", default=[], help="extra pip requirement for the job's runtime env")
    s.add_argument("--no-wait", action="store_true", help="return after submission instead of tailing the logs")
    s.set_defaults(func=_cmd_submit)
