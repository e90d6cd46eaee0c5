"""One redaction filter for every message that leaves an LLM client: error lines in `failures.jsonl`, the console,
log records, exception messages.

    register_secret(api_key)   # the client does this with the key it sends
    redact(text)               # that key (and its JSON- and URL-escaped forms) and anything that looks like a key
    scrub(text, 12)            # the registered keys only (12+ characters): exact, for reply text kept as data

What looks like a key: `sk-...` (OpenAI, Anthropic, many proxies), the credentials after `Bearer` or `Basic`, the
value after a name like `api_key`, `authorization`, `x-api-key`, `token`, `secret` or `password`, and a long
random-looking token (24+ letters, digits or underscores, with both cases and a digit, over 3.5 bits of entropy a
character).  A hostile or misconfigured server can echo the key in an error body; this runs before that body is
printed, logged or written.  Hex digests, paths, model names and ordinary words pass unchanged.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import urllib.parse
from collections import Counter

MASK = "[REDACTED]"

# values a caller sends when there is no key (local servers ignore it): masking them would only garble messages
_PLACEHOLDERS = {"", "empty", "none", "null", "unused", "dummy", "no-key", "nokey", "sk-no-key-required"}

_SECRETS: set[str] = set()
_LOCK = threading.Lock()

_RULES: list[tuple[re.Pattern, str]] = [
    (re.compile(r"\bsk-[A-Za-z0-9_\-]{6,}"), f"sk-{MASK}"),
    (re.compile(r"\b([Bb]earer)(\s+)[A-Za-z0-9._~+/=\-]{6,}"), rf"\1\2{MASK}"),
    # `Basic` is also an English word: only when what follows reads as base64 (a digit or padding in it)
    (re.compile(r"\b(Basic)(\s+)(?=[A-Za-z+/]*[0-9=])[A-Za-z0-9+/]{8,}={0,2}"), rf"\1\2{MASK}"),
    # the value of anything named like a credential, quoted or not: `"api_key": "..."`, `Authorization: ...`
    (re.compile(r"""((?<![A-Za-z])(?:x-)?(?:api[_-]?key|authorization|access[_-]?token|auth[_-]?token|token|secret|"""
                r"""password)["']?\s*[:=]\s*["']?)(?!\[REDACTED\]|(?:Bearer|Basic|Token)\s)([^\s"',;}&]{6,})""",
                re.IGNORECASE), rf"\1{MASK}"),
]
_LONG_TOKEN = re.compile(r"(?<![A-Za-z0-9_])[A-Za-z0-9_]{24,}(?![A-Za-z0-9_])")


def register_secret(secret: str | None) -> None:
    """Mask `secret` from now on, in this process (every client, every log record)."""
    if secret is None or secret.strip().lower() in _PLACEHOLDERS or len(secret) < 4:  # shorter: garbles, hides nothing
        return
    forms = {secret, json.dumps(secret)[1:-1], urllib.parse.quote(secret, safe=""), repr(secret)[1:-1]}
    with _LOCK:
        _SECRETS.update(f for f in forms if f)
    install_log_redaction()


def scrub(text: str, min_length: int = 0) -> str:
    """`text` without the registered secrets (an exact match; no pattern that could change honest text).
    `min_length`: leave shorter secrets, for text kept as data, where a short key (vLLM's `token-abc123`) could
    match honest words."""
    for secret in _sorted_secrets():
        if len(secret) >= min_length and secret in text:
            text = text.replace(secret, MASK)
    return text


def redact(text: str) -> str:
    """`text` without the registered secrets or anything that looks like a key."""
    text = scrub(text)
    for pattern, replacement in _RULES:
        text = pattern.sub(replacement, text)
    return _LONG_TOKEN.sub(_mask_if_random, text)


def _sorted_secrets() -> list[str]:
    with _LOCK:
        return sorted(_SECRETS, key=len, reverse=True)  # a longer form first: a key inside its quoted form


def _mask_if_random(match: re.Match) -> str:
    """A long token that reads as random (mixed case and digits, high entropy), not a word, a path or a hex hash."""
    token = match.group(0)
    classes = (any(c.islower() for c in token), any(c.isupper() for c in token), any(c.isdigit() for c in token))
    if not all(classes):
        return token
    counts = Counter(token)
    entropy = -sum(n / len(token) * math.log2(n / len(token)) for n in counts.values())
    return MASK if entropy > 3.5 else token


# -- logs -------------------------------------------------------------------------------------------------------------
_installed = False


def install_log_redaction() -> None:
    """Redact every log record this process makes from now on, whichever logger or handler it goes to (a run's log
    files, the console).  A record factory, not a handler filter: handlers added later are covered too."""
    global _installed
    with _LOCK:
        if _installed:
            return
        _installed = True
        previous = logging.getLogRecordFactory()

    def factory(*args, **kwargs) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is logging's own problem to report
            return record
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:  # formatters reuse exc_text when it is set
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return record

    logging.setLogRecordFactory(factory)
