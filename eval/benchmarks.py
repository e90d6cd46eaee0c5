"""The public pathology benchmarks, and our own MCQ sets, each one object: its reader, its prompt, its rules.

    patho-r1 eval bench --name pathmmu --data PathMMU/ --model CKPT [--prompt cot|cod|direct] [--split test_tiny]
    patho-r1 eval score --name pathmmu --data PathMMU_VAL.tsv --predictions PathoR1_PathMMU_VAL.xlsx

| benchmark         | files                                                    | official rule | table          |
|-------------------|----------------------------------------------------------|---------------|----------------|
| `pathmmu`         | `data.json` + `images/`, or VLMEvalKit `PathMMU_*.tsv`    | PathMMU       | subset x split |
| `pathvqa`         | HF parquet, or `PathVQA_*.tsv`                            | LLaVA-Med     | closed / open  |
| `quilt-vqa`       | HF parquet or `quiltvqa_test_w_ans.json`                  | Quilt-LLaVA   | closed / open  |
| `medxpertqa-mm`   | MM jsonl + images                                         | VLMEvalKit    | task, type     |
| `omnimedvqa-path` | `QA_information/*/*.json` + `Images/`, microscopy only    | VLMEvalKit    | source, type   |
| `mcq`             | our MCQ JSONL or any VLMEvalKit TSV (the eval phase's)    | VLMEvalKit    | category       |

Files are read by the same readers the data engine imports them with (`patho_r1.formats`); a `.tsv` is read as a
VLMEvalKit TSV whatever the benchmark.  A bad row is an error naming its file, row and field, or, with
`on_error="skip"` (default `"raise"`, as the data engine's importer spells it), a line in `skipped.jsonl` and a
count in the report (PathMMU ships no images for SocialPath, Atlas
and most of PathCLS, so a partial download needs it, or `subsets=`).

`eval bench` generates the responses and then scores them through the same function as `eval score`, which scores
predictions made elsewhere (`patho_r1.eval.predictions`); the recipe's `eval` phase scores through it too
(`patho_r1.eval.scoring`).  Every row is scored by the benchmark's official rule and by our corrected rule
(`patho_r1.eval.rules`; the upstream rules and their quirks: `docs/benchmarks.md`); every accuracy carries its n and
95% Wilson interval.  Prompts: `cot` (Patho-R1's reasoning
system prompt), `cod` (chain of draft: the same tags, steps of at most five words), `direct` (no system prompt, the
benchmark's own instruction to answer directly): the comparison the Patho-R1 paper makes.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from patho_r1.data import MCQRecord, iter_records, parse_record
from patho_r1.errors import DataError
from patho_r1.eval.generation import ChatRequest, ResponseGenerator, SamplingConfig
from patho_r1.eval.mcq import build_request, response_length
from patho_r1.eval.rules import RULES, Rules
from patho_r1.eval.scoring import BenchRow, record_field, score_responses, score_row, write_results
from patho_r1.formats import ImportOptions, get_format
from patho_r1.progress import RowProgress
from patho_r1.rewards.parsing import REASONING_SYSTEM_PROMPT

# Chain of draft (Xu et al. 2025, arXiv:2502.18600) in Patho-R1's answer format: the paper compares it with CoT.
CHAIN_OF_DRAFT_PROMPT = (
    "You are a pathology expert. Think step by step, but only keep a minimum draft for each thinking step, with 5 "
    "words at most. Use the following format:<think> Your drafts </think><answer> Your final answer </answer>"
)
PROMPTS: dict[str, str | None] = {"cot": REASONING_SYSTEM_PROMPT, "cod": CHAIN_OF_DRAFT_PROMPT, "direct": None}
PromptMode = Literal["cot", "cod", "direct"]
FROM_MODE = "<the prompt mode's>"  # `system_prompt` default: the one `prompt` names

# Keywords that pick pathology questions out of a general medical set; not an official subset (Patho-R1's 90
# MedXpertQA cases were never published), so results on it are labelled as ours.
PATHOLOGY_KEYWORDS = ("histolog", "biopsy", "patholog", "h&e", "hematoxylin", "haematoxylin", "micrograph", "stain",
                      "cytolog", "immunohisto")


def _is_pathology_question(record: MCQRecord) -> bool:
    return any(k in record.question.lower() for k in PATHOLOGY_KEYWORDS)


# `question_filter=`: a named subset of a benchmark's questions (`eval bench --question-filter`)
QUESTION_FILTERS: dict[str, Callable[[MCQRecord], bool]] = {"pathology": _is_pathology_question}

# `on_error=`: a bad row raises its DataError, or is skipped and counted; the data engine's importer spells it the
# same.  `fail` is the old spelling of `raise`, still taken.
OnError = Literal["raise", "skip"]
ON_ERROR: tuple[str, ...] = ("raise", "skip")
_ON_ERROR_ALIASES = {"fail": "raise"}


def check_on_error(on_error: str) -> OnError:
    """`raise` or `skip`; the old `fail` is read as `raise` (with a DeprecationWarning)."""
    value = _ON_ERROR_ALIASES.get(on_error, on_error)
    if value != on_error:
        warnings.warn(f"on_error={on_error!r} is deprecated; use {value!r}", DeprecationWarning, stacklevel=3)
    if value not in ON_ERROR:
        raise ValueError(f"on_error must be one of {', '.join(ON_ERROR)}, got {on_error!r}")
    return value  # type: ignore[return-value]


def _is_microscopy(record: MCQRecord) -> bool:
    return (getattr(record, "modality_type", None) or "").strip().lower() == "microscopy images"


@dataclass(frozen=True)
class Benchmark:
    """One benchmark: how its files are read, how a record is asked, and how an answer is scored."""

    name: str
    format: str | None  # the import format of its own files; None: our MCQ JSONL (or a VLMEvalKit TSV)
    task: Literal["mcq", "vqa"]
    groups: tuple[str, ...]  # record fields the tables break down by, the first one across
    rules: Rules  # its official rule (and the shared corrected one)
    layout: Literal["pathmmu", "vlmeval", "vqa", "ours"]  # whose prompt layout the user turn follows
    keep: Callable[[MCQRecord], bool] | None = None  # the rows that belong to it (a subset of a larger release)
    keep_note: str = ""
    summary: str = ""

    def read(self, data: str | Path, **options) -> LoadedBenchmark:
        """Its rows as MCQ records (closed and open VQA rows too): `load_benchmark`'s options."""
        return load_benchmark(self, data, **options)

    def prompt(self, record: MCQRecord, mode: PromptMode = "cot") -> str:
        """The user turn in the benchmark's own layout.  `direct` keeps its instruction to answer at once; `cot` and
        `cod` drop that instruction, since the system prompt asks for reasoning first."""
        direct = mode == "direct"
        if self.layout == "ours":  # the layout our models are trained on
            return record.prompt_text()
        if record.answer_type == "mcq" and self.layout == "pathmmu":  # PathMMU's construct_prompt
            options = "\n".join(f"({k}) {v}" for k, v in record.options.items())
            tail = "Answer with the option's letter from the given choices directly." if direct else \
                "Answer with the option's letter from the given choices."
            return f"{record.question}\n\n{options}\n\n{tail}"
        if record.answer_type == "mcq":  # VLMEvalKit's ImageMCQDataset prompt
            options = "".join(f"{k}. {v}\n" for k, v in record.options.items())
            return f"Question: {record.question}\nOptions:\n{options}Please select the correct answer from the " \
                   "options above. \n"
        if record.answer_type == "yesno":  # Quilt-LLaVA's closed-question suffix
            return f"{record.question} Please choose from the following two options: [yes, no]" if direct else \
                record.question
        # open: VLMEvalKit's short-answer instruction
        return f"{record.question}\nPlease directly provide a short answer to the question. " if direct else \
            record.question

    def request(self, record: MCQRecord, mode: PromptMode = "cot", system_prompt: str | None = FROM_MODE
                ) -> ChatRequest:
        """The chat request: the record's images, then the user turn, after the mode's system prompt (or the one
        given; None for none)."""
        request = build_request(record, PROMPTS[mode] if system_prompt == FROM_MODE else system_prompt)
        request.messages[-1]["content"][-1] = {"type": "text", "text": self.prompt(record, mode)}
        return request

    def score(self, record: MCQRecord, response: str, rng=None, **options) -> BenchRow:
        """One response by both rules (`patho_r1.eval.scoring.score_row`; `rng`: PathMMU's guess stream)."""
        return score_row(self, record, response, rng=rng, **options)


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    Benchmark("pathmmu", "pathmmu", "mcq", ("category", "split"), RULES["pathmmu"], "pathmmu",
              summary="PathMMU (PubMed, SocialPath, EduContent, Atlas, PathCLS x val, test, test_tiny)"),
    Benchmark("pathvqa", "pathvqa", "vqa", ("split",), RULES["llava-med"], "vqa",
              summary="PathVQA, closed (yes/no) and open"),
    Benchmark("quilt-vqa", "quilt-vqa", "vqa", ("split",), RULES["quilt"], "vqa",
              summary="Quilt-VQA, closed (yes/no) and open"),
    Benchmark("medxpertqa-mm", "medxpertqa-mm", "mcq", ("medical_task", "question_type"), RULES["vlmeval"],
              "vlmeval", summary="MedXpertQA multimodal (5 options); question_filter='pathology': our keyword subset"),
    Benchmark("omnimedvqa-path", "omnimedvqa", "mcq", ("category", "question_type"), RULES["vlmeval"], "vlmeval",
              keep=_is_microscopy, keep_note="modality_type == 'Microscopy Images'",
              summary="OmniMedVQA, microscopy rows only"),
    Benchmark("mcq", None, "mcq", ("category",), RULES["vlmeval"], "ours",
              summary="our own MCQ / yes-no sets: MCQ JSONL or a VLMEvalKit TSV (the recipe's eval phase)"),
)}


def get_benchmark(name: str) -> Benchmark:
    try:
        return BENCHMARKS[name]
    except KeyError:
        raise KeyError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}") from None


# ----------------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class LoadedBenchmark:
    records: list[MCQRecord]
    skipped: list[dict] = field(default_factory=list)  # {"file", "row", "field", "error"} per bad row skipped
    filtered: int = 0  # rows outside the requested subset, split or filter


def load_benchmark(bench: Benchmark, data: str | Path, *, images: str | Path | None = None, split: str | None = None,
                   subsets: list[str] | None = None, question_filter: str | None = None, limit: int | None = None,
                   on_error: OnError = "raise") -> LoadedBenchmark:
    """The benchmark's rows as MCQ records (closed and open VQA rows too), through its own reader."""
    data = Path(data)
    is_tsv = data.suffix == ".tsv" or (data.is_dir() and any(data.glob("*.tsv")))
    on_error = check_on_error(on_error)
    if question_filter is not None and question_filter not in QUESTION_FILTERS:
        raise ValueError(f"question_filter must be one of {', '.join(QUESTION_FILTERS)} or None, got "
                         f"{question_filter!r}")
    keep_question = QUESTION_FILTERS[question_filter] if question_filter else None
    out = LoadedBenchmark(records=[])
    for record in _records(bench, data, is_tsv, ImportOptions(images=Path(images) if images else None), split,
                           subsets, out, on_error):
        wanted = (bench.keep is None or bench.keep(record)) \
            and (split is None or record_field(record, "split") == split) \
            and (not subsets or record.category in subsets) \
            and (keep_question is None or keep_question(record))
        if not wanted:
            out.filtered += 1
            continue
        out.records.append(record)
        if limit and len(out.records) >= limit:
            break
    return out if out.records else _nothing(bench, data, len(out.skipped), out.filtered, split, subsets,
                                            question_filter)


def _records(bench: Benchmark, data: Path, is_tsv: bool, opts: ImportOptions, split, subsets, out: LoadedBenchmark,
             on_error: str) -> Iterator[MCQRecord]:
    """Every row as a record: our own MCQ JSONL row by row, else through the benchmark's import format, bad rows
    raised or (`on_error="skip"`) noted in `out.skipped`, rows outside the split or subsets counted in `out.filtered`
    before they are converted (a subset left out may lack its images)."""
    if bench.format is None and not is_tsv:
        yield from iter_records(data, "mcq")
        return
    fmt = get_format("vlmeval-tsv" if is_tsv else bench.format)
    for label, row, raw in fmt.rows(data, opts):
        if _outside(raw, split, subsets):
            out.filtered += 1
            continue
        try:
            converted = fmt.convert(raw, (label, row), opts)
            converted.check_files((label, row))
            yield parse_record({**converted.record, "images": converted.images}, "mcq", path=label, row=row)
        except DataError as exc:
            if on_error == "raise":
                raise
            out.skipped.append({"file": exc.path, "row": exc.row, "field": exc.field, "error": exc.message})


def _nothing(bench: Benchmark, data: Path, bad: int, filtered: int, split, subsets, question_filter):
    raise DataError(data, None, None, f"no {bench.name} rows to score ({bad} bad, {filtered} outside split={split!r} "
                    f"subsets={subsets} question_filter={question_filter!r}"
                    f"{', ' + bench.keep_note if bench.keep_note else ''})")


def _outside(raw, split: str | None, subsets: list[str] | None) -> bool:
    """Whether a raw row's own subset or split (where its reader tags them: PathMMU's `_subset`, a shard's `_split`)
    is outside the request."""
    if not isinstance(raw, dict):
        return False
    subset, raw_split = raw.get("_subset"), raw.get("_split") or raw.get("split")
    return bool((subsets and subset is not None and subset not in subsets)
                or (split and raw_split is not None and str(raw_split) != split))


# ----------------------------------------------------------------------------------------------------------------------
# Generating, then scoring through the one path
# ----------------------------------------------------------------------------------------------------------------------


def generate_responses(bench: Benchmark, records: list[MCQRecord], generator: ResponseGenerator,
                       sampling: SamplingConfig, *, prompt: PromptMode = "cot", system_prompt: str | None = FROM_MODE,
                       show_progress: bool = False) -> list[str]:
    """Every record's response, batched, with progress and ETA."""
    if prompt not in PROMPTS:
        raise ValueError(f"prompt must be one of {sorted(PROMPTS)}, got {prompt!r}")
    requests = [bench.request(r, prompt, system_prompt) for r in records]
    progress = RowProgress(f"{bench.name} generate", total=len(requests), show=show_progress)
    responses: list[str] = []
    chunk = max(sampling.batch_size * 4, 1)  # a few batches per call: progress moves, batching stays whole
    for start in range(0, len(requests), chunk):
        responses += generator.generate(requests[start:start + chunk], sampling)
        progress.advance(len(requests[start:start + chunk]))
    progress.close()
    return responses


def evaluate_benchmark(bench: Benchmark, records: list[MCQRecord], generator: ResponseGenerator,
                       sampling: SamplingConfig, *, prompt: PromptMode = "cot",
                       system_prompt: str | None = FROM_MODE, tokenizer=None, llm_judge=None,
                       scorer: str = "official", seed: int = 42,
                       show_progress: bool = False) -> tuple[dict, list[BenchRow]]:
    """Generate, then score every row (`score_responses`); returns (report, rows)."""
    responses = generate_responses(bench, records, generator, sampling, prompt=prompt, system_prompt=system_prompt,
                                   show_progress=show_progress)
    report, rows = score_responses(bench, records, responses, scorer=scorer, count_tokens=response_length(tokenizer),
                                   llm_judge=llm_judge, seed=seed)
    report["prompt"] = prompt
    return report, rows


def score_and_write(bench: Benchmark, loaded: LoadedBenchmark, responses: list[str | None], out_dir: str | Path,
                    title: str, *, token_counts: list[int | None] | None = None, count_tokens=None,
                    scorer: str = "official", llm_judge=None, seed: int = 42, **context) -> dict:
    """Score responses (None: no prediction) for the loaded rows and write every result file; returns the report.
    `eval bench` and `eval score` both end here, so the same responses give the same files."""
    report, rows = score_responses(bench, loaded.records, responses, scorer=scorer, token_counts=token_counts,
                                   count_tokens=count_tokens, llm_judge=llm_judge, seed=seed)
    report.update(context, skipped=len(loaded.skipped), filtered=loaded.filtered)
    missing = [str(r.id) for r, resp in zip(loaded.records, responses, strict=True) if resp is None]
    write_results(out_dir, report, rows, title, skipped=loaded.skipped, missing=missing)
    return report


def load_generator(model: str, engine: str = "hf") -> tuple[ResponseGenerator, object, object]:
    """(generator, tokenizer, processor) for a checkpoint: with `hf` the model on the GPU when there is one and its
    own tokenizer and processor; another engine loads the model itself (tokenizer and processor None)."""
    from patho_r1.eval.generation import make_generator
    from patho_r1.models import load_backbone

    if engine != "hf":
        return make_generator(model, engine=engine), None, None
    import torch

    backbone = load_backbone(model)
    if torch.cuda.is_available():
        backbone.model.to("cuda")
    return make_generator(backbone), backbone.tokenizer, backbone.processor


def run_benchmark(name: str, data: str | Path, model: str, out_dir: str | Path, *, engine: str = "hf",
                  prompt: PromptMode = "cot", split: str | None = None, subsets: list[str] | None = None,
                  question_filter: str | None = None, images: str | None = None, limit: int | None = None,
                  on_error: OnError = "raise", max_new_tokens: int = 512, batch_size: int = 16,
                  scorer: str = "official", llm_judge=None, seed: int = 42, show_progress: bool = False) -> dict:
    """Read, generate, then score and write (as `eval score` would) one benchmark for one checkpoint."""
    bench = get_benchmark(name)
    loaded = bench.read(data, images=images, split=split, subsets=subsets, question_filter=question_filter,
                        limit=limit, on_error=on_error)
    generator, tokenizer, _ = load_generator(model, engine)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0, batch_size=batch_size)
    responses = generate_responses(bench, loaded.records, generator, sampling, prompt=prompt,
                                   show_progress=show_progress)
    label = "/".join(Path(str(model)).parts[-2:])  # runs/demo/rl/model -> rl/model
    return score_and_write(bench, loaded, responses, out_dir, f"{bench.name}: {label} ({prompt})", scorer=scorer,
                           count_tokens=response_length(tokenizer), llm_judge=llm_judge, seed=seed, prompt=prompt,
                           model=str(model), data=str(data), split=split, subsets=subsets,
                           question_filter=question_filter)


def score_predictions(name: str, data: str | Path, predictions: str | Path, out_dir: str | Path, *,
                      split: str | None = None, subsets: list[str] | None = None,
                      question_filter: str | None = None, images: str | None = None,
                      on_error: OnError = "raise", scorer: str = "official", llm_judge=None,
                      seed: int = 42) -> dict:
    """`eval score`: the benchmark's rows, the predictions file matched to them by id, scored and written as
    `eval bench` writes them; no model is loaded."""
    from patho_r1.eval.predictions import match_predictions

    bench = get_benchmark(name)
    loaded = bench.read(data, images=images, split=split, subsets=subsets, question_filter=question_filter,
                        on_error=on_error)
    matched = match_predictions(predictions, loaded.records,
                                selection=bool(loaded.filtered or loaded.skipped or split or subsets))
    return score_and_write(bench, loaded, matched.responses, out_dir, f"{bench.name}: {Path(predictions).name}",
                           token_counts=matched.token_counts, scorer=scorer, llm_judge=llm_judge, seed=seed,
                           predictions=str(predictions), predictions_format=matched.format,
                           outside_selection=matched.outside, data=str(data), split=split, subsets=subsets,
                           question_filter=question_filter)
