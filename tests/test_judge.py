"""The LLM judge on the shared OpenAI-compatible client: correctness verdicts with rationales, the ten-criteria
reasoning rubric, the disk cache, retries through injected faults, and a real `transformers serve` endpoint."""

from __future__ import annotations

import json
import urllib.request

import pytest

from patho_r1.eval.judge import RUBRIC, JudgeError, LLMJudge
from patho_r1.fixtures.teacher import serve

ITEMS = [("What is shown?", "adenocarcinoma", "An invasive adenocarcinoma of the colon."),
         ("What is shown?", "adipose tissue", "Benign fibrous stroma."),
         ("Which stain?", "Ki-67", "ki-67, in most nuclei"),
         ("Diagnosis?", "coagulative necrosis", "necrosis")]


def _requests(server) -> int:
    with urllib.request.urlopen(server.url.removesuffix("/v1") + "/stats") as r:
        return json.loads(r.read())["requests"]


@pytest.fixture
def judge_server():
    server = serve(faults={"429": 0.25, "500": 0.25, "drop": 0.25})
    yield server
    server.stop()


def test_verdicts_with_rationales_through_faults_then_from_the_cache(judge_server, tmp_path):
    judge = LLMJudge(base_url=judge_server.url, model="judge", cache=str(tmp_path / "judge_cache.jsonl"),
                     max_retries=4, timeout=5)
    verdicts = judge.verdicts(ITEMS)
    assert [v.correct for v in verdicts] == [True, False, True, False]  # "necrosis" is not the full reference
    assert all(v.rationale for v in verdicts) and judge.prompt_tokens > 0 and judge.completion_tokens > 0
    sent = _requests(judge_server)
    assert sent > len(ITEMS)  # faults were served and retried
    again = LLMJudge(base_url=judge_server.url, model="judge", cache=str(tmp_path / "judge_cache.jsonl"))
    assert [v.correct for v in again.verdicts(ITEMS)] == [True, False, True, False]
    assert _requests(judge_server) == sent and again.cache_hits == len(ITEMS)  # a re-run costs nothing
    other = LLMJudge(base_url=judge_server.url, model="another-judge", cache=str(tmp_path / "judge_cache.jsonl"))
    other.verdicts(ITEMS[:1])
    assert _requests(judge_server) > sent  # the cache is keyed by the judge model too


def test_rubric_scores_ten_criteria_and_reports_means_and_total(tmp_path):
    server = serve()
    try:
        judge = LLMJudge(base_url=server.url, model="judge")
        report = judge.rubric([
            ("What is shown?", "adenocarcinoma", "Irregular glands with crowded nuclei: adenocarcinoma.", "A"),
            ("What is shown?", "adipose tissue", "Pink collagen fibres, so stroma.", "B")])
    finally:
        server.stop()
    assert len(RUBRIC) == 10 and report["scored"] == 2 and report["unparsed"] == 0
    assert report["per_item"][0] == dict.fromkeys(RUBRIC, 8) and report["per_item"][1] == dict.fromkeys(RUBRIC, 3)
    assert report["mean_per_criterion"] == dict.fromkeys(RUBRIC, 5.5) and report["total"] == 55.0


def test_judge_against_transformers_serve_refuses_to_guess(hf_server):
    url, model = hf_server
    judge = LLMJudge(base_url=url, model=model, timeout=60)
    with pytest.raises(JudgeError, match="2 replies were not yes or no"):  # random tokens are not a verdict
        judge.verdicts(ITEMS[:2])
    with pytest.raises(JudgeError, match="1 replies were not the JSON scores"):
        judge.rubric([("q", "a", "r", "p")])
    judge.max_unscored = 1.0  # allowed: the item is unscored, never a 0
    report = judge.rubric([("q", "a", "r", "p")])
    assert report["unparsed"] == 1 and report["per_item"] == [None] and report["total"] is None
    assert judge.completion_tokens > 0


def test_an_unreachable_judge_is_a_connection_error_naming_it():
    judge = LLMJudge(base_url="http://127.0.0.1:9/v1", model="m", max_retries=0, timeout=2, api_key="sk-hidden-77")
    with pytest.raises(ConnectionError, match="127.0.0.1:9") as info:
        judge.is_correct("q", "a", "b")
    assert "sk-hidden-77" not in str(info.value) and "sk-hidden" not in repr(judge)
