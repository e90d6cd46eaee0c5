"""One client for OpenAI-compatible chat endpoints (a vLLM or SGLang server, `transformers serve`, a hosted API),
shared by the data engine's teacher and the evaluation judge.

    endpoint = EndpointConfig(base_url="http://127.0.0.1:8000/v1", model="deepseek-r1", concurrency=32)
    async with LLMClient(endpoint) as client:
        result = await client.chat([{"role": "user", "content": "..."}])
        await client.map(requests, on_result)   # many requests, `concurrency` in flight, results as they finish

Retries are the `openai` package's own: exponential backoff with jitter on 408/409/429/5xx, timeouts and dropped
connections, honouring `Retry-After`.  `timeout` bounds each wait on the server (connecting, or the next bytes of
the reply); `deadline` bounds the whole request, every attempt together, so a connection held open or a body that
trickles a byte a second ends too.  A request that still fails, or whose reply is not a chat completion with a
choice and text content (an HTML page, `choices: []`, `content: null`, a body that is not JSON), comes back as a
`ChatResult` with a one-line `error`, so one bad prompt never stops a 500k-request run; the caller records it and a
re-run asks again.

The API key is read from the environment variable the config names, handed to the client and nowhere else: it is
not a field of any config, so it never reaches a manifest, a repr or a config hash.  Every error line is passed
through `patho_r1.redact` (the key, and anything that looks like a key, masked), replies are scrubbed of the key,
and log records are redacted process-wide once a client holds a key.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field

from patho_r1.config import StrictModel
from patho_r1.redact import redact, register_secret, scrub


class EndpointConfig(StrictModel):
    base_url: str = Field(..., description="the endpoint's /v1 URL")
    model: str
    api_key_env: str = Field("OPENAI_API_KEY", description="the environment variable holding the API key (the key "
                             "itself never goes in a config)")
    concurrency: int = Field(8, ge=1, le=1024, description="requests in flight at once")
    # Defaults for a local model server (vLLM, SGLang, `transformers serve`): it queues rather than rate-limits, so
    # retries are for a dropped connection or a 5xx (a re-run asks what still failed); 300 s between bytes covers a
    # non-streamed 4096-token reply under load.
    max_retries: int = Field(2, ge=0, le=20, description="retries per request on 429, 5xx, timeouts and dropped "
                             "connections (exponential backoff with jitter)")
    timeout: float = Field(300.0, gt=0, description="seconds a request waits on the server: to connect, or for the "
                           "next bytes of the reply (per attempt)")
    deadline: float | None = Field(None, gt=0, description="seconds per request, every attempt and backoff "
                                   "together; a reply not complete by then is that request's failure (None: "
                                   "timeout x (max_retries + 1) + 10 s a retry)")
    temperature: float = Field(0.6, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int = Field(4096, gt=0, description="completion tokens per request")
    extra_body: dict[str, Any] = Field(default_factory=dict, description="server-specific request fields")
    price_in_per_mtok: float | None = Field(None, ge=0, description="USD per million prompt tokens (for the cost "
                                            "estimate)")
    price_out_per_mtok: float | None = Field(None, ge=0, description="USD per million completion tokens")

    def identity(self) -> dict:
        """What decides the replies (not where the server runs or how hard it is pushed): resume compares this."""
        return {"model": self.model, "temperature": self.temperature, "top_p": self.top_p,
                "max_tokens": self.max_tokens, "extra_body": self.extra_body}

    def request_deadline(self) -> float:
        """Seconds one request may take in all: a trickling body never trips `timeout`, which counts per read."""
        if self.deadline is not None:
            return self.deadline
        return self.timeout * (self.max_retries + 1) + 10.0 * self.max_retries

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float | None:
        if self.price_in_per_mtok is None and self.price_out_per_mtok is None:
            return None
        price_in, price_out = self.price_in_per_mtok or 0, self.price_out_per_mtok or 0
        return (prompt_tokens * price_in + completion_tokens * price_out) / 1e6


@dataclass
class ChatResult:
    text: str = ""
    reasoning: str | None = None  # a reasoning model's separate `reasoning_content` (DeepSeek-R1, vLLM, SGLang)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    error: str | None = None  # set when every attempt failed


@dataclass
class ChatRequest:
    key: Any  # the caller's handle (e.g. a record id and prompt id), passed back with the result
    messages: list[dict]
    params: dict = field(default_factory=dict)  # per-request overrides of max_tokens, temperature, ...


def image_part(path: str | Path) -> dict:
    """An OpenAI image content part holding a local image file as a data URI."""
    data = Path(path).read_bytes()
    mime = "image/png" if data.startswith(b"\x89PNG") else "image/jpeg"
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{base64.b64encode(data).decode()}"}}


def _reasoning_of(message) -> str | None:
    for name in ("reasoning_content", "reasoning"):  # vLLM/SGLang/DeepSeek; OpenRouter-style servers
        value = getattr(message, name, None)
        if value is None and getattr(message, "model_extra", None):
            value = message.model_extra.get(name)
        if isinstance(value, str) and value.strip():
            return value
    return None


class LLMClient:
    """An `AsyncOpenAI` client with the endpoint's concurrency limit, retries and token accounting."""

    def __init__(self, endpoint: EndpointConfig, api_key: str | None = None):
        """`api_key` overrides the environment variable the endpoint names (a caller that was handed the key)."""
        from openai import AsyncOpenAI

        self.endpoint = endpoint
        # Local servers ignore the key but the client insists on one; a hosted API without one answers 401, which
        # is not retried and says so.
        api_key = api_key or os.environ.get(endpoint.api_key_env) or "EMPTY"
        register_secret(api_key)  # before any request: a server may echo the key in its first error
        self._client = AsyncOpenAI(base_url=endpoint.base_url, api_key=api_key, max_retries=endpoint.max_retries,
                                   timeout=endpoint.timeout)
        self._limit = asyncio.Semaphore(endpoint.concurrency)
        self.prompt_tokens = self.completion_tokens = self.requests = self.failures = 0

    async def __aenter__(self) -> LLMClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self._client.close()

    async def chat(self, messages: list[dict], **params) -> ChatResult:
        body = {"model": self.endpoint.model, "messages": messages, "temperature": self.endpoint.temperature,
                "max_tokens": self.endpoint.max_tokens, **({"top_p": self.endpoint.top_p} if self.endpoint.top_p
                                                             else {}), **params}
        if self.endpoint.extra_body:
            body["extra_body"] = {**self.endpoint.extra_body, **body.get("extra_body", {})}
        deadline = self.endpoint.request_deadline()
        async with self._limit:
            t0 = time.monotonic()
            try:
                async with asyncio.timeout(deadline):
                    response = await self._client.chat.completions.create(**body)
                result = read_reply(response)
            except Exception as exc:  # after the client's own retries: record it, never stop the run
                self.failures += 1
                return ChatResult(error=_describe(exc, deadline), seconds=time.monotonic() - t0)
        self.requests += 1
        result.seconds = time.monotonic() - t0
        self.prompt_tokens += result.prompt_tokens
        self.completion_tokens += result.completion_tokens
        return result

    async def stream(self, requests: Iterable[ChatRequest]) -> AsyncIterator[tuple[ChatRequest, ChatResult]]:
        """Results in the order they finish, with `concurrency` requests in flight: the iterator is drawn lazily,
        so half a million requests are never all held as tasks."""
        iterator = iter(requests)
        pending: dict[asyncio.Task, ChatRequest] = {}

        def top_up() -> None:
            while len(pending) < self.endpoint.concurrency:
                request = next(iterator, None)
                if request is None:
                    return
                pending[asyncio.ensure_future(self.chat(request.messages, **request.params))] = request

        top_up()
        try:
            while pending:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    yield pending.pop(task), task.result()
                top_up()
        finally:
            for task in pending:  # a caller that stops early (or is cancelled) leaves nothing running
                task.cancel()

    async def map(self, requests: Iterable[ChatRequest], on_result: Callable[[ChatRequest, ChatResult], None]) -> None:
        async for request, result in self.stream(requests):
            on_result(request, result)

    def cost(self) -> float | None:
        return self.endpoint.cost(self.prompt_tokens, self.completion_tokens)


# Reply text is data (a teacher's chain of thought): only a key long enough not to be a word is masked in it.
_KEPT_SECRET_MIN = 12


class BadReply(ValueError):
    """A reply that is not a chat completion with at least one choice and text content."""


def read_reply(response: Any) -> ChatResult:
    """The first choice of a chat completion, checked: a server's reply is untrusted input.  The openai client
    returns an HTML page as a str and builds models without validating them, so nothing here is assumed."""
    choices = getattr(response, "choices", None)
    if not isinstance(choices, list):
        raise BadReply(f"not a chat completion: {_excerpt(response)}")
    if not choices:
        raise BadReply("a chat completion with no choices")
    message = getattr(choices[0], "message", None)
    content = getattr(message, "content", None)
    reasoning = _reasoning_of(message) if message is not None else None
    # a reasoning model cut off while thinking has no content yet but a reasoning text: a reply, to be judged later
    if not isinstance(content, str) and reasoning is None:
        raise BadReply(f"the first choice has no text content (content: {_excerpt(content)})")
    finish = getattr(choices[0], "finish_reason", None)
    usage = getattr(response, "usage", None)
    return ChatResult(text=scrub(content, _KEPT_SECRET_MIN) if isinstance(content, str) else "",
                      reasoning=scrub(reasoning, _KEPT_SECRET_MIN) if reasoning is not None else None,
                      finish_reason=redact(finish)[:40] if isinstance(finish, str) else None,
                      prompt_tokens=_count(getattr(usage, "prompt_tokens", 0)),
                      completion_tokens=_count(getattr(usage, "completion_tokens", 0)))


def _count(value: Any) -> int:
    """A token count from the server, or 0: a string or a negative number must not break the totals."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _excerpt(value: Any, limit: int = 80) -> str:
    """The start of a bad reply, on one line, redacted before it is cut (a cut key would no longer match)."""
    text = value if isinstance(value, str) else f"{type(value).__name__} {value!r}"
    return repr(redact(" ".join(text.split()))[:limit])


def _describe(exc: Exception, deadline: float) -> str:
    """One line naming the failure, with the HTTP status where there was one, redacted (a server may echo the key in
    its error body; headers are never included)."""
    if isinstance(exc, TimeoutError):  # only the deadline raises the builtin: the client's own is APITimeoutError
        return f"DeadlineExceeded: no complete reply within {deadline:g} s (every attempt together)"
    if isinstance(exc, json.JSONDecodeError):
        return f"BadReply: the body is not JSON ({exc.msg} at char {exc.pos})"
    status = getattr(exc, "status_code", None)
    lines = redact(str(getattr(exc, "message", None) or exc)).splitlines()  # redacted whole, then cut
    message = lines[0][:300] if lines else ""
    return f"{type(exc).__name__}{f' {status}' if status else ''}: {message}"


def run(coro):
    """Run a coroutine from synchronous code (the CLI, a Ray task), also where a loop is already running."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()
