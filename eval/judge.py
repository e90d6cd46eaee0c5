"""An LLM judge over any OpenAI-compatible chat endpoint (OpenAI, a vLLM server, ...), on the client the data
engine's teacher uses (`patho_r1.llm`): concurrent requests, the client's retries with backoff, token accounting,
and a disk cache keyed by judge model and prompt, so a re-run costs nothing.

Two modes:
- correctness (`verdicts`, `is_correct`): does a candidate answer mean the same as the reference?  Yes or no, with a
  one-line rationale, as VLMEvalKit's judge answers.
- reasoning quality (`rubric`): each reasoning chain scored 1-10 on the ten criteria in `RUBRIC` (ours, after the
  Patho-R1 paper's ten-criteria evaluation), with the mean per criterion and the total.

Configured explicitly or from the environment: `PATHO_JUDGE_BASE_URL` (or VLMEvalKit's `OPENAI_API_BASE`),
`PATHO_JUDGE_MODEL` (or `LOCAL_LLM`), `OPENAI_API_KEY`.  With none set, asking for a judgement is an error: an
open-ended set is never silently scored 0.

An item the judge cannot score, because its request failed after every retry or because the reply is not the
verdict asked for (prose instead of yes/no or JSON), is unscored: `None`, never a 0, and left out of the means
(VLMEvalKit scores such an item as wrong, which hides a broken judge inside a low number).  Unscored items are
counted and reported; when more than `max_unscored` of a batch is unscored, the call raises `JudgeError`, one line
(the CLI prints it and exits non-zero), and the replies that did arrive stay in the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from patho_r1.errors import ConfigError, PathoError
from patho_r1.llm import ChatRequest, EndpointConfig, LLMClient, run
from patho_r1.progress import RowProgress
from patho_r1.redact import redact

logger = logging.getLogger(__name__)

JUDGE_PROMPT = (
    "You are grading answers to a pathology question.\n"
    "Question: {question}\nReference answer: {answer}\nCandidate answer: {prediction}\n"
    "Does the candidate answer mean the same as the reference answer? Reply with yes or no on the first line, "
    "then one line saying why."
)

RUBRIC = {
    "factual_accuracy": "every stated fact about pathology is true",
    "logical_coherence": "each step follows from the one before",
    "visual_evidence": "the reasoning rests on features visible in the image",
    "completeness": "the findings needed for the conclusion are all considered",
    "conciseness": "no padding, repetition or irrelevant detail",
    "terminology": "correct, precise pathology terms",
    "answer_consistency": "the final answer is the one the reasoning reaches",
    "differential_diagnosis": "plausible alternatives are weighed and excluded",
    "no_hallucination": "no findings are invented that the question and image do not support",
    "clinical_relevance": "the conclusion is useful for the patient's management",
}

RUBRIC_PROMPT = (
    "You are grading the reasoning of a pathology assistant.\n"
    "Question: {question}\nReference answer: {answer}\nThe assistant's reasoning: {reasoning}\n"
    "The assistant's answer: {prediction}\n\n"
    "Score the reasoning from 1 (very poor) to 10 (excellent) on each criterion:\n{criteria}\n\n"
    "Reply with one JSON object mapping each criterion name to its integer score, and nothing else."
)


class JudgeError(PathoError, ConnectionError):
    """Too many items the judge could not score.  A ConnectionError too: that is what callers caught before."""


@dataclass
class JudgeVerdict:
    correct: bool | None  # None: unscored (the request failed, or the reply was not yes or no)
    rationale: str


@dataclass
class Asked:
    """Replies to a batch of prompts, in order: None where the request failed after every retry."""

    replies: list[str | None]
    errors: list[str]  # one redacted line per failed request


@dataclass
class LLMJudge:
    base_url: str
    model: str
    api_key: str | None = field(default=None, repr=False)  # never in a repr, a log line or a traceback's locals
    timeout: float = 60.0  # seconds waiting on the server per attempt; a judge reply is short
    concurrency: int = 8
    max_retries: int = 3
    deadline: float | None = None  # seconds per request, every attempt together (None: from timeout and retries)
    max_unscored: float = 0.1  # the share of a batch that may go unscored before the call fails
    cache: str | None = None  # a JSONL file of (key, reply); None: no cache
    show_progress: bool = False  # a bar with rate, ETA and tokens on a terminal (the CLI)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cache_hits: int = 0
    _replies: dict[str, str] | None = field(default=None, repr=False)  # the cache file, once read

    @classmethod
    def from_env(cls, cache: str | None = None) -> LLMJudge:
        base = os.environ.get("PATHO_JUDGE_BASE_URL") or os.environ.get("OPENAI_API_BASE")
        model = os.environ.get("PATHO_JUDGE_MODEL") or os.environ.get("LOCAL_LLM")
        if not base or not model:
            raise ConfigError("judge: no LLM judge configured; set PATHO_JUDGE_BASE_URL (an OpenAI-compatible "
                              "/v1 endpoint) and PATHO_JUDGE_MODEL, or pass judge settings in the config")
        return cls(base_url=base, model=model, api_key=os.environ.get("OPENAI_API_KEY"), cache=cache)

    def endpoint(self, max_tokens: int) -> EndpointConfig:
        return EndpointConfig(base_url=self.base_url, model=self.model, concurrency=self.concurrency,
                              max_retries=self.max_retries, timeout=self.timeout, deadline=self.deadline,
                              temperature=0.0, max_tokens=max_tokens)

    # -- requests, through the cache ------------------------------------------------------------------------------
    def _key(self, prompt: str, max_tokens: int) -> str:
        return hashlib.sha256(f"{self.model}\0{max_tokens}\0{prompt}".encode()).hexdigest()

    def _load_cache(self) -> dict[str, str]:
        """The cache file's replies, read once per judge (a row-by-row caller must not re-read it per row) and kept
        up to date as replies arrive; without a cache, nothing is kept."""
        if not self.cache:
            return {}
        if self._replies is not None:
            return self._replies
        self._replies = out = {}
        if not Path(self.cache).is_file():
            return out
        for line in Path(self.cache).read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a torn last line from a killed run
                continue
            out[row["key"]] = row["reply"]
        return out

    def ask(self, prompts: list[str], max_tokens: int) -> Asked:
        """Replies to `prompts`, from the cache where it holds them; the rest sent concurrently and cached (a failed
        request is not cached: a re-run asks it again)."""
        cached = self._load_cache()
        keys = [self._key(p, max_tokens) for p in prompts]
        missing = {k: p for k, p in zip(keys, prompts, strict=True) if k not in cached}
        self.cache_hits += len(prompts) - len(missing)
        errors: list[str] = []
        if missing:
            cached.update(self._send(missing, max_tokens, errors))
        return Asked([cached.get(k) for k in keys], errors)

    def _send(self, prompts: dict[str, str], max_tokens: int, errors: list[str]) -> dict[str, str]:
        replies: dict[str, str] = {}
        if self.cache:
            Path(self.cache).parent.mkdir(parents=True, exist_ok=True)

        progress = RowProgress("judge", total=len(prompts), show=self.show_progress)

        async def main() -> None:
            cache_fh = open(self.cache, "a", encoding="utf-8") if self.cache else None  # noqa: SIM115
            try:
                async with LLMClient(self.endpoint(max_tokens), api_key=self.api_key) as client:
                    def on_result(request, result):
                        progress.advance(1, tokens_in=client.prompt_tokens, tokens_out=client.completion_tokens)
                        if result.error is not None:
                            errors.append(result.error)
                            return
                        # on the event loop's thread, one callback at a time: no lock needed
                        replies[request.key] = result.text
                        if cache_fh is not None:
                            cache_fh.write(json.dumps({"key": request.key, "reply": result.text}) + "\n")
                            cache_fh.flush()

                    await client.map((ChatRequest(k, [{"role": "user", "content": p}]) for k, p in prompts.items()),
                                     on_result)
                    self.prompt_tokens += client.prompt_tokens
                    self.completion_tokens += client.completion_tokens
            finally:
                if cache_fh is not None:
                    cache_fh.close()

        try:
            run(main())
        finally:
            progress.close()
        return replies

    def _check(self, what: str, asked: Asked, unparsed: list[str], expected: str) -> None:
        """Raise one line when too much of a batch is unscored; else say how much was, if any."""
        n, failed = len(asked.replies), sum(r is None for r in asked.replies)
        if not failed and not unparsed:
            return
        parts = []
        if failed:
            example = redact(asked.errors[0]) if asked.errors else "no reply"
            parts.append(f"{failed} requests failed after retries (e.g. {example})")
        if unparsed:
            parts.append(f"{len(unparsed)} replies were not {expected} (e.g. {_snippet(unparsed[0])})")
        line = (f"judge {self.model} at {redact(self.base_url)}: {failed + len(unparsed)} of {n} {what} unscored: "
                f"{'; '.join(parts)}")
        if failed + len(unparsed) > self.max_unscored * n:
            kept = f"the answered ones are cached in {self.cache}; " if self.cache else ""
            raise JudgeError(f"{line}; more than the {self.max_unscored:.0%} allowed, so no score is given ({kept}run "
                             "again to retry the failed ones)")
        logger.warning("%s; left out of the scores", line)

    # -- correctness -------------------------------------------------------------------------------------------------
    def verdicts(self, items: list[tuple[str, str, str]]) -> list[JudgeVerdict]:
        """(question, reference answer, prediction) -> yes/no with the judge's rationale."""
        prompts = [JUDGE_PROMPT.format(question=q, answer=a, prediction=p) for q, a, p in items]
        asked = self.ask(prompts, max_tokens=64)
        out = [_judge_verdict(reply) for reply in asked.replies]
        unparsed = [r for r, v in zip(asked.replies, out, strict=True) if r is not None and v.correct is None]
        self._check("verdicts", asked, unparsed, "yes or no")
        return out

    def is_correct(self, question: str, answer: str, prediction: str) -> bool | None:
        """One item's verdict: True, False, or None (unscored)."""
        return self.verdicts([(question, answer, prediction)])[0].correct

    # -- reasoning quality -------------------------------------------------------------------------------------------
    def rubric(self, items: list[tuple[str, str, str, str]]) -> dict:
        """(question, reference, reasoning, prediction) -> per-item scores, the mean per criterion and the total
        (the sum of the ten means, out of 100).  A reply that is not the JSON asked for is counted, not guessed."""
        criteria = "\n".join(f"- {k}: {v}" for k, v in RUBRIC.items())
        prompts = [RUBRIC_PROMPT.format(question=q, answer=a, reasoning=r, prediction=p, criteria=criteria)
                   for q, a, r, p in items]
        asked = self.ask(prompts, max_tokens=256)
        scores = [_rubric_scores(reply) if reply is not None else None for reply in asked.replies]
        unparsed = [r for r, s in zip(asked.replies, scores, strict=True) if r is not None and s is None]
        self._check("items", asked, unparsed, "the JSON scores asked for")
        good = [s for s in scores if s is not None]
        means = {k: round(sum(s[k] for s in good) / len(good), 3) for k in RUBRIC} if good else {}
        unscored = [{"item": i, "reason": "request failed" if reply is None else "reply not parsed"}
                    for i, (reply, s) in enumerate(zip(asked.replies, scores, strict=True)) if s is None]
        return {"n": len(items), "scored": len(good), "unparsed": len(unparsed),
                "failed": sum(r is None for r in asked.replies), "unscored": unscored, "per_item": scores,
                "mean_per_criterion": means, "total": round(sum(means.values()), 2) if means else None}


def _judge_verdict(reply: str | None) -> JudgeVerdict:
    """Yes or no on the first line, then why; None (unscored) for a failed request or a reply that is neither."""
    text = (reply or "").strip()
    word = re.sub(r"[^a-z]", "", text.lower().split()[0]) if text else ""
    if word not in ("yes", "no"):
        return JudgeVerdict(None, _snippet(reply or ""))
    rationale = text.split("\n", 1)[1].strip() if "\n" in text else text[len(text.split()[0]):].strip(" .:-")
    return JudgeVerdict(word == "yes", rationale)


def _snippet(reply: str, limit: int = 60) -> str:
    return repr(redact(" ".join(reply.split()))[:limit])


def _rubric_scores(reply: str) -> dict[str, int] | None:
    m = re.search(r"\{.*\}", reply, re.DOTALL)
    if not m:
        return None
    try:
        data = json.loads(m.group(0))
    except json.JSONDecodeError:
        return None
    try:
        scores = {k: int(data[k]) for k in RUBRIC}
    except (KeyError, TypeError, ValueError):
        return None
    return scores if all(1 <= v <= 10 for v in scores.values()) else None
