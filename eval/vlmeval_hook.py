"""VLMEvalKit integration: a model class for patho-r1 checkpoints and an in-process runner.

`import vlmeval` has global side effects (it disables SSL verification, turns off autograd, seeds RNGs), so this
module imports it only inside the functions that need it; import it in an evaluation process, never in training.

    from patho_r1.eval.vlmeval_hook import register
    register("patho-r1-7b", model_path="runs/patho-r1-7b/rl/model")     # now in vlmeval.config.supported_VLM

    patho-r1 eval vlmeval --model runs/patho-r1-7b/rl/model --data PathMMU_VAL PathVQA_VAL

Answers: `generate_inner` returns only the content of the last `<answer>...</answer>` (else the text after
`</think>`).  VLMEvalKit's exact matcher does not understand the tags, and a raw trace can be mis-scored as another
option through option-text matching.  With `SPLIT_THINK=1` it returns the raw response and VLMEvalKit calls our
`split_thinking`, which keeps the reasoning trace in a `thinking` column.

Scoring through a vLLM server instead: start `vllm serve CKPT --served-model-name patho-r1` (OpenAI-compatible), then
run VLMEvalKit's `run.py --model patho-r1 --base-url http://HOST:PORT/v1 --data PathMMU_VAL`; the same answer
extraction applies if you score its predictions file with `patho-r1 eval score` or register this class with
`engine="vllm"`.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from patho_r1.rewards.parsing import REASONING_SYSTEM_PROMPT, extract_final_answer, split_thinking


class PathoR1VLMCore:
    """Everything but the VLMEvalKit base class, so it is testable where vlmeval cannot be installed."""

    INTERLEAVE = True

    def __init__(self, model_path: str, max_new_tokens: int = 2048, engine: str = "hf",
                 system_prompt: str | None = REASONING_SYSTEM_PROMPT, temperature: float = 0.0, **kwargs):
        # VLMEvalKit passes extra keywords to some model names (e.g. use_vllm for "Qwen2.5-VL" names): accept them.
        from patho_r1.eval.generation import SamplingConfig, make_generator

        self.model_path = str(model_path)
        self.system_prompt = system_prompt
        self.sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, batch_size=1)
        self.generator = make_generator(self.model_path, engine="vllm" if kwargs.get("use_vllm") else engine)
        self.last_response: str | None = None

    def to_request(self, message: list[dict]):
        from patho_r1.data import load_image
        from patho_r1.eval.generation import ChatRequest

        content, images = [], []
        for part in message:
            if part["type"] == "image":
                images.append(load_image(part["value"]))
                content.append({"type": "image"})
            elif part["type"] == "text":
                content.append({"type": "text", "text": part["value"]})
            else:
                raise ValueError(f"unsupported VLMEvalKit message part {part['type']!r} (video: pass frames)")
        messages = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else []) + \
            [{"role": "user", "content": content}]
        return ChatRequest(messages=messages, images=images)

    def generate_inner(self, message, dataset=None) -> str:
        response = self.generator.generate([self.to_request(message)], self.sampling)[0]
        self.last_response = response
        if os.environ.get("SPLIT_THINK"):
            return response  # VLMEvalKit calls split_thinking on it and keeps both parts
        return extract_final_answer(response)

    def split_thinking(self, s: str) -> tuple[str, str]:
        return split_thinking(s)


@functools.lru_cache(maxsize=1)
def model_class():
    """`PathoR1VLM(PathoR1VLMCore, vlmeval.vlm.base.BaseModel)`, built on first use."""
    from vlmeval.vlm.base import BaseModel

    class PathoR1VLM(PathoR1VLMCore, BaseModel):
        def __init__(self, model_path: str, **kwargs):
            BaseModel.__init__(self)
            PathoR1VLMCore.__init__(self, model_path, **kwargs)

    return PathoR1VLM


def register(name: str, model_path: str, **kwargs) -> None:
    """One line: make `name` a VLMEvalKit model that loads `model_path`."""
    from vlmeval.config import supported_VLM

    supported_VLM[name] = functools.partial(model_class(), model_path=model_path, **kwargs)


# What VLMEvalKit calls its "judge" is how `dataset.evaluate` scores: this rule-based matcher (no LLM), or the name of
# an LLM judge model.  `vlmeval_judge` below is that setting, kept apart from our own LLM judge (`eval/judge.py`).
EXACT_MATCHING = "exact_matching"

# VLMEvalKit's short-answer sets (PathVQA_VAL/TEST) are scored only by an LLM judge; exact matching leaves their
# answer map empty (`ImageShortQADataset.evaluate`), so a run would generate everything and then fail.
JUDGE_ONLY_TYPES = ("Short",)


def check_vlmeval_judge(dataset_name: str, dataset_type: str, vlmeval_judge: str, judge_url: str | None) -> None:
    """Fail before inference when VLMEvalKit's scoring setting cannot score the dataset."""
    if dataset_type in JUDGE_ONLY_TYPES and vlmeval_judge == EXACT_MATCHING and not judge_url:
        raise ValueError(f"{dataset_name} is a short-answer set: VLMEvalKit scores it only with an LLM judge. Pass "
                         "--judge-url URL/v1 and --judge-model NAME (any OpenAI-compatible server, e.g. `vllm serve`), "
                         "or score it with `patho-r1 eval bench --name pathvqa` (token recall without a judge)")


def pred_file(work_dir: str, model_name: str, dataset_name: str) -> Path:
    """Where `infer_data_job` wrote its predictions: VLMEvalKit's own rule, so `PRED_FORMAT=tsv|json` is followed
    (it is `.xlsx` only by default)."""
    from vlmeval.smp.file import get_pred_file_path

    return Path(get_pred_file_path(work_dir, model_name, dataset_name, use_env_format=True))


class RedactKey:
    """A logging filter that blanks a secret: VLMEvalKit's `OpenAIWrapper` logs its API key at INFO level."""

    def __init__(self, secret: str | None):
        self.secret = secret

    def filter(self, record) -> bool:
        if self.secret and self.secret in record.getMessage():
            record.msg, record.args = record.getMessage().replace(self.secret, "***"), None
        return True


def vlmeval_judge_kwargs(vlmeval_judge: str, judge_url: str | None, api_key: str | None, nproc: int = 4) -> dict:
    """`dataset.evaluate(pred_file, **kwargs)` for `vlmeval_judge` (`exact_matching` or a model name) at our judge
    endpoint: `build_judge` hands `api_base` and `key` to `OpenAIWrapper`, which posts to `api_base` as given, so the
    chat-completions path is appended here."""
    kwargs: dict = {"model": vlmeval_judge, "nproc": nproc}
    if judge_url:
        kwargs["api_base"] = judge_url.rstrip("/") + "/chat/completions"
        kwargs["key"] = api_key or "EMPTY"  # local servers take any key; OpenAIWrapper insists on one
    return kwargs


def run_vlmeval(model_path: str, datasets: list[str], work_dir: str, name: str = "patho-r1",
                max_new_tokens: int = 2048, vlmeval_judge: str = EXACT_MATCHING, judge_url: str | None = None,
                nproc: int = 4) -> dict:
    """VLMEvalKit's own inference and evaluation, in this process (datasets by name; custom TSVs from $LMUData).

    `vlmeval_judge`: `exact_matching` (VLMEvalKit's rule-based matcher), or an LLM judge model name; with
    `judge_url` (an OpenAI-compatible /v1 base, such as our judge's endpoint), VLMEvalKit's judge is that server,
    with the key from `OPENAI_API_KEY`."""
    import logging

    try:
        from vlmeval.config import supported_VLM
        from vlmeval.dataset import build_dataset
        from vlmeval.inference import infer_data_job
        from vlmeval.smp import get_logger
    except ImportError as exc:
        raise ImportError("VLMEvalKit is not importable: pip install -e '.[eval]' (it needs torchvision, so use a "
                          "GPU/CUDA torch stack, not the CPU demo stack)") from exc
    api_key = os.environ.get("OPENAI_API_KEY")
    if vlmeval_judge != EXACT_MATCHING and not (judge_url or api_key or os.environ.get("OPENAI_API_BASE")):
        raise ValueError(f"judge {vlmeval_judge!r} needs --judge-url, or OPENAI_API_KEY / OPENAI_API_BASE for OpenAI; "
                         "use --judge exact_matching for MCQ and Yes/No sets")
    get_logger("vlmeval.api.gpt").addFilter(RedactKey(api_key))
    built = {}
    for ds_name in datasets:  # every dataset checked before any inference
        built[ds_name] = build_dataset(ds_name)
        if built[ds_name] is None:
            raise ValueError(f"VLMEvalKit does not know dataset {ds_name!r} (custom sets: put {ds_name}.tsv in "
                             "$LMUData)")
        check_vlmeval_judge(ds_name, getattr(built[ds_name], "TYPE", ""), vlmeval_judge, judge_url)
    register(name, model_path, max_new_tokens=max_new_tokens)
    model = supported_VLM[name]()
    results = {}
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    for ds_name, dataset in built.items():
        model = infer_data_job(model, work_dir=work_dir, model_name=name, dataset=dataset, verbose=False)
        results[ds_name] = dataset.evaluate(str(pred_file(work_dir, name, ds_name)),
                                            **vlmeval_judge_kwargs(vlmeval_judge, judge_url, api_key, nproc))
        logging.getLogger(__name__).info("vlmeval %s: %s", ds_name, results[ds_name])
        print(f"[vlmeval] {ds_name}: {results[ds_name]}")
    return results
