"""The shared OpenAI-compatible client, the teacher (`curate generate`) and the judge (`eval rubric`, verdicts)
against a hostile server: a real HTTP server whose replies are scripted per prompt (HTML with a 200, `choices: []`,
`content: null`, a body that is not JSON, a connection held open, a body that trickles, a 401 that echoes the key,
a judge that answers in prose).  Each row's fault is named in its prompt (`fault:NAME`), so it holds on every retry
and whatever the order of requests."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from patho_r1.curate.config import GenerateStage, ImportStage
from patho_r1.curate.pipeline import run_stage
from patho_r1.curate.store import iter_jsonl
from patho_r1.eval.judge import RUBRIC, LLMJudge

PATHO = str(Path(sys.executable).parent / "patho-r1")
# Not key-shaped (no `sk-`, one case, low entropy): only the registered key itself can mask it.
PLANTED = "patho-canary-hunter2-0d1e"


class FaultServer:
    """An OpenAI-compatible chat endpoint that answers each request as its prompt's `fault:NAME` says, else
    `default`.  `stop()` also ends held and trickling replies."""

    def __init__(self, default: str = "ok"):
        self.default, self.counts, self._stop = default, Counter(), threading.Event()
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/v1"

    def stop(self) -> None:
        self._stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def _completion(content: str | None, choices: bool = True) -> bytes:
    choice = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
    return json.dumps({"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "scripted",
                       "choices": [choice] if choices else [],
                       "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}).encode()


def _good_reply(prompt: str) -> str:
    if "Reply with one JSON object" in prompt:  # the rubric
        return json.dumps(dict.fromkeys(RUBRIC, 7))
    if "Reply with yes or no" in prompt:  # a verdict
        return "yes\nthe candidate names the same lesion"
    return "<question>What is seen?</question>\n<think>Crowded glands.</think>\n<answer>adenoma</answer>"


def _handler(server: FaultServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _reply(self, code: int, body: bytes, content_type: str = "application/json") -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):  # http.server's naming
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
            prompt = json.dumps(body.get("messages"))
            found = re.search(r"fault:(\w+)", prompt)
            fault = found.group(1) if found else server.default
            with server._lock:
                server.counts[fault] += 1
            key = self.headers.get("Authorization", "").removeprefix("Bearer ")
            if fault == "ok":
                self._reply(200, _completion(_good_reply(prompt)))
            elif fault == "prose":
                self._reply(200, _completion("The reasoning is careful and mostly right, though it could say more."))
            elif fault == "html":
                self._reply(200, b"<html><body><h1>502 Bad Gateway</h1><hr>nginx</body></html>", "text/html")
            elif fault == "empty":
                self._reply(200, _completion("unused", choices=False))
            elif fault == "null":
                self._reply(200, _completion(None))
            elif fault == "notjson":
                self._reply(200, b"{'choices': [oops")
            elif fault == "echo200":  # a reply that quotes the key it was sent
                self._reply(200, _completion(f"<think>You sent {key}.</think><answer>adenoma</answer>"))
            elif fault == "echo401":  # as a misconfigured proxy does: the key in the body, quoted and bare
                self._reply(401, json.dumps({"error": {
                    "message": f"Incorrect API key provided: {key}. Sent: Authorization: Bearer {key}",
                    "type": "invalid_request_error", "code": "invalid_api_key"}}).encode())
            elif fault == "hold":  # read the request, never answer
                server._stop.wait(30)
            elif fault == "trickle":  # a valid reply, one byte every 0.1 s: no single read ever times out
                data = _completion(_good_reply(prompt))
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    for i in range(len(data)):
                        if server._stop.wait(0.1):
                            return
                        self.wfile.write(data[i:i + 1])
                        self.wfile.flush()
                except OSError:  # the client gave up and closed the socket
                    return

    return Handler


@pytest.fixture
def fault_server():
    servers: list[FaultServer] = []

    def start(default: str = "ok") -> FaultServer:
        servers.append(FaultServer(default))
        return servers[-1]

    yield start
    for s in servers:
        s.stop()


def captions(tmp_path: Path, faults: list[str]) -> Path:
    """An import folder of one caption row per fault, in this order (`ok`: a row the server answers)."""
    from PIL import Image

    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    rows = []
    for i, fault in enumerate(faults):
        Image.new("RGB", (8, 8), (i * 20 % 256, 80, 120)).save(src / "images" / f"img{i}.png")
        rows.append({"image": f"img{i}.png", "caption": f"Case {i}: crowded glands, fault:{fault}, consistent "
                     "with tubular adenoma."})
    (src / "pmc_oa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "import"
    run_stage(ImportStage(sources=[{"format": "pmc-oa", "path": str(src), "license": "CC-BY"}]), None, out)
    return out


def _failures(out: Path) -> dict[str, str]:
    """record id's fault -> the one-line error recorded for it."""
    return {re.search(r"img(\d+)", r["record_id"]).group(1): r["error"] for r in iter_jsonl(out / "failures.jsonl")}


def _no_key_anywhere(out: Path, *texts: str) -> None:
    for path in out.rglob("*"):
        if path.is_file():
            assert PLANTED.encode() not in path.read_bytes(), path
    for text in texts:
        assert PLANTED not in text


# ----------------------------------------------------------------------------------------------------------------------
# The redaction filter
# ----------------------------------------------------------------------------------------------------------------------

def test_redaction_masks_the_registered_key_and_anything_key_shaped_but_not_honest_text():
    from patho_r1.redact import redact, register_secret, scrub

    register_secret(PLANTED)
    leaks = {f"echo: {PLANTED}!": PLANTED, json.dumps({"k": f'"{PLANTED}"'}): PLANTED,
             "Incorrect API key provided: sk-proj-AbCdEf123456": "AbCdEf123456",
             "Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.e30.x": "eyJhbGciOiJIUzI1NiJ9",
             '{"api_key": "zz-9f8e7d6c5b4a"}': "9f8e7d6c5b4a", "x-api-key=abcdef0123": "abcdef0123",
             "token hf_AbCdEfGhIjKlMnOpQrStUvWxYz012345 rejected": "hf_AbCdEf"}
    for text, secret in leaks.items():
        assert secret not in redact(text) and "[REDACTED]" in redact(text), text
    honest = ["Error code: 500 - internal error at /data/Quilt1M/images/img_00042.png",
              "model Qwen2-VL-72B-Instruct-GPTQ-Int4 at http://127.0.0.1:8000/v1",
              "cache key 3f9a0c2b7d4e1f6a8b5c9d0e2f4a6b8c1d3e5f7a9b0c2d4e6f8a1b3c5d7e9f0a2b",
              "max_tokens: 4096, completion_tokens: 12"]
    for text in honest:
        assert redact(text) == text
    assert scrub(f"a reply quoting {PLANTED}") == "a reply quoting [REDACTED]"


# ----------------------------------------------------------------------------------------------------------------------
# The teacher
# ----------------------------------------------------------------------------------------------------------------------

def test_teacher_401_that_echoes_the_key_leaks_it_nowhere(tmp_path, fault_server):
    """Before: the key was in failures.jsonl and on the console ("last error: ... Incorrect API key provided: KEY"),
    and a reply quoting it went into generations.jsonl as is."""
    parent = captions(tmp_path, ["echo401", "echo401", "echo200"])
    server = fault_server()
    out = tmp_path / "gen"
    env = {**os.environ, "OPENAI_API_KEY": PLANTED}
    done = subprocess.run([PATHO, "--verbose", "curate", "generate", str(parent), "--base-url", server.url, "--model",
                           "m", "--tasks", "reasoning", "--out", str(out)], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr  # failures recorded, the run finished
    errors = [r["error"] for r in iter_jsonl(out / "failures.jsonl")]
    assert server.counts["echo401"] == 2 and len(errors) == 2
    assert all(e.startswith("AuthenticationError 401") and "[REDACTED]" in e for e in errors)  # echoed, masked
    [reply] = list(iter_jsonl(out / "generations.jsonl"))
    assert reply["reasoning"] is None and "You sent [REDACTED]." in reply["response"]
    assert "last error: AuthenticationError 401" in done.stdout and "Traceback" not in done.stderr
    _no_key_anywhere(out, done.stdout, done.stderr)  # --verbose: the client's debug log is in stderr too


def test_malformed_replies_are_each_rows_failure_and_the_run_goes_on(tmp_path, fault_server):
    """Before: the HTML reply raised AttributeError ('str' object has no attribute 'choices') and stopped the run."""
    parent = captions(tmp_path, ["html", "ok", "empty", "null", "notjson", "ok"])
    server = fault_server()
    stage = GenerateStage(endpoint={"base_url": server.url, "model": "m", "max_retries": 0, "timeout": 5},
                          tasks=["reasoning"])
    manifest = run_stage(stage, parent, tmp_path / "gen")
    assert manifest.counts["answered"] == 2 and manifest.counts["failed"] == 4 and not manifest.complete
    failures = _failures(tmp_path / "gen")
    assert "not a chat completion" in failures["0"] and "502 Bad Gateway" in failures["0"]
    assert "no choices" in failures["2"] and "no text content" in failures["3"] and "not JSON" in failures["4"]
    assert all("\n" not in e and e.startswith("BadReply") for e in failures.values())
    assert len(list(iter_jsonl(tmp_path / "gen/generations.jsonl"))) == 2


def test_held_connection_and_trickling_reply_fail_their_rows_within_the_deadline(tmp_path, fault_server, capsys):
    """`--timeout` bounds each wait, `--deadline` the whole request.  Before: neither flag existed, the client
    waited 600 s per attempt, and a body that trickles never trips a per-read timeout at all."""
    from patho_r1.launch.cli import main

    parent = captions(tmp_path, ["hold", "trickle", "ok"])
    server = fault_server()
    out = tmp_path / "gen"
    t0 = time.monotonic()
    code = main(["curate", "generate", str(parent), "--base-url", server.url, "--model", "m", "--tasks", "reasoning",
                 "--timeout", "0.5", "--max-retries", "1", "--deadline", "2", "--out", str(out)])
    seconds = time.monotonic() - t0
    assert code == 1 and seconds < 6, seconds
    failures = _failures(out)
    assert set(failures) == {"0", "1"} and len(list(iter_jsonl(out / "generations.jsonl"))) == 1
    assert failures["0"].startswith(("APITimeoutError", "DeadlineExceeded")) and server.counts["hold"] >= 1
    assert failures["1"] == "DeadlineExceeded: no complete reply within 2 s (every attempt together)"
    assert "2 requests failed after every retry" in capsys.readouterr().out


def test_teacher_help_names_the_timeouts_and_their_defaults(capsys):
    from patho_r1.launch.cli import main

    with pytest.raises(SystemExit):
        main(["curate", "generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--timeout" in text and "(default 300, for a local model server)" in text
    assert "--max-retries" in text and "(default 2)" in text and "--deadline" in text


# ----------------------------------------------------------------------------------------------------------------------
# The judge
# ----------------------------------------------------------------------------------------------------------------------

def _predictions(tmp_path: Path, faults: list[str]) -> Path:
    path = tmp_path / "predictions.jsonl"
    rows = [{"question": f"What is shown in case {i}?", "answer": "adenoma",
             "response": f"<think>crowded glands, fault:{f}</think><answer>adenoma</answer>"}
            for i, f in enumerate(faults)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_judge_401_that_echoes_the_key_is_one_line_without_the_key(tmp_path, fault_server):
    """Before: a ConnectionError traceback whose message carried the server's body, key included."""
    server = fault_server()
    predictions = _predictions(tmp_path, ["echo401", "echo401"])
    env = {**os.environ, "OPENAI_API_KEY": PLANTED}
    done = subprocess.run([PATHO, "--verbose", "eval", "rubric", "--predictions", str(predictions), "--judge-url",
                           server.url, "--judge-model", "judge", "--cache", str(tmp_path / "cache.jsonl"), "--out",
                           str(tmp_path / "rubric.json")], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2 and server.counts["echo401"] == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "2 of 2 items unscored" in errors[0] and "401" in errors[0], done.stderr
    assert "[REDACTED]" in errors[0] and "Traceback" not in done.stderr
    assert not (tmp_path / "rubric.json").exists()
    _no_key_anywhere(tmp_path, done.stdout, done.stderr)


def test_judge_malformed_replies_are_unscored_not_zero_and_most_failing_is_an_error(tmp_path, fault_server, caplog):
    """Before: the HTML reply raised AttributeError, `choices: []` IndexError; no item was recorded."""
    server = fault_server()
    items = [("What is shown?", "adenoma", f"adenoma, fault:{f}") for f in ["ok"] * 9 + ["html"]]
    judge = LLMJudge(base_url=server.url, model="judge", max_retries=0, timeout=5)
    verdicts = judge.verdicts(items)  # 1 of 10 unscored: within the 10% allowed, and said
    assert [v.correct for v in verdicts] == [True] * 9 + [None]
    assert "1 of 10 verdicts unscored" in caplog.text and "not a chat completion" in caplog.text
    from patho_r1.eval.judge import JudgeError

    bad = [("q", "a", f"p{i}, fault:{f}") for i, f in enumerate(["html", "empty", "null", "notjson", "ok"])]
    with pytest.raises(JudgeError, match=r"4 of 5 verdicts unscored: 4 requests failed after retries") as info:
        judge.verdicts(bad)
    assert "\n" not in str(info.value) and server.url in str(info.value)


def test_judge_held_or_trickling_reply_ends_within_the_deadline(fault_server):
    from patho_r1.eval.judge import JudgeError

    server = fault_server()
    judge = LLMJudge(base_url=server.url, model="judge", timeout=0.5, max_retries=0, deadline=1.5)
    t0 = time.monotonic()
    with pytest.raises(JudgeError, match="DeadlineExceeded"):
        judge.verdicts([("q", "a", "p, fault:trickle")])
    with pytest.raises(JudgeError, match="APITimeoutError"):  # a held connection: the per-read timeout, once
        judge.verdicts([("q", "a", "p, fault:hold")])
    assert time.monotonic() - t0 < 5


def test_judge_in_prose_fails_the_rubric_in_one_line_and_a_few_unparsed_are_left_out(tmp_path, fault_server,
                                                                                      capsys):
    """Before: a judge that answered in prose gave "0/3 scored, total None" and exit 0.  VLMEvalKit scores such an
    item as wrong; here it is unscored (never a 0 in the means), counted, and above --max-unscored an error."""
    from patho_r1.launch.cli import main

    server = fault_server()
    out = tmp_path / "rubric.json"
    args = ["eval", "rubric", "--judge-url", server.url, "--judge-model", "judge", "--out", str(out)]
    assert main([*args, "--predictions", str(_predictions(tmp_path, ["prose"] * 3))]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "3 of 3 items unscored: 3 replies were not the JSON scores asked for" in err
    assert not out.exists()

    mixed = _predictions(tmp_path, ["ok", "ok", "ok", "prose"])
    assert main([*args, "--predictions", str(mixed), "--max-unscored", "0.25"]) == 0
    assert "3/4 scored (0 failed, 1 unparsed: left out), total 70.0 / 100" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["unscored"] == [{"item": 3, "reason": "reply not parsed"}] and report["per_item"][3] is None
    assert report["mean_per_criterion"] == dict.fromkeys(RUBRIC, 7.0)  # the prose item is not a 0 in the mean
