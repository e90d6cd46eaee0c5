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
extraction applies if you post-process with `patho_r1.eval.mcq` or register this class with `engine="vllm"`.
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


def run_vlmeval(model_path: str, datasets: list[str], work_dir: str, name: str = "patho-r1",
                max_new_tokens: int = 2048, judge: str = "exact_matching") -> dict:
    """VLMEvalKit's own inference and evaluation, in this process (datasets by name; custom TSVs from $LMUData)."""
    try:
        from vlmeval.config import supported_VLM
        from vlmeval.dataset import build_dataset
        from vlmeval.inference import infer_data_job
    except ImportError as exc:
        raise ImportError("VLMEvalKit is not importable: pip install -e '.[eval]' (it needs torchvision, so use a "
                          "GPU/CUDA torch stack, not the CPU demo stack)") from exc
    if judge != "exact_matching" and not (os.environ.get("OPENAI_API_KEY") or os.environ.get("OPENAI_API_BASE")):
        raise ValueError(f"judge {judge!r} needs OPENAI_API_KEY or OPENAI_API_BASE (an OpenAI-compatible endpoint); "
                         "use --judge exact_matching for MCQ and Yes/No sets")
    register(name, model_path, max_new_tokens=max_new_tokens)
    model = supported_VLM[name]()
    results = {}
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    for ds_name in datasets:
        dataset = build_dataset(ds_name)
        if dataset is None:
            raise ValueError(f"VLMEvalKit does not know dataset {ds_name!r} (custom sets: put {ds_name}.tsv in "
                             "$LMUData)")
        model = infer_data_job(model, work_dir=work_dir, model_name=name, dataset=dataset, verbose=False)
        pred_file = Path(work_dir) / f"{name}_{ds_name}.xlsx"
        results[ds_name] = dataset.evaluate(str(pred_file), model=judge)
        print(f"[vlmeval] {ds_name}: {results[ds_name]}")
    return results
