"""Rewards: hand-written completions with hand-computed values, the registry, isolation of failures, timeouts."""

import json
import math
import sys
import time
from importlib.metadata import EntryPoint

import pytest
from trl.rewards import get_soft_overlong_punishment

from patho_r1.rewards import (
    AccuracyReward,
    SafeReward,
    SoftOverlongReward,
    VerifierPool,
    accuracy_reward,
    build_rewards,
    extract_final_answer,
    format_reward,
    infer_answer_type,
    register_reward,
    soft_overlong_penalty,
    split_thinking,
)
from patho_r1.rewards.registry import REGISTRY, RewardFailure, RewardRegistry, weighted_total

LONG = "dense nuclei " * 5000

# (completion, expected format reward)
FORMAT_CASES = [
    ("<think>dense nuclei</think><answer>B</answer>", 1.0),
    ("<think>dense nuclei</think>\n<answer>B</answer>", 1.0),
    ("  \n<think>x</think>  <answer>B</answer>\n\n", 1.0),
    ("<think></think><answer></answer>", 1.0),  # well formed; accuracy judges the empty answer
    ("<think>a\nmulti\nline</think><answer>Plasma cells</answer>", 1.0),
    ("<think>ядра плотные 核 🔬</think><answer>B</answer>", 1.0),  # unicode inside the tags is fine
    (f"<think>{LONG}</think><answer>B</answer>", 1.0),  # very long reasoning
    ("<answer>B</answer><think>x</think>", 0.0),  # answer before think
    ("<think>x</think>", 0.0),  # no answer
    ("<answer>B</answer>", 0.0),  # no think
    ("B", 0.0),
    ("", 0.0),
    ("<think>x</think><answer>B</answer> extra", 0.0),  # text after
    ("Sure! <think>x</think><answer>B</answer>", 0.0),  # text before
    ("<think>x</think> so <answer>B</answer>", 0.0),  # text between
    ("<think>x</think><answer>B</answer><answer>C</answer>", 0.0),  # answer twice
    ("<think>x</think><think>y</think><answer>B</answer>", 0.0),  # think twice
    ("<think>x<think>y</think></think><answer>B</answer>", 0.0),  # nested think
    ("<think>x</think><answer><answer>B</answer></answer>", 0.0),  # nested answer
    ("<think>x<answer>B</answer></think>", 0.0),  # answer inside think
    ("<think>x</think><answer>B", 0.0),  # unclosed answer
    ("<think>x<answer>B</answer>", 0.0),  # unclosed think
    ("<THINK>x</THINK><ANSWER>B</ANSWER>", 0.0),  # tags are case-sensitive
    ("<think>x</think>\u00a0<answer>B</answer>", 1.0),  # NBSP is whitespace
    ("<think>x</think>…<answer>B</answer>", 0.0),  # ellipsis is not whitespace
    ("</think><think>x<answer>B</answer>", 0.0),
    (f"<think>x</think><answer>B</answer>{LONG}", 0.0),
]

# (completion, gold, expected strict accuracy, expected lenient accuracy)
MCQ_CASES = [
    ("<think>x</think><answer>B</answer>", "B", 1.0, 1.0),
    ("<think>x</think><answer> B </answer>", "B", 1.0, 1.0),  # whitespace stripped
    ("<think>x</think><answer>\nB\n</answer>", "B", 1.0, 1.0),
    ("<think>x</think><answer>C</answer>", "B", 0.0, 0.0),
    ("<think>x</think><answer>b</answer>", "B", 0.0, 0.0),  # lowercase letter: not a valid option, either mode
    ("<think>x</think><answer>G</answer>", "B", 0.0, 0.0),  # G is not an option letter
    ("<think>x</think><answer>B.</answer>", "B", 0.0, 1.0),
    ("<think>x</think><answer>(B)</answer>", "B", 0.0, 1.0),
    ("<think>x</think><answer>B)</answer>", "B", 0.0, 1.0),
    ("<think>x</think><answer>B. Plasma cells</answer>", "B", 0.0, 1.0),
    ("<think>x</think><answer>Option B</answer>", "B", 0.0, 1.0),
    ("<think>x</think><answer>a plasma cell</answer>", "A", 0.0, 0.0),  # article, not option A
    ("<think>x</think><answer>BC</answer>", "B", 0.0, 0.0),
    ("<think>x</think><answer>B C</answer>", "B", 0.0, 1.0),  # lenient reads the first letter token
    ("<think>x</think><answer>Be careful</answer>", "B", 0.0, 0.0),
    ("<think>x</think><answer></answer>", "B", 0.0, 0.0),  # empty answer
    ("<think>B</think>", "B", 0.0, 0.0),  # no answer tag: the letter in the reasoning does not count
    ("B", "B", 0.0, 0.0),  # bare text without tags
    ("<think>x</think><answer>A</answer><answer>B</answer>", "B", 1.0, 1.0),  # last answer block is the answer
    ("<think>x</think><answer>Ｂ</answer>", "B", 0.0, 0.0),  # full-width letter
    ("<think>x</think><answer>F</answer>", "F", 1.0, 1.0),
    ("<think>x</think><answer>B</answer>", " B ", 1.0, 1.0),  # gold with stray whitespace
]

# (completion, gold, answer_type or None, expected)
OTHER_CASES = [
    ("<think>x</think><answer>Yes</answer>", "yes", None, 1.0),
    ("<think>x</think><answer>yes.</answer>", "Yes", None, 1.0),
    ("<think>x</think><answer>No</answer>", "Yes", None, 0.0),
    ("<think>x</think><answer>maybe</answer>", "No", None, 0.0),
    ("<think>x</think><answer>0.5</answer>", "1/2", None, 1.0),
    ("<think>x</think><answer>\\frac{1}{2}</answer>", "0.5", None, 1.0),
    ("<think>x</think><answer>$\\frac{1}{2}$</answer>", "0.5", "numeric", 1.0),
    ("<think>x</think><answer>0.25</answer>", "1/2", None, 0.0),
    ("<think>x</think><answer>$(x+1)^2$</answer>", "$x^2+2x+1$", "expression", 1.0),
    ("<think>x</think><answer>$x^2+1$</answer>", "$x^2+2x+1$", "expression", 0.0),
    ("<think>x</think><answer>12</answer>", "12", None, 1.0),
    ("<think>x</think><answer>twelve</answer>", "12", None, 0.0),
    ("<think>x</think><answer></answer>", "12", None, 0.0),
    ("no tags 12", "12", None, 0.0),
    ("<think>x</think><answer>Mucinous pools</answer>", "mucinous pools.", "open", 1.0),
    ("<think>x</think><answer>G</answer>", "G", "mcq", 0.0),  # G is never a valid option, even if it is the gold
]


def test_case_table_has_at_least_forty_completions():
    assert len(FORMAT_CASES) + len(MCQ_CASES) + len(OTHER_CASES) >= 40


@pytest.mark.parametrize("completion,expected", FORMAT_CASES)
def test_format_reward(completion, expected):
    assert format_reward(prompts=None, completions=[completion]) == [expected]
    conversational = [[{"role": "assistant", "content": completion}]]
    assert format_reward(prompts=None, completions=conversational) == [expected]


@pytest.mark.parametrize("completion,gold,strict,lenient", MCQ_CASES)
def test_mcq_accuracy(completion, gold, strict, lenient):
    assert AccuracyReward(math_workers=0)(completions=[completion], answer=[gold]) == [strict]
    assert AccuracyReward(mcq_mode="lenient", math_workers=0)(completions=[completion], answer=[gold]) == [lenient]


@pytest.mark.parametrize("completion,gold,answer_type,expected", OTHER_CASES)
def test_yesno_math_open_accuracy(completion, gold, answer_type, expected):
    kwargs = {"answer_type": [answer_type]} if answer_type else {}
    assert accuracy_reward(prompts=None, completions=[completion], answer=[gold], **kwargs) == [expected]


def test_accuracy_reads_trl_solution_column_and_conversational_completions():
    completions = [[{"role": "assistant", "content": "<think>x</think><answer>C</answer>"}]] * 2
    assert accuracy_reward(prompts=[[]] * 2, completions=completions, solution=["C", "D"]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="gold answer"):
        accuracy_reward(prompts=None, completions=["x"])


def test_math_in_the_worker_pool_matches_inline():
    pooled = AccuracyReward(math_workers=1, math_timeout=30)
    try:
        completions = [c for c, _, _, _ in OTHER_CASES[4:10]]
        golds = [g for _, g, _, _ in OTHER_CASES[4:10]]
        expected = [e for _, _, _, e in OTHER_CASES[4:10]]
        assert pooled(completions=completions, answer=golds) == expected
    finally:
        pooled.close()


@pytest.mark.parametrize("length,expected", [(0, 0.0), (12, 0.0), (13, -0.25), (14, -0.5), (16, -1.0), (17, -1.0),
                                             (100, -1.0)])
def test_soft_overlong_by_hand_and_against_trl(length, expected):
    # L_max = 16, L_cache = 4: safe up to 12 tokens, then -1/4 per token, then -1 past the limit.
    ours = SoftOverlongReward(max_completion_length=16, cache_length=4)
    trl_fn = get_soft_overlong_punishment(max_completion_len=16, soft_punish_cache=4)
    ids = [[7] * length]
    assert ours(completions=["x"], completion_ids=ids) == [expected]
    assert ours(completions=["x"], completion_ids=ids) == trl_fn(completion_ids=ids)
    assert ours(completions=["x"], completion_length=[length]) == [expected]


def test_soft_overlong_agrees_with_trl_over_a_range():
    trl_fn = get_soft_overlong_punishment(max_completion_len=2048, soft_punish_cache=512)
    ids = [[0] * n for n in range(0, 2200, 7)]
    ours = SoftOverlongReward(2048, 512)(completions=[""] * len(ids), completion_ids=ids)
    assert all(math.isclose(a, b) for a, b in zip(ours, trl_fn(completion_ids=ids), strict=True))
    # safe region ends at 2048 - 512 = 1536; halfway into the buffer is -0.5; the limit itself is -1.0
    assert [soft_overlong_penalty(n, 2048, 512) for n in (1536, 1792, 2048, 2049)] == [0.0, -0.5, -1.0, -1.0]


def test_soft_overlong_rejects_bad_parameters_and_missing_lengths():
    with pytest.raises(ValueError, match="cache_length"):
        SoftOverlongReward(16, 32)
    with pytest.raises(ValueError, match="token lengths"):
        SoftOverlongReward(16, 4)(completions=["x"])


def test_presets_and_weights():
    grpo = build_rewards("grpo")
    dapo = build_rewards("dapo", max_completion_length=64)
    assert grpo.names == ["format", "accuracy"] and grpo.weights == [1.0, 1.0]
    assert dapo.names == ["format", "accuracy", "soft_overlong"]
    overlong = dapo.funcs[2].fn
    assert (overlong.max_completion_length, overlong.cache_length) == (64, 16)
    custom = build_rewards([{"name": "format", "weight": 0.5},
                            {"name": "soft_overlong", "weight": 2.0, "max_completion_length": 16, "cache_length": 4}])
    scores = custom.score(["<think>x</think><answer>B</answer>"], completion_ids=[[1] * 14])
    assert scores == {"format": [1.0], "soft_overlong": [-0.5], "total": [0.5 * 1.0 + 2.0 * -0.5]}


def test_third_party_reward_by_import_string_and_factory_params():
    rs = build_rewards([{"name": "reward_plugins:brevity"},
                        {"name": "reward_plugins:make_keyword", "word": "gland", "value": 3.0, "weight": 0.5}])
    assert rs.names == ["brevity", "make_keyword"]
    assert rs.score(["short gland", "x" * 50]) == {"brevity": [1.0, 0.0], "make_keyword": [3.0, 0.0],
                                                    "total": [2.5, 0.0]}
    with pytest.raises(KeyError, match="no attribute"):
        build_rewards([{"name": "reward_plugins:nope"}])
    with pytest.raises(KeyError, match="unknown reward"):
        build_rewards([{"name": "no_such_reward"}])


def test_third_party_reward_by_entry_point(monkeypatch):
    import patho_r1.rewards.registry as registry_module

    ep = EntryPoint(name="brevity_ep", value="reward_plugins:brevity", group="patho_r1.rewards")
    monkeypatch.setattr(registry_module, "entry_points",
                        lambda group=None: [ep] if group == "patho_r1.rewards" else [])
    assert "brevity_ep" in REGISTRY.names()
    rs = build_rewards([{"name": "brevity_ep"}])
    assert rs.score(["short", "y" * 41])["brevity_ep"] == [1.0, 0.0]
    assert "1.0 for completions" in REGISTRY.describe()["brevity_ep"]


def test_register_reward_decorator_in_a_private_registry():
    reg = RewardRegistry()

    @reg.register("shout")
    def make_shout(bonus=1.0):
        return lambda prompts=None, completions=None, **kw: [bonus if str(c).isupper() else 0.0 for c in completions]

    assert reg.build("shout", bonus=2.0)(completions=["HI", "hi"]) == [2.0, 0.0]
    with pytest.raises(ValueError, match="already registered"):
        reg.register("shout", make_shout)
    assert callable(register_reward)


def test_a_raising_reward_costs_only_its_sample(caplog):
    import reward_plugins

    safe = SafeReward(reward_plugins.flaky, "flaky")
    logged = {}
    with caplog.at_level("WARNING"):
        out = safe(prompts=["p"] * 3, completions=["ok", "boom", "fine"], answer=["A", "B", "C"],
                   log_metric=lambda name, value: logged.__setitem__(name, value))
    assert out == [1.0, 0.0, 1.0]
    assert safe.failures == 1 and logged == {"flaky/failures": 1.0}
    assert "flaky" in caplog.text and "boom" in caplog.text


def test_hanging_verifier_is_cut_off_by_the_timeout():
    import reward_plugins

    with VerifierPool(workers=2, timeout=1.0) as pool:
        pool.map(reward_plugins.quick, [("a", "a")])  # start the workers outside the timed part
        t0 = time.monotonic()
        out = pool.map(reward_plugins.hang, [("x", "y")], default=0.0)
        out += pool.map(reward_plugins.quick, [("a", "a"), ("a", "b")])  # the pool still works afterwards
        elapsed = time.monotonic() - t0
    assert out == [0.0, 1.0, 0.0]
    assert pool.stats.timeouts == 1
    assert elapsed < 20


def test_final_answer_extraction_for_evaluators():
    raw = "<think>It could be A or C; the glands suggest C.</think><answer>C</answer>"
    assert extract_final_answer(raw) == "C"
    assert split_thinking(raw) == ("C", "It could be A or C; the glands suggest C.")
    assert extract_final_answer("<think>hmm</think> B") == "B"
    assert extract_final_answer("plain B") == "plain B"
    assert extract_final_answer("<think>x</think><answer>A</answer><answer> D </answer>") == "D"


def test_rewards_score_cli(tmp_path, capsys):
    from patho_r1.launch.cli import main

    rows = [{"completion": "<think>x</think><answer>B</answer>", "answer": "B", "completion_length": 10},
            {"completion": "<answer>C</answer>", "answer": "B", "completion_length": 2100}]
    inp = tmp_path / "c.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "scored.jsonl"
    assert main(["rewards", "score", "--rewards", "format,accuracy,soft_overlong", "--input", str(inp),
                 "--output", str(out), "--workers", "0"]) == 0
    scored = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(r["format"], r["accuracy"], r["soft_overlong"], r["total"]) for r in scored] == [
        (1.0, 1.0, 0.0, 2.0), (0.0, 0.0, -1.0, -1.0)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"completion": "x", "answer": "B"}) + "\n")
    assert main(["rewards", "score", "--rewards", "soft_overlong", "--input", str(bad),
                 "--output", str(tmp_path / "o.jsonl")]) == 2
    assert "bad.jsonl:1: field 'completion_length'" in capsys.readouterr().err
    assert main(["rewards", "list"]) == 0
    assert "soft_overlong" in capsys.readouterr().out


def test_rewards_plug_into_trl_signature():
    """TRL calls reward(prompts=..., completions=..., completion_ids=..., **columns, trainer_state=..., ...)."""
    rs = build_rewards("dapo", max_completion_length=32)
    kwargs = dict(prompts=[[{"role": "user", "content": "q"}]],
                  completions=[[{"role": "assistant", "content": "<think>x</think><answer>A</answer>"}]],
                  completion_ids=[[1, 2, 3]], answer=["A"], answer_type=["mcq"], category=["stroma"],
                  trainer_state=object(), log_extra=lambda *a: None, log_metric=lambda *a: None, image=[None])
    assert [f(**kwargs) for f in rs.funcs] == [[1.0], [1.0], [0.0]]
    assert sys.modules.get("vllm") is None


def test_the_package_docstring_examples_run(monkeypatch):
    """The documented `@register_reward` factory, named without parameters, scores (it once scored 0.0 always)."""
    import doctest

    import patho_r1.rewards as package

    monkeypatch.setattr(REGISTRY, "factories", dict(REGISTRY.factories))  # the example registers "brevity"
    result = doctest.testmod(package, raise_on_error=False, verbose=False)
    assert result.attempted >= 5 and result.failed == 0


def test_a_registered_factory_is_called_even_without_parameters():
    reg = RewardRegistry()

    @reg.register("brevity")
    def make_brevity(max_chars=5):
        def brevity(prompts=None, completions=None, **kw):
            return [1.0 if len(c) <= max_chars else 0.0 for c in completions]
        return brevity

    assert reg.build("brevity")(completions=["tiny", "far too long"]) == [1.0, 0.0]
    assert reg.build("brevity", max_chars=20)(completions=["far too long"]) == [1.0]
    reg.register("broken", lambda: 3)
    with pytest.raises(TypeError, match="factory returned a non-callable int"):
        reg.build("broken")


def test_an_import_string_reward_function_takes_no_parameters():
    with pytest.raises(TypeError, match="is a reward function, not a factory"):
        build_rewards([{"name": "reward_plugins:brevity", "limit": 3}])


def test_a_reward_failing_on_every_sample_for_one_reason_fails_the_step():
    def needs_gold(prompts=None, completions=None, **columns):
        return [1.0 if c == columns["answer"][0] else 0.0 for c in completions]

    safe = SafeReward(needs_gold, "needs_gold")
    with pytest.raises(RewardFailure, match=r"'needs_gold' failed on all 3 samples .* KeyError: 'answer'"):
        safe(prompts=["p"] * 3, completions=["a", "b", "c"])
    # different reasons, or a single sample, stay per-sample noise
    import reward_plugins

    assert SafeReward(reward_plugins.flaky, "flaky")(completions=["boom"]) == [0.0]


def test_weighted_total_follows_trls_rule_for_missing_scores():
    rows = [[1.0, 0.5, None], [None, None, None], [float("nan"), 2.0, -1.0], [0.0, 0.0, 0.0]]
    total = weighted_total(rows, [1.0, 2.0, 0.5])
    assert total[0] == 2.0 and math.isnan(total[1]) and total[2] == 3.5 and total[3] == 0.0
    rs = build_rewards([{"name": "format", "weight": 1.0}, {"name": "accuracy", "weight": 2.0}])
    scored = rs.score(["<think>x</think><answer>B</answer>", "B"], answer=["B", "A"])
    assert scored["total"] == [3.0, 0.0]
    unscored = build_rewards([{"name": "reward_plugins:varied"}]).score(["a", "b"], completion_ids=[[3], [4]])
    assert unscored == {"varied": [None, 4.0], "total": [None, 4.0]}  # an unscorable row has no total, not 0


def test_max_completion_length_given_twice_must_agree():
    with pytest.raises(ValueError, match="max_completion_length 64 disagrees with the rollout's 32"):
        build_rewards([{"name": "soft_overlong", "max_completion_length": 64}], max_completion_length=32)
    rs = build_rewards([{"name": "soft_overlong", "max_completion_length": 32}], max_completion_length=32)
    assert rs.funcs[0].fn.max_completion_length == 32


# (prediction in <answer>, gold, expected): words are never algebra, units must agree
OPEN_AND_UNIT_CASES = [
    ("rouses", "serous", 0.0),  # math-verify reads both as the product s*e*r*o*u*s
    ("carcinomaadeno", "adenocarcinoma", 0.0),
    ("situ in carcinoma", "carcinoma in situ", 0.0),
    ("Serous.", "serous", 1.0),
    ("carcinoma in situ", "Carcinoma in situ", 1.0),
    ("T2N1M0", "T2N0M0", 0.0),  # TNM stages are not products either
    ("t2n0m0", "T2N0M0", 1.0),
    ("3.5", "3.5 mm", 0.0),  # a missing unit is another answer
    ("3.5 cm", "3.5 mm", 0.0),
    ("3.5 mm", "3.5 mm", 1.0),
    ("3.50 mm", "3.5 mm", 1.0),
    ("3,5 mm", "3.5 mm", 1.0),
    ("40 %", "40%", 1.0),
    ("40", "40%", 0.0),
    ("3.5 mm", "3.5", 0.0),
    ("0.5", "1/2", 1.0),
    ("-5", "5-10%", 0.0),  # a range, not a subtraction
    ("5-10%", "5-10%", 1.0),
    ("2*x+1", "2x+1", 1.0),
]


@pytest.mark.parametrize("pred,gold,expected", OPEN_AND_UNIT_CASES)
def test_open_answers_are_not_algebra_and_units_count(pred, gold, expected):
    assert AccuracyReward(math_workers=0)(completions=[f"<think>x</think><answer>{pred}</answer>"],
                                          answer=[gold]) == [expected]


@pytest.mark.parametrize("gold,kind", [("A", "mcq"), ("no", "yesno"), ("12", "numeric"), ("3.5 mm", "numeric"),
                                       ("1/2", "numeric"), ("40%", "numeric"), ("x^2+2x+1", "expression"),
                                       ("\\frac{1}{2}", "expression"), ("serous", "open"), ("T2N0M0", "open"),
                                       ("5-10%", "open"), ("stage 2", "open"), ("Gleason 3+4", "open")])
def test_infer_answer_type(gold, kind):
    assert infer_answer_type(gold) == kind


def test_a_hanging_reward_is_cut_at_its_time_limit_and_counted():
    rs = build_rewards([{"name": "reward_plugins:sleepy", "call_timeout": 0.5}])
    t0 = time.perf_counter()
    scored = rs.score(["fine", "please sleep", "fine"])
    assert time.perf_counter() - t0 < 5  # not 30 s: the step goes on at the limit
    assert scored["sleepy"] == [0.0, 0.0, 0.0] and rs.funcs[0].failures == 3
    assert rs.score(["fine", "fine"])["sleepy"] == [1.0, 1.0]  # the next batch is scored normally


def test_bad_return_values_cost_only_their_samples_and_are_counted(caplog):
    safe = SafeReward(reward_plugins_module().odd_values, "odd")
    logged = {}
    with caplog.at_level("WARNING"):
        out = safe(completions=["one", "nan", "inf", "text", "dict", "none"],
                   log_metric=lambda name, value: logged.__setitem__(name, value))
    assert out == [1.0, 0.0, 0.0, 0.0, 0.0, None]  # None stays None: TRL's "not applicable"
    assert safe.failures == 4 and logged == {"odd/failures": 4.0}
    assert "a str instead of a number (example: '0.5')" in caplog.text and "NaN or inf" in caplog.text


def test_a_reward_returning_no_list_at_all_fails_loudly():
    with pytest.raises(RewardFailure, match=r"'as_string' failed on all 2 samples .* returned a str, not a list"):
        SafeReward(reward_plugins_module().as_string, "as_string")(completions=["a", "b"])
    with pytest.raises(RewardFailure, match=r"returned a non-finite number \(NaN or inf\) for all 2 samples"):
        SafeReward(reward_plugins_module().odd_values, "odd")(completions=["nan", "inf"])


@pytest.mark.parametrize("spec,message", [
    ({"name": "formatt"}, "unknown reward 'formatt'"),
    ({"name": "accuracy", "mcq_mod": "strict"}, "unexpected keyword argument 'mcq_mod'"),
    ({"name": "reward_plugins:make_keyword", "wrd": "x"}, "unexpected keyword argument 'wrd'"),
    ({"name": "reward_plugins:brevity", "limit": 3}, "is a reward function, not a factory"),
    ({"name": "os:system"}, "neither a reward"),
    ({"name": "reward_plugins:nope"}, "has no attribute 'nope'"),
    ({"name": "nosuchpkg.mod:fn"}, "cannot import module 'nosuchpkg.mod'"),
])
def test_reward_specs_are_checked_without_building_them(spec, message):
    from patho_r1.rewards.registry import RewardSpec, check_reward_specs

    problems = check_reward_specs([RewardSpec(name="format"), RewardSpec.model_validate(spec)])
    assert len(problems) == 1 and problems[0].startswith("rewards.1.name: ") and message in problems[0]


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), -1.0])
def test_reward_weights_must_be_finite_and_not_negative(weight):
    from pydantic import ValidationError

    from patho_r1.rewards.registry import RewardSpec

    with pytest.raises(ValidationError):
        RewardSpec(name="format", weight=weight)


def reward_plugins_module():
    import reward_plugins

    return reward_plugins
