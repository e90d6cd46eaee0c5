"""Does data that went through the data engine teach as well as the same knowledge given directly?  (issue 35)

From one base (the tiny random-init model), SFT on four sets, each scored on the synthetic world's benchmark as
shipped ("fixed": options in the world's class order) and on the same items with their options shuffled:

    direct           the world's own conversations (what recipes/demo.yaml trains on)
    direct-shuffled  the same, each MCQ's options shuffled and re-lettered (as the curated MCQs are)
    curated          recipes/demo-curated.yaml's curate phase: 07-filter/kept.jsonl
    curated-easy     its rows whose image is an unblended H&E tile (the raw export's truth.csv)

Besides accuracy it prints how often the reasoning names the right class ("These features indicate X", which both
the world's and the scripted teacher's chains end with) and how often the answer is the letter of the class named:
a model that knows the class but answers a letter from the option order alone is told apart from one that reads the
options.  It also prints what a class-known letter prior (the letter each class most often has in the direct SFT
data, options ignored) scores on the fixed benchmark.

    python bench/curated_parity.py --work /tmp/parity                       # about 25 minutes on 2 cores
    python bench/curated_parity.py --work /tmp/parity-smoke --steps 20 --limit 60
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import random
import re
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
LETTERS = "ABCDEF"


def curate(work: Path) -> Path:
    """The demo-curated recipe's curate phase (and its base model) under `work/cur`."""
    recipe = yaml.safe_load((ROOT / "recipes/demo-curated.yaml").read_text())
    recipe["output_root"] = str(work / "cur")
    path = work / "curated.yaml"
    path.write_text(yaml.safe_dump(recipe))
    if not (work / "cur/curate/08-mcq/manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "patho_r1.launch.cli", "run", str(path), "--phases", "curate"],
                       check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return work / "cur"


def shuffled_tsv(src: Path, dst: Path, seed: int = 0) -> None:
    """The benchmark with each item's options shuffled and its answer re-lettered."""
    csv.field_size_limit(1 << 30)
    rng = random.Random(seed)
    with src.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    with dst.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]), delimiter="\t", lineterminator="\n")
        writer.writeheader()
        for row in rows:
            options = [row[k] for k in LETTERS if row.get(k)]
            gold = row[row["answer"]]
            rng.shuffle(options)
            writer.writerow({**row, **{k: options[i] if i < len(options) else "" for i, k in enumerate(LETTERS)},
                             "answer": LETTERS[options.index(gold)]})


def shuffle_options(row: dict, rng: random.Random) -> dict:
    """A conversation whose MCQ turns list their options in a drawn order; the answer and the reasoning's "That is
    option X" follow the new letters."""
    messages = row["messages"]
    for i, message in enumerate(messages):
        parts = message["content"] if message["role"] == "user" and isinstance(message["content"], list) else []
        for part in parts:
            lines = part.get("text", "").split("\n")
            at = [j for j, line in enumerate(lines) if re.match(r"^[A-F]\. ", line)]
            if len(at) < 2:
                continue
            names = [lines[j][3:] for j in at]
            order = names[:]
            rng.shuffle(order)
            for j, name in zip(at, order, strict=True):
                lines[j] = f"{LETTERS[order.index(name)]}. {name}"
            part["text"] = "\n".join(lines)
            old = dict(zip(LETTERS, names, strict=False))

            def relabel(m, old=old, order=order):
                return m.group(0)[:-1] + LETTERS[order.index(old[m.group(0)[-1]])]

            reply = messages[i + 1]
            reply["content"] = re.sub(r"(<answer>|That is option )[A-F]", relabel, reply["content"])
    return row


def easy_he_rows(cur: Path, out: Path) -> Path:
    """The kept conversations whose image is an unblended H&E tile of the raw export (image paths made absolute)."""
    raw = cur / "world/raw"
    truth = list(csv.DictReader((raw / "truth.csv").open(encoding="utf-8")))
    lookup = list(csv.DictReader((raw / "quilt_1M_lookup.csv").open(encoding="utf-8")))
    easy = {hashlib.sha256((raw / "images" / r["image_path"]).read_bytes()).hexdigest()
            for r, t in zip(lookup, truth, strict=False)
            if (t["subfield"], t["difficulty"]) == ("histopathology", "easy")}
    kept = cur / "curate/07-filter/kept.jsonl"
    with out.open("w") as fh:
        for line in kept.open():
            row = json.loads(line)
            if Path(row["images"][0]).stem in easy:
                row["images"] = [str((kept.parent / p).resolve()) for p in row["images"]]
                fh.write(json.dumps(row) + "\n")
    return out


def letter_prior(direct: Path, bench: Path) -> float:
    """Accuracy of answering, for the item's true class, the letter that class most often has in `direct`."""
    prior: dict[str, Counter] = defaultdict(Counter)
    for line in direct.open():
        row = json.loads(line)
        for message, reply in zip(row["messages"], row["messages"][1:], strict=False):
            answer = re.search(r"<answer>([A-F])</answer>", reply["content"]) if message["role"] == "user" else None
            if answer:
                prior[row["category"]][answer.group(1)] += 1
    with bench.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    return sum(bool(prior[r["category"]]) and prior[r["category"]].most_common(1)[0][0] == r["answer"]
               for r in rows) / len(rows)


def sft_then_score(name: str, data: Path, base: Path, benches: dict[str, Path], work: Path, steps: int,
                   limit: int | None) -> dict:
    from patho_r1.config import validate_config
    from patho_r1.eval.phase import EvalPhaseConfig, run_eval
    from patho_r1.sft.config import SFTPhaseConfig
    from patho_r1.sft.sft import run_sft

    out = work / "runs" / name
    if not (out / "model").is_dir():
        run_sft(SFTPhaseConfig(model=str(base), data=str(data), output_dir=str(out), max_steps=steps,
                               per_device_train_batch_size=8, learning_rate=2e-3, warmup_ratio=0.05, max_length=512,
                               save_steps=10**6, logging_steps=50, wandb={"mode": "disabled"},
                               freeze_vision_tower=True, freeze_projector=True, dtype="float32", seed=0))
    result = {}
    for bench, tsv in benches.items():
        eval_dir = out / f"eval-{bench}"
        run_eval(validate_config(EvalPhaseConfig, {
            "data": str(tsv), "checkpoints": {name: str(out / "model")}, "output_dir": str(eval_dir),
            "max_new_tokens": 192, "batch_size": 30, "limit": limit, "wrong_image_control": False,
            "wandb": {"mode": "disabled"}}))
        result[bench] = reasoning_read(eval_dir / name / "predictions.jsonl")
    return result


def reasoning_read(predictions: Path) -> dict:
    """Accuracy, the share naming the right class, and the share answering the letter of the class it named."""
    from patho_r1.fixtures.synth import TISSUES

    names = sorted((t.name for t in TISSUES), key=len, reverse=True)
    n = correct = named_right = consistent = 0
    for line in predictions.open():
        p = json.loads(line)
        said = re.findall(r"indicate (.+?)\.", p["response"] or "")
        cls = next((name for name in names if said and name in said[-1]), None)
        n += 1
        correct += bool(p["correct"])
        named_right += cls is not None and cls == p["options"][p["answer"]]
        consistent += cls is not None and p["options"].get(p.get("choice") or "") == cls
    return {"n": n, "accuracy": correct / n, "names_class": named_right / n, "letter_of_named": consistent / n}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", required=True, type=Path, help="a folder for the worlds, runs and results")
    parser.add_argument("--steps", type=int, default=600, help="SFT steps of each set (the demo's 600)")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N benchmark items")
    args = parser.parse_args(argv)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)

    from patho_r1.fixtures.synth import WorldConfig, generate_world
    from patho_r1.fixtures.tiny import build_tiny_model

    cur = curate(work)
    base = cur / "base-model"
    if not (base / "config.json").is_file():
        build_tiny_model(base)
    world = work / "world"
    if not (world / "eval/PathoSynth_MCQ.tsv").is_file():
        generate_world(world, seed=0, config=WorldConfig(n_sft=1500, n_composed_per_task=160))
    benches = {"fixed": world / "eval/PathoSynth_MCQ.tsv", "shuffled": work / "bench-shuffled.tsv"}
    shuffled_tsv(benches["fixed"], benches["shuffled"])
    direct = world / "sft/train.jsonl"
    direct_shuffled = world / "sft/train-options-shuffled.jsonl"  # beside the original: its image paths are relative
    rng = random.Random(1)
    direct_shuffled.write_text("".join(json.dumps(shuffle_options(json.loads(line), rng)) + "\n"
                                       for line in direct.open()))
    sets = {"direct": direct, "direct-shuffled": direct_shuffled, "curated": cur / "curate/07-filter/kept.jsonl",
            "curated-easy": easy_he_rows(cur, work / "curated-easy.jsonl")}
    print(f"class-known letter prior on the fixed benchmark: {letter_prior(direct, benches['fixed']):.3f}")
    print(f"{'SFT data':16s} {'rows':>6s}  " + "  ".join(f"{b}: acc / names class / letter of named" for b in benches))
    results = {}
    for name, data in sets.items():
        results[name] = sft_then_score(name, data, base, benches, work, args.steps, args.limit)
        rows = sum(1 for _ in data.open())
        print(f"{name:16s} {rows:6d}  " + "  ".join(
            f"{r['accuracy']:.3f} / {r['names_class']:.3f} / {r['letter_of_named']:.3f}".ljust(38)
            for r in results[name].values()), flush=True)
    (work / "parity.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
