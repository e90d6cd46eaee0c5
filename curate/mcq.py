"""The RL MCQ builder: diagnosis-oriented multiple-choice questions from captions the SFT data did not use.

    DIR/mcq.jsonl        our `mcq` kind, for the `rl` phase
    DIR/heldout.jsonl    a stratified share kept out, for the RL phase's held-out accuracy
    DIR/mcq_report.md    strata, the letter distribution, and what the best no-image rules score
    DIR/generations.jsonl (source teacher) the teacher's replies, append-only and resumable as in `generate`

1. The pool is the caption rows of a curated folder, less every row whose image (by sha256) or caption is in the
   SFT data (the parent filter stage's kept.jsonl, and any `exclude`).
2. Sampling is proportionate and stratified: strata are subfields, split by tissue system within histopathology
   and gross; each stratum gets its share of `n` by largest remainder, drawn with the seed.
3. Questions come from the teacher (the grid's mcq cells, through the same client and filter rules as SFT data), or
   offline from rules: the row's diagnosis against other diagnoses of the same tissue system, drawn as often as they
   are correct elsewhere, so no option text is a tell.
4. The answer's letter is dealt from a seeded, balanced deck (not drawn at random), so each letter is within one
   question of uniform; the other options are shuffled into the remaining places.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from patho_r1.curate.config import FilterStage, MCQStage
from patho_r1.curate.filters import FILTERS, Candidate, normalize
from patho_r1.curate.generate import GENERATIONS, Job, generate, guard_identity
from patho_r1.curate.grid import GRID_SUBFIELDS, PromptGrid, cell_id
from patho_r1.curate.rows import image_key, read_id_table
from patho_r1.curate.stages import StageContext
from patho_r1.curate.store import iter_jsonl, read_stage_manifest, relative_images
from patho_r1.curate.teacher_output import answer_letter, parse_reply
from patho_r1.errors import ConfigError
from patho_r1.rewards.parsing import OPTION_LETTERS

# Organ words -> tissue system, for strata and hard negatives where a row does not name its system.
TISSUE_SYSTEMS: dict[str, tuple[str, ...]] = {
    "gastrointestinal": ("colon", "colonic", "rectum", "rectal", "stomach", "gastric", "oesophagus", "esophagus",
                         "oesophageal", "esophageal", "duodenum", "duodenal", "small bowel", "small intestine",
                         "ileum", "appendix", "anal"),
    "hepatobiliary": ("liver", "hepatic", "gallbladder", "bile duct", "pancreas", "pancreatic"),
    "breast": ("breast", "mammary"),
    "gynaecological": ("ovary", "ovarian", "uterus", "uterine", "endometrium", "endometrial", "cervix", "cervical",
                       "vulva", "placenta", "fallopian"),
    "genitourinary": ("kidney", "renal", "bladder", "urothelial", "prostate", "prostatic", "testis", "testicular",
                      "ureter", "urethra"),
    "thoracic": ("lung", "pulmonary", "pleura", "pleural", "bronchus", "bronchial", "mediastinum"),
    "head_neck_endocrine": ("thyroid", "parathyroid", "salivary", "parotid", "oral", "larynx", "tongue", "adrenal",
                            "pituitary"),
    "skin": ("skin", "cutaneous", "epidermis", "dermis", "dermal"),
    "haematolymphoid": ("lymph node", "spleen", "bone marrow", "tonsil", "thymus"),
    "soft_tissue_bone": ("soft tissue", "bone", "muscle", "cartilage", "synovium"),
    "neuro": ("brain", "spinal", "meninges", "nerve", "cerebral"),
}
_SYSTEM_WORDS = sorted(((w, s) for s, words in TISSUE_SYSTEMS.items() for w in words), key=lambda x: -len(x[0]))
STRATIFIED_BY_SYSTEM = ("histopathology", "gross")


def tissue_system(text: str) -> str:
    padded = f" {normalize(text)} "
    for word, system in _SYSTEM_WORDS:
        if f" {word} " in padded:
            return system
    return "unspecified"


def stratum(row: dict) -> str:
    subfield = row.get("subfield") or "histopathology"
    return f"{subfield}/{row['tissue_system']}" if subfield in STRATIFIED_BY_SYSTEM else subfield


def _sft_keys(paths: list[Path]) -> tuple[set[int], set[str], set[str]]:
    """Image keys, normalized captions and record ids of the SFT data (JSONL files or folders holding them)."""
    images, captions, ids = set(), set(), set()
    for path in paths:
        files = [path] if path.is_file() else [p for name in ("kept.jsonl", "conversation.jsonl", "caption.jsonl")
                                               if (p := path / name).is_file()]
        for file in files:
            for row in iter_jsonl(file):
                if row.get("images"):
                    images.add(image_key(row, file.parent))
                if row.get("caption"):
                    captions.add(normalize(row["caption"]))
                if row.get("record_id"):
                    ids.add(str(row["record_id"]))
    return images, captions, ids


def find_pool(parent: Path) -> Path:
    """The nearest stage folder up the parent chain that holds caption rows."""
    folder: Path | None = parent
    while folder is not None:
        if (folder / "caption.jsonl").is_file():
            return folder
        manifest = read_stage_manifest(folder)
        folder = Path(manifest.parent) if manifest and manifest.parent else None
    raise ConfigError(f"{parent}: no stage up its parent chain holds caption.jsonl; give `pool`")


def allocate(sizes: dict[str, int], n: int) -> dict[str, int]:
    """Proportionate allocation by largest remainder; never more than a stratum holds."""
    total = sum(sizes.values())
    if total <= n:
        return dict(sizes)
    quotas = {k: n * v / total for k, v in sizes.items()}
    take = {k: int(q) for k, q in quotas.items()}
    for k in sorted(quotas, key=lambda k: (-(quotas[k] - take[k]), k))[: n - sum(take.values())]:
        take[k] += 1
    return take


def balanced_letters(n_options: list[int], rng: np.random.Generator) -> list[str]:
    """The answer letter of each question: per option count, a deck with every letter equally often, shuffled."""
    out: list[str | None] = [None] * len(n_options)
    by_k: dict[int, list[int]] = defaultdict(list)
    for i, k in enumerate(n_options):
        by_k[k].append(i)
    for k, idx in by_k.items():
        deck = [OPTION_LETTERS[j % k] for j in range(len(idx))]
        rng.shuffle(deck)
        for i, letter in zip(idx, deck, strict=True):
            out[i] = letter
    return out


def place(correct: str, distractors: list[str], letter: str, rng: np.random.Generator) -> dict[str, str]:
    k = len(distractors) + 1
    others = list(distractors)
    rng.shuffle(others)
    at = OPTION_LETTERS.index(letter)
    texts = others[:at] + [correct] + others[at:]
    return {OPTION_LETTERS[i]: texts[i] for i in range(k)}


def rule_distractors(pool: list[dict], rows: list[dict], n_options: int, rng: np.random.Generator
                     ) -> list[list[str] | None]:
    """For each of `rows`: other diagnoses of its tissue system, drawn in proportion to how often each is a
    diagnosis in the `pool`, so every option text is correct about as often as its share of the options."""
    by_system: dict[str, Counter] = defaultdict(Counter)
    overall: Counter = Counter()
    shown: dict[str, str] = {}
    for row in pool:
        key = normalize(row["diagnosis"])
        shown.setdefault(key, row["diagnosis"])
        by_system[row["tissue_system"]][key] += 1
        overall[key] += 1
    out = []
    for row in rows:
        own = normalize(row["diagnosis"])
        picked: list[str] = []
        for counter in (by_system[row["tissue_system"]], overall):  # hard negatives first, then any diagnosis
            names = [d for d in counter if d != own and d not in picked]
            need = n_options - 1 - len(picked)
            if need <= 0 or not names:
                continue
            weights = np.array([counter[d] for d in names], float)
            take = rng.choice(len(names), min(need, len(names)), replace=False, p=weights / weights.sum())
            picked += [names[i] for i in take]
        out.append([shown[d] for d in picked] if len(picked) == n_options - 1 else None)
    return out


def balance_teacher_distractors(questions: list[tuple[dict, str, str, list[str]] | None], rng: np.random.Generator,
                                counts: Counter, rounds: int = 25) -> list[tuple[dict, str, str, list[str]] | None]:
    """The teacher's questions and answers with distractors re-drawn from the answers of the other questions.

    A teacher that picks distractors uniformly makes common diagnoses the answer more often than a distractor, and
    its invented distractors are never the answer: a rule that never looks at the image (how often has this option
    text been the answer?) then beats chance.  Here every option text is one of the answers, and each answer text t
    is drawn as a distractor about (k - 1) x its answer count times, so that it is the answer of about 1/k of the
    questions that show it.  Drawing in proportion to the answer counts falls short for common answers (a question
    shows a text once at most), so the weights are fitted: draw, count, raise the weights of the texts drawn too
    rarely, `rounds` times.  (An answer of more than 1/k of all questions cannot reach its share.)  The teacher still
    writes each question and its answer; a question with fewer other answers than it has distractors is dropped
    (`too_few_answers`)."""
    made = [i for i, q in enumerate(questions) if q is not None]
    if not made:
        return questions
    keys = [normalize(questions[i][2]) for i in made]
    texts = sorted(set(keys))
    shown = {}
    for i, key in zip(made, keys, strict=True):
        shown.setdefault(key, questions[i][2])
    index = {t: j for j, t in enumerate(texts)}
    own = np.array([index[k] for k in keys])
    need = np.array([len(questions[i][3]) for i in made])
    log_w, picks = _fitted_draw(own, need, len(texts), rng, rounds)
    out = list(questions)
    for row, i in enumerate(made):
        chosen = [texts[j] for j in picks[row, : need[row]] if np.isfinite(log_w[j])]
        if len(chosen) < need[row] or len(texts) - 1 < need[row]:
            counts["too_few_answers"] += 1
            out[i] = None
            continue
        q = questions[i]
        out[i] = (q[0], q[1], q[2], [shown[t] for t in chosen])
    return out


def _fitted_draw(own: np.ndarray, need: np.ndarray, n_texts: int, rng: np.random.Generator, rounds: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(the fitted log weights; each question's distractor picks, as text indices, best first): weights fitted over
    `rounds` draws so that each text is drawn about (k - 1) x its answer count times, then one more draw."""
    answer_counts = np.bincount(own, minlength=n_texts).astype(float)
    target = answer_counts * need.mean()  # distractor appearances that make each text the answer 1/k of the time
    log_w = np.log(answer_counts)

    def draw() -> np.ndarray:  # Gumbel top-k: weighted sampling without replacement, one row per question
        scores = log_w[None, :] + rng.gumbel(size=(len(own), n_texts))
        scores[np.arange(len(own)), own] = -np.inf  # never a question's own answer
        return np.argsort(-scores, axis=1)[:, : need.max()]

    for _ in range(rounds):
        picks = draw()
        mask = np.arange(picks.shape[1])[None, :] < need[:, None]
        got = np.bincount(picks[mask], minlength=n_texts)
        log_w += 0.7 * (np.log(target + 0.5) - np.log(got + 0.5))
    return log_w, draw()


def no_image_baselines(items: list[dict]) -> dict:
    """Accuracy of the best rules that never look at the image: the commonest letter, the longest option, and
    option-text priors (how often each option text is correct, cross-fitted over two halves)."""
    if not items:
        return {}
    letters = Counter(it["answer"] for it in items)
    commonest = letters.most_common(1)[0][1] / len(items)
    longest = np.mean([max(it["options"], key=lambda k: len(it["options"][k])) == it["answer"] for it in items])
    halves = (items[0::2], items[1::2])
    hits = 0
    for fit, score in ((halves[0], halves[1]), (halves[1], halves[0])):
        correct, shown = Counter(), Counter()
        for it in fit:
            for k, text in it["options"].items():
                shown[normalize(text)] += 1
                correct[normalize(text)] += k == it["answer"]
        for it in score:
            k_opts = len(it["options"])
            rate = {k: (correct[normalize(t)] + 1) / (shown[normalize(t)] + k_opts) for k, t in it["options"].items()}
            hits += max(rate, key=rate.get) == it["answer"]
    prior = hits / len(items)
    chance = float(np.mean([1 / len(it["options"]) for it in items]))
    best = max(("commonest letter", commonest), ("longest option", float(longest)), ("option-text prior", prior),
               key=lambda x: x[1])
    return {"chance": round(chance, 4), "commonest_letter": round(commonest, 4),
            "longest_option": round(float(longest), 4),
            "option_text_prior": round(prior, 4), "best_rule": best[0], "best": round(best[1], 4),
            "best_minus_chance_points": round(100 * (best[1] - chance), 2)}


def _teacher_questions(stage: MCQStage, rows: list[dict], pool: Path, out: Path, seed: int, progress, counts,
                       resume: bool) -> list[tuple[dict, str, str, list[str]] | None]:
    """(row, question, correct option text, distractor texts) per row from the teacher's mcq cells, or None where
    the reply failed a filter rule."""
    grid = PromptGrid(Path(stage.prompts) if stage.prompts else None)

    def make_jobs() -> Iterator[Job]:
        for row in rows:
            subfield = row.get("subfield") if row.get("subfield") in GRID_SUBFIELDS else "histopathology"
            level = row.get("difficulty") or stage.default_level
            args = {"references": row.get("references") or [], "with_image": stage.with_image,
                    "n_options": stage.n_options, "n_turns": 1}
            yield Job(row, cell_id(subfield, level, "mcq"), relative_images(row, pool, out).get("images") or [],
                      row.get("diagnosis"), grid, args)

    guard_identity(out, stage.identity(grid.digest()), resume)
    generate(make_jobs, out, stage.endpoint, stage.with_image, progress, counts)
    replies = {r["record_id"]: r for r in iter_jsonl(out / GENERATIONS)}
    rules_cfg = FilterStage(rules=["tags", "truncation", "repetition", "language_mix", "answer_consistency"])
    checks = [(name, FILTERS[name].factory(rules_cfg)) for name in rules_cfg.rules]
    out_rows = []
    for row in rows:
        reply = replies.get(row["id"])
        if reply is None:
            out_rows.append(None)
            continue
        parsed = parse_reply(reply["response"], reply.get("reasoning"))
        cand = Candidate(reply, parsed, reply["response"], 0)
        reasons = [f"{n}: {why}" for n, check in checks if (why := check(cand)) is not None]
        if reasons:
            counts["teacher_rejected"] += 1
            counts[f"teacher_rejected.{reasons[0].split(':')[0]}"] += 1
            out_rows.append(None)
            continue
        turn = parsed.turns[0]
        letter = answer_letter(turn.answer)
        others = [t for k, t in turn.options.items() if k != letter]
        out_rows.append((row, turn.question, turn.options[letter], others))
    return out_rows


def run_mcq(stage: MCQStage, ctx: StageContext) -> dict:
    """The mcq stage's runner (`curate/stages.py`): the steps in this module's docstring."""
    counts: Counter = Counter()
    pool = Path(stage.pool) if stage.pool else find_pool(ctx.parent)
    rows = _pool_rows(stage, ctx.parent, pool, counts)
    rng = np.random.default_rng([ctx.seed, 11])
    by_stratum: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_stratum[stratum(row)].append(row)
    take = allocate({k: len(v) for k, v in by_stratum.items()}, stage.n)
    drawn = []
    for key in sorted(by_stratum):
        members = by_stratum[key]
        idx = rng.choice(len(members), take[key], replace=False)
        drawn += [members[i] for i in sorted(idx)]
    ctx.progress.total = len(drawn)
    if stage.source == "rules":
        distractors = rule_distractors(rows, drawn, stage.n_options, rng)
        questions = [(row, stage.question, row["diagnosis"], d) if d else None
                     for row, d in zip(drawn, distractors, strict=True)]
    else:
        questions = _teacher_questions(stage, drawn, pool, ctx.work, ctx.seed, ctx.progress, counts, ctx.resume)
        if stage.teacher_distractors == "balance":
            questions = balance_teacher_distractors(questions, rng, counts)
    made = [q for q in questions if q is not None]
    counts["no_question"] = len(questions) - len(made)
    items = _items(stage, made, pool, ctx, rng)
    heldout = _stratified_heldout(items, stage.heldout, rng)
    for item in items:
        ctx.writer.row("heldout" if item["id"] in heldout else "mcq", item)
    report = {"asked": stage.n, "pool": len(rows), "made": len(items), "heldout": len(heldout),
              "strata": {k: {"pool": len(by_stratum[k]), "drawn": take[k]} for k in sorted(by_stratum)},
              "letters": dict(sorted(Counter(it["answer"] for it in items).items())),
              "no_image": no_image_baselines(items)}
    (ctx.work / "mcq_report.json").write_text(json.dumps(report, indent=2) + "\n")
    (ctx.work / "mcq_report.md").write_text(_markdown(report))
    return {**counts, **{k: report[k] for k in ("asked", "pool", "made", "heldout", "letters", "no_image")}}


def _pool_rows(stage: MCQStage, parent: Path, pool: Path, counts: Counter) -> list[dict]:
    """The pool's caption rows in the stage's subfields, less those the SFT data holds (the parent filter stage's
    kept.jsonl, and `exclude`), each with its diagnosis and tissue system."""
    exclude = [Path(p) for p in stage.exclude] + ([parent / "kept.jsonl"] if (parent / "kept.jsonl").is_file() else [])
    sft_images, sft_captions, sft_ids = _sft_keys(exclude)
    labels = read_id_table(stage.labels, ("diagnosis",), ("tissue_system",)) if stage.labels else {}
    rows = []
    for row in iter_jsonl(pool / "caption.jsonl"):
        rid = str(row["id"])
        if (row.get("subfield") or "histopathology") not in stage.subfields:
            counts[f"skipped_subfield.{row.get('subfield')}"] += 1
            continue
        if rid in sft_ids or normalize(row["caption"]) in sft_captions or \
                (row.get("images") and image_key(row, pool) in sft_images):
            counts["excluded_sft_overlap"] += 1
            continue
        fields = labels.get(rid, (0, {}))[1]
        diagnosis = fields.get("diagnosis") or row.get("diagnosis")
        if stage.source == "rules" and not diagnosis:
            counts["no_diagnosis"] += 1
            continue
        rows.append({**row, "diagnosis": diagnosis,
                     "tissue_system": fields.get("tissue_system") or row.get("tissue_system")
                     or tissue_system(row["caption"])})
    if not rows:
        raise ConfigError(f"{pool}: no caption rows left for RL MCQs after removing the SFT data's images and "
                          f"captions ({counts['excluded_sft_overlap']} overlapped"
                          + (f", {counts['no_diagnosis']} had no diagnosis: give `labels` or use source teacher"
                             if counts["no_diagnosis"] else "") + ")")
    return rows


def _items(stage: MCQStage, made: list[tuple[dict, str, str, list[str]]], pool: Path, ctx: StageContext,
           rng: np.random.Generator) -> list[dict]:
    """The questions as our `mcq` rows, each answer's letter dealt from a balanced deck."""
    letters = balanced_letters([len(q[3]) + 1 for q in made], rng)
    items = []
    for (row, question, correct, others), letter in zip(made, letters, strict=True):
        options = place(correct, others, letter, rng)
        items.append({"id": f"mcq:{row['id']}", "record_id": row["id"], "question": question, "options": options,
                      "answer": letter, "answer_type": "mcq",
                      "images": relative_images(row, pool, ctx.work).get("images"),
                      "category": row.get("diagnosis") or correct, "subfield": row.get("subfield"),
                      "tissue_system": row["tissue_system"], "stratum": stratum(row)})
        if stage.source == "rules":
            ctx.progress.advance(1)
    return items


def _stratified_heldout(items: list[dict], fraction: float, rng: np.random.Generator) -> set[str]:
    by: dict[str, list[str]] = defaultdict(list)
    for it in items:
        by[it["stratum"]].append(it["id"])
    take = allocate({k: len(v) for k, v in by.items()}, int(round(fraction * len(items))))
    out = set()
    for key, ids in by.items():
        out.update(ids[i] for i in rng.choice(len(ids), take[key], replace=False))
    return out


def _markdown(report: dict) -> str:
    lines = ["# RL MCQs", "", f"{report['made']} MCQs made of {report['asked']} asked, from a pool of {report['pool']} "
             f"captions the SFT data does not use; {report['heldout']} held out.", "",
             "| stratum | pool | drawn |", "|---|---|---|"]
    lines += [f"| {k} | {v['pool']} | {v['drawn']} |" for k, v in report["strata"].items()]
    total = max(sum(report["letters"].values()), 1)
    lines += ["", "| letter | questions | share |", "|---|---|---|"]
    lines += [f"| {k} | {v} | {100 * v / total:.1f}% |" for k, v in report["letters"].items()]
    b = report["no_image"]
    if b:
        lines += ["", "No-image rules (accuracy without the image; chance is 1/options):", "",
                  "| rule | accuracy |", "|---|---|", f"| chance | {b['chance']:.3f} |",
                  f"| commonest letter | {b['commonest_letter']:.3f} |",
                  f"| longest option | {b['longest_option']:.3f} |",
                  f"| option-text prior | {b['option_text_prior']:.3f} |", "",
                  f"Best: {b['best_rule']}, {b['best_minus_chance_points']:+.1f} points over chance"
                  + (" (over the 3-point budget: the options give the answer away)"
                     if b["best_minus_chance_points"] > 3 else " (within 3 points)") + "."]
    return "\n".join(lines) + "\n"
