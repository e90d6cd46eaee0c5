"""One client for OpenAI-compatible chat endpoints (a vLLM or SGLang server, `transformers serve`, a hosted API),
shared by the data engine's teacher and the evaluation judge.

    endpoint = EndpointConfig(base_url="http://127.0.0.1:8000/v1", model="deepseek-r1", concurrency=32)
    async with LLMClient(endpoint) as client:
        result = await client.chat([{"role": "user", "content": "..."}])
        await client.map(requests, on_result)   # many requests, `concurrency` in flight, results as they finish

Retries are the `openai` package's own: exponential backoff with jitter on 408/409/429/5xx, timeouts and dropped
connections, honouring `Retry-After`.  A request that still fails comes back as a `ChatResult` with `error` set, so
one bad prompt never stops a 500k-request run; the caller records it and a re-run asks again.

The API key is read from the environment variable the config names, handed to the client and nowhere else: it is
not a field of any config, so it never reaches a manifest, a repr, a log line or a config hash.
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field

from patho_r1.config import StrictModel


class EndpointConfig(StrictModel):
    base_url: str = Field(..., description="the endpoint's /v1 URL")
    model: str
    api_key_env: str = Field("OPENAI_API_KEY", description="the environment variable holding the API key (the key "
                             "itself never goes in a config)")
    concurrency: int = Field(8, ge=1, le=1024, description="requests in flight at once")
    max_retries: int = Field(6, ge=0, le=20, description="retries per request on 429, 5xx, timeouts and dropped "
                             "connections (exponential backoff with jitter)")
    timeout: float = Field(600.0, gt=0, description="seconds per request attempt")
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
        t0 = time.monotonic()
        async with self._limit:
            try:
                response = await self._client.chat.completions.create(**body)
            except Exception as exc:  # after the client's own retries: record it, never stop the run
                self.failures += 1
                return ChatResult(error=_describe(exc), seconds=time.monotonic() - t0)
        self.requests += 1
        choice = response.choices[0]
        usage = response.usage
        result = ChatResult(text=choice.message.content or "", reasoning=_reasoning_of(choice.message),
                            finish_reason=choice.finish_reason, seconds=time.monotonic() - t0,
                            prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
                            completion_tokens=getattr(usage, "completion_tokens", 0) or 0)
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


def _describe(exc: Exception) -> str:
    """One line naming the failure, with the HTTP status where there was one (never headers: they hold the key)."""
    status = getattr(exc, "status_code", None)
    message = str(getattr(exc, "message", None) or exc).splitlines()[0][:300] if str(exc) else ""
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
