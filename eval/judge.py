"""An LLM judge for open-ended VQA answers, over any OpenAI-compatible chat endpoint (OpenAI, a vLLM server, ...).

Configured explicitly or from the environment: `PATHO_JUDGE_BASE_URL` (or VLMEvalKit's `OPENAI_API_BASE`),
`PATHO_JUDGE_MODEL` (or `LOCAL_LLM`), `OPENAI_API_KEY`.  With none set, asking for a judgement is an error: an
open-ended set is never silently scored 0.
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from patho_r1.errors import ConfigError

JUDGE_PROMPT = (
    "You are grading answers to a pathology question.\n"
    "Question: {question}\nReference answer: {answer}\nCandidate answer: {prediction}\n"
    "Does the candidate answer mean the same as the reference answer? Reply with exactly one word: yes or no."
)


@dataclass
class LLMJudge:
    base_url: str
    model: str
    api_key: str | None = field(default=None, repr=False)  # never in a repr, a log line or a traceback's locals
    timeout: float = 60.0

    @classmethod
    def from_env(cls) -> LLMJudge:
        base = os.environ.get("PATHO_JUDGE_BASE_URL") or os.environ.get("OPENAI_API_BASE")
        model = os.environ.get("PATHO_JUDGE_MODEL") or os.environ.get("LOCAL_LLM")
        if not base or not model:
            raise ConfigError("judge: no LLM judge configured; set PATHO_JUDGE_BASE_URL (an OpenAI-compatible "
                              "/v1 endpoint) and PATHO_JUDGE_MODEL, or pass judge settings in the config")
        return cls(base_url=base, model=model, api_key=os.environ.get("OPENAI_API_KEY"))

    def _chat(self, prompt: str) -> str:
        url = self.base_url.rstrip("/") + "/chat/completions"
        body = json.dumps({"model": self.model, "temperature": 0.0, "max_tokens": 4,
                           "messages": [{"role": "user", "content": prompt}]}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                payload = json.loads(response.read())
        except (urllib.error.URLError, TimeoutError) as exc:
            raise ConnectionError(f"judge endpoint {url} failed: {exc}") from None
        return payload["choices"][0]["message"]["content"]

    def judge(self, question: str, answer: str, prediction: str) -> bool:
        reply = self._chat(JUDGE_PROMPT.format(question=question, answer=answer, prediction=prediction))
        word = re.sub(r"[^a-z]", "", reply.strip().lower().split()[0]) if reply.strip() else ""
        if word not in ("yes", "no"):
            raise ValueError(f"judge replied {reply!r}, expected yes or no")
        return word == "yes"
