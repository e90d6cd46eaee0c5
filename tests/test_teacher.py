"""The data engine's second half: the prompt grid, the teacher client against real HTTP servers (`transformers
serve` with the tiny model, and the scripted teacher with injected faults), kill-and-resume, the filter rules on a
hand-written set, and the RL MCQ builder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from patho_r1.curate.config import CuratePhaseConfig, FilterStage, GenerateStage, MCQStage
from patho_r1.curate.pipeline import run_chain, run_stage
from patho_r1.curate.store import iter_jsonl
from patho_r1.fixtures.teacher import scripted_reply, serve

sys.path.insert(0, str(Path(__file__).parent))
from teacher_outputs import CASES  # noqa: E402

PATHO = str(Path(sys.executable).parent / "patho-r1")


@pytest.fixture(scope="module")
def cluster_dir(tmp_path_factory):
    """The synthetic world's raw export through part 1 of the data engine (import .. cluster)."""
    from patho_r1.fixtures.synth import WorldConfig, generate_world

    root = tmp_path_factory.mktemp("teacher_world")
    generate_world(root, seed=5, config=WorldConfig(
        n_train_tiles=12, n_heldout_tiles=6, n_sft=6, n_rl=6, n_rl_heldout=6, n_embed_pairs=6, n_composed_per_task=2,
        n_eval_tiles=24, n_eval_mcq=24, n_raw_export=720))
    cfg = CuratePhaseConfig(output_dir=str(root / "cur"), stages=[
        {"stage": "import", "sources": [{"format": "quilt-1m", "path": str(root / "raw/quilt_1M_lookup.csv")}]},
        {"stage": "dedup"}, {"stage": "tag", "seed": str(root / "raw/subfield_seed.csv"), "review": 0},
        {"stage": "cluster"}])
    result = run_chain(cfg)
    return Path(result.model_dir), root


@pytest.fixture
def teacher():
    servers = []

    def start(**options):
        servers.append(serve(**options))
        return servers[-1]

    yield start
    for s in servers:
        s.stop()


def _stats(server) -> dict:
    with urllib.request.urlopen(server.url.removesuffix("/v1") + "/stats") as r:
        return json.loads(r.read())


# ----------------------------------------------------------------------------------------------------------------------
# The prompt grid
# ----------------------------------------------------------------------------------------------------------------------

def test_grid_has_60_cells_that_render_and_an_override_replaces_one(tmp_path):
    from patho_r1.curate.grid import PromptGrid

    grid = PromptGrid()
    assert len(grid.cells()) == 60 and grid.check() == []
    text = grid.render("ihc/hard/conversation", caption="CK20 stains the tumour.", n_turns=3)
    assert "<caption>CK20 stains the tumour.</caption>" in text and "3 turns" in text and "Task: conversation" in text
    assert "differential diagnosis" in text  # the hard level's ask
    mcq = grid.render("gross/easy/mcq", caption="A whorled uterine mass.", n_options=5)
    assert "5 options lettered A to E" in mcq and "<options>" in mcq

    (tmp_path / "gross/easy").mkdir(parents=True)
    (tmp_path / "gross/easy/mcq.j2").write_text("Write an MCQ about: <caption>{{ caption }}</caption>")
    custom = PromptGrid(tmp_path)
    assert custom.render("gross/easy/mcq", caption="X.") == "Write an MCQ about: <caption>X.</caption>"
    assert custom.render("gross/easy/reasoning", caption="X.") == grid.render("gross/easy/reasoning", caption="X.")
    assert custom.digest() != grid.digest() and custom.overridden() == ["gross/easy/mcq"]

    (tmp_path / "fish/hard").mkdir(parents=True)
    (tmp_path / "fish/hard/reasoning.j2").write_text("{{ captoin }}")  # a typo: an error naming the cell
    problems = PromptGrid(tmp_path).check()
    assert len(problems) == 1 and problems[0].startswith("fish/hard/reasoning") and "captoin" in problems[0]


# ----------------------------------------------------------------------------------------------------------------------
# Filters on a hand-written set
# ----------------------------------------------------------------------------------------------------------------------

def test_filters_precision_and_recall_on_hand_written_outputs(tmp_path):
    from patho_r1.data import ConversationRecord

    assert len(CASES) >= 60
    src = tmp_path / "outputs.jsonl"
    src.write_text("".join(json.dumps({k: v for k, v in c.items() if k != "expect"}) + "\n" for c in CASES))
    manifest = run_stage(FilterStage(input=str(src)), None, tmp_path / "out")
    rejected = {r["id"]: r["reasons"] for r in iter_jsonl(tmp_path / "out/rejected.jsonl")}
    kept = list(iter_jsonl(tmp_path / "out/kept.jsonl"))
    bad = {c["id"]: c["expect"] for c in CASES if c["expect"]}
    true_pos = len(set(rejected) & set(bad))
    precision, recall = true_pos / max(len(rejected), 1), true_pos / len(bad)
    assert precision >= 0.95 and recall >= 0.95, (precision, recall, sorted(set(rejected) ^ set(bad)))
    wrong_rule = {i: rejected[i] for i in bad if i in rejected and not any(r.startswith(bad[i]) for r in rejected[i])}
    assert not wrong_rule  # each bad output is caught by the rule written for it
    assert len(kept) + len(rejected) == len(CASES) and manifest.counts["kinds"] == {"conversation": len(kept)}
    for row in kept:  # SFT-ready: our conversation kind, think and answer in the assistant turns
        record = ConversationRecord.model_validate(row)
        assert all(m.text().startswith("<think>") for m in record.messages if m.role == "assistant")
    by_id = {r["id"]: r for r in kept}
    assert by_id["g06"]["messages"][-1]["content"].endswith("<answer>C</answer>")  # 'C. Squamous...' -> the letter
    assert "Sheets of small, dark, round nuclei" in by_id["g26"]["messages"][1]["content"]  # reasoning_content
    report = json.loads((tmp_path / "out/filter_report.json").read_text())
    recount = Counter(r.split(":")[0] for reasons in rejected.values() for r in reasons)
    assert {k: sum(v.values()) for k, v in report["rejected_by_rule"].items() if v} == dict(recount)
    assert "| repetition |" in (tmp_path / "out/filter_report.md").read_text()


def test_filter_output_does_not_depend_on_the_order_the_teacher_wrote_its_replies(tmp_path):
    """A concurrent teacher writes replies in completion order; the near-duplicate rule keeps the first of two
    near-copies.  Rows are taken in id order, so a shuffled file keeps the same rows, written in the same order."""
    import random

    lines = [json.dumps({k: v for k, v in c.items() if k != "expect"}) + "\n" for c in CASES]
    copies = [c for c in CASES if c["expect"] == "near_duplicate"]
    assert copies  # the hand-written set has near-copies, so order could matter
    outputs = []
    for seed in (0, 1):
        random.Random(seed).shuffle(lines)
        src = tmp_path / f"outputs-{seed}.jsonl"
        src.write_text("".join(lines))
        run_stage(FilterStage(input=str(src)), None, tmp_path / f"out-{seed}")
        outputs.append([(tmp_path / f"out-{seed}" / name).read_text() for name in ("kept.jsonl", "rejected.jsonl")])
    assert outputs[0] == outputs[1]


def _random_texts(seed: int, n: int) -> list[list[str]]:
    """Texts that try the byte classes: ASCII words, digits, '_', punctuation, every ASCII whitespace (\\x1c-\\x1f
    too), non-ASCII words and punctuation, and sentences said again and again."""
    import random

    rng = random.Random(seed)
    atoms = ["cell", "Cell", "nuclei", "x_1", "42", "mu", "\u03bcm", "na\u00efve", "\u4e2d\u6587", "\u0130", ",", ";",
             "-", "(", ")", "'", ".", "!", "?", "\u2014", "\u00b0", " ", " ", " ", "\t", "\n", "\x0b", "\x1c", "\r"]
    loops = ["The stroma is dense.", "I see pink cells! ", "a b c", " \t Same  words here?"]
    rows = []
    for i in range(n):
        ascii_only = i % 3 != 0
        pool = [a for a in atoms if a.isascii()] if ascii_only else atoms
        parts = []
        for _ in range(rng.randint(0, 4)):
            text = "".join(rng.choice(pool) + rng.choice(["", " "]) for _ in range(rng.randint(0, 60)))
            if rng.random() < 0.4:  # a loop, or two copies (not enough), spread through the text
                loop = rng.choice(loops)
                for _ in range(rng.choice([2, 3, 5])):
                    at = rng.randint(0, len(text))
                    text = text[:at] + "\n" + loop + "\n" + text[at:]
            parts.append(text)
        rows.append(parts)
    return rows


def test_chunk_text_counts_equal_the_regexes_they_replace(monkeypatch):
    """The filter's numpy pass over a chunk (words, token counts, n-gram counts, the sentence-loop screen) against
    the plain-Python definitions, on texts built to hit every byte class, ASCII and not."""
    from patho_r1.curate import word_hash
    from patho_r1.curate.chunk_text import SENTENCE, TOKEN, WORD, ChunkText

    same = ["\u03bcm cells are here. A b c. A b c. A b c."] * 3  # alike rows of other characters come first
    bodies = [same, same, same, *_random_texts(0, 400)]
    extras = [" ".join(parts[:1]) + " What is shown?" for parts in bodies]
    chunk = ChunkText(bodies, extras)
    distinct, total = chunk.distinct_ngrams(3)
    screen = chunk.may_repeat_sentence(3)
    cleared = looping = 0
    for i, (parts, extra) in enumerate(zip(bodies, extras, strict=True)):
        words = WORD.findall("\n".join(parts).lower())
        assert chunk.n_words(i) == len(words)
        assert chunk.tokens[i] == sum(len(TOKEN.findall(t)) for t in (*parts, extra))
        grams = list(zip(words, words[1:], words[2:], strict=False))
        assert (distinct[i], total[i]) == (len(set(grams)), len(grams))
        if chunk.ascii[i]:  # the plain-Python hash of each word
            assert chunk.word_hashes(i).tolist() == [word_hash.word_hash(w.encode()) for w in words]
        for j, k in [(a, b) for a in range(len(words)) for b in range(a)][:200]:  # equal words hash alike
            assert (words[j] == words[k]) == (chunk.word_hashes(i)[j] == chunk.word_hashes(i)[k])
        loops = any(max(Counter(s.strip().lower() for s in SENTENCE.findall(p) if s.count(" ") >= 2)
                        .values(), default=0) >= 3 for p in parts)
        assert screen[i] or not loops  # the screen never clears a row that loops
        cleared += not screen[i]
        looping += loops
    assert cleared > 100 and looping > 30  # it does clear rows, or it would be no screen
    monkeypatch.setattr(word_hash, "_WINDOW", 40)  # hashed in windows of 40 bytes (some words are longer)
    assert (ChunkText(bodies, extras)._hashes == chunk._hashes).all()
    assert ChunkText([], []).tokens.tolist() == []


def test_parsing_a_plain_reply_fast_gives_what_the_tag_walk_gives(monkeypatch):
    """`parse_reply` takes well-formed replies in one regex match a turn; every reply, well formed or not, parses
    to what the general walk over the tags finds."""
    import random

    from patho_r1.curate import teacher_output

    rng = random.Random(0)
    # each slot of a turn: mostly what the contract writes (first), sometimes a departure from it
    slots = [["<question> Q?\n</question>", "<question></question>", "<QUESTION>Q</QUESTION>", "", "<question>"],
             ["", "<options>\nA. one\nB. two\n</options>", "<options>none</options>", "<options></options>",
              "<options>B. two\nA. one</options>"],
             ["<think>\nlook </think>", "<think>x < y</think>", "<think></think>", "<think >t</think >", "",
              "<think>a<think>b</think>"],
             ["<answer>A</answer>", "<answer> B. two </answer>", "<answer>", "", "</answer>"],
             ["\n", "", "  ", "stray", "</think>"]]

    def turn():
        return "".join(slot[0] if rng.random() < 0.93 else rng.choice(slot) for slot in slots)

    replies = ["".join(turn() for _ in range(rng.randint(0, 4))) for _ in range(3000)]
    reasonings = [rng.choice([None, "", " thought "]) for _ in replies]
    plain = sum(teacher_output._plain_turns(r) is not None for r in replies)
    assert 300 < plain < 2700, plain  # both roads are taken
    fast = [teacher_output.parse_reply(r, why) for r, why in zip(replies, reasonings, strict=True)]
    monkeypatch.setattr(teacher_output, "_plain_turns", lambda response: None)
    walked = [teacher_output.parse_reply(r, why) for r, why in zip(replies, reasonings, strict=True)]
    assert fast == walked


def test_filter_names_file_line_and_field_of_bad_input(tmp_path):
    from patho_r1.errors import DataError

    src = tmp_path / "bad.jsonl"
    src.write_text('{"id": "a", "response": "<question>q</question>"}\n{"id": "b"}\n')
    with pytest.raises(DataError) as info:
        run_stage(FilterStage(input=str(src)), None, tmp_path / "out")
    assert "bad.jsonl" in str(info.value) and ":2" in str(info.value) and "response" in str(info.value)
    assert not (tmp_path / "out").exists()  # nothing half-written
    # the first pass reads a leading id without parsing the line; a line that gives "id" twice is caught in the second
    src.write_text('{"id": "a", "response": "<question>q</question>", "id": "b"}\n')
    with pytest.raises(DataError) as info:
        run_stage(FilterStage(input=str(src)), None, tmp_path / "out")
    assert ":1" in str(info.value) and "id" in str(info.value) and "more than once" in str(info.value)


# ----------------------------------------------------------------------------------------------------------------------
# The client against real servers
# ----------------------------------------------------------------------------------------------------------------------

def test_client_against_transformers_serve(hf_server, cluster_dir, tmp_path):
    from patho_r1.llm import ChatRequest, EndpointConfig, LLMClient, image_part, run

    url, model = hf_server
    endpoint = EndpointConfig(base_url=url, model=model, concurrency=3, max_tokens=8, temperature=0.0)
    image = next(p for p in (cluster_dir[1] / "raw/images").iterdir())
    results = {}

    async def main():
        async with LLMClient(endpoint) as client:
            requests = [ChatRequest(i, [{"role": "user", "content": f"Describe tile {i}."}]) for i in range(5)]
            requests.append(ChatRequest("img", [{"role": "user", "content": [image_part(image),
                                                                              {"type": "text", "text": "What?"}]}]))
            await client.map(requests, lambda r, res: results.__setitem__(r.key, res))
            return client.prompt_tokens, client.completion_tokens

    tokens_in, tokens_out = run(main())
    assert set(results) == {0, 1, 2, 3, 4, "img"} and all(r.error is None for r in results.values())
    assert all(r.finish_reason == "length" and r.completion_tokens == 8 for r in results.values())
    assert tokens_out == 48 and tokens_in == sum(r.prompt_tokens for r in results.values()) > 0

    # the generate stage end to end against it: every request answered and recorded with its usage; the random
    # model's text then fails the filters, by name
    cluster, _ = cluster_dir
    stage = GenerateStage(endpoint={"base_url": url, "model": model, "concurrency": 4, "max_tokens": 8},
                          tasks=["reasoning"], limit=6)
    manifest = run_stage(stage, cluster, tmp_path / "gen")
    rows = list(iter_jsonl(tmp_path / "gen/generations.jsonl"))
    assert len(rows) == 6 == manifest.counts["answered"] and manifest.complete
    assert all(r["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 8 for r in rows)
    filtered = run_stage(FilterStage(), tmp_path / "gen", tmp_path / "filter")
    assert filtered.counts["kept"] == 0 and filtered.counts["rejected_by_rule"]["truncation"] == 6


def test_retries_through_429_500_timeouts_and_dropped_connections(cluster_dir, teacher, tmp_path):
    cluster, _ = cluster_dir
    server = teacher(faults={"429": 0.15, "500": 0.15, "slow": 0.1, "drop": 0.1}, slow_s=1.5)
    stage = GenerateStage(endpoint={"base_url": server.url, "model": "scripted", "concurrency": 8, "timeout": 0.5,
                                    "max_retries": 4}, tasks=["reasoning", "mcq"], limit=80)
    manifest = run_stage(stage, cluster, tmp_path / "gen")
    rows = list(iter_jsonl(tmp_path / "gen/generations.jsonl"))
    keys = [(r["record_id"], r["prompt_id"]) for r in rows]
    stats = _stats(server)
    assert len(rows) == 80 == len(set(keys)) and manifest.complete and manifest.counts.get("failed", 0) == 0
    for kind in ("429", "500", "slow", "drop"):
        assert stats.get(f"fault_{kind}", 0) >= 3, stats  # every kind of fault was served, and recovered from
    assert stats["requests"] == 80 + sum(stats[f"fault_{k}"] for k in ("429", "500", "slow", "drop"))
    # the replies arrived out of order (slow ones, retries), yet the file is in the planned order: the order of one
    # request at a time on a server without faults, so what the filter keeps and SFT samples does not depend on it
    calm = teacher()
    one_at_a_time = stage.model_copy(update={"endpoint": stage.endpoint.model_copy(
        update={"base_url": calm.url, "concurrency": 1})})
    run_stage(one_at_a_time, cluster, tmp_path / "gen1")
    assert keys == [(r["record_id"], r["prompt_id"]) for r in iter_jsonl(tmp_path / "gen1/generations.jsonl")]


def test_failures_are_recorded_and_a_rerun_asks_them_again(cluster_dir, teacher, tmp_path):
    cluster, _ = cluster_dir
    server = teacher(faults={"500": 0.5})
    stage = GenerateStage(endpoint={"base_url": server.url, "model": "scripted", "max_retries": 0},
                          tasks=["description"], limit=30)
    first = run_stage(stage, cluster, tmp_path / "gen")
    failed = first.counts["failed"]
    assert failed > 5 and not first.complete and (tmp_path / "gen/failures.jsonl").is_file()
    with pytest.raises(Exception, match="not a finished curate stage"):
        run_stage(FilterStage(), tmp_path / "gen", tmp_path / "filter")  # an unfinished stage is not read on
    second = run_stage(stage, cluster, tmp_path / "gen")  # the faults hit first attempts only
    assert second.complete and second.counts["resumed"] == 30 - failed and second.counts["answered"] == failed
    assert len(list(iter_jsonl(tmp_path / "gen/generations.jsonl"))) == 30


def test_kill_midway_then_resume_loses_and_duplicates_nothing(cluster_dir, teacher, tmp_path):
    cluster, _ = cluster_dir
    server = teacher(delay_s=0.05)
    out = tmp_path / "gen"
    env = {**os.environ, "OPENAI_API_KEY": "sk-test-secret-4f9a"}
    cmd = [PATHO, "curate", "generate", str(cluster), "--base-url", server.url, "--model", "scripted",
           "--concurrency", "4", "--tasks", "reasoning", "description", "--limit", "160", "--out", str(out)]
    dry = subprocess.run(cmd + ["--dry-run"], capture_output=True, text=True, env=env, check=True)
    assert "160 requests" in dry.stdout and not out.exists()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    deadline = time.time() + 60
    while time.time() < deadline:
        if (out / "generations.jsonl").is_file() and (out / "generations.jsonl").read_bytes().count(b"\n") >= 40:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = (out / "generations.jsonl").read_bytes().count(b"\n")
    assert 40 <= before < 160 and not (out / "manifest.json").exists()
    sent_before = _stats(server)["requests"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = list(iter_jsonl(out / "generations.jsonl"))
    keys = [(r["record_id"], r["prompt_id"]) for r in rows]
    assert len(rows) == 160 == len(set(keys))
    lost = sent_before - before  # requests the kill cut off: at most the ones in flight
    assert 0 <= lost <= 4
    assert _stats(server)["requests"] == 160 + lost
    assert "already there" in done.stdout
    for path in out.rglob("*"):  # the API key is in no file the run wrote
        if path.is_file():
            assert b"sk-test-secret-4f9a" not in path.read_bytes(), path
    assert "sk-test-secret" not in done.stdout + done.stderr


def test_reasoning_content_becomes_the_think(cluster_dir, teacher, tmp_path):
    cluster, _ = cluster_dir
    server = teacher(reasoning=True)
    stage = GenerateStage(endpoint={"base_url": server.url, "model": "scripted"}, tasks=["reasoning"], limit=10,
                          labels=str(cluster_dir[1] / "raw/diagnosis.csv"))
    run_stage(stage, cluster, tmp_path / "gen")
    rows = list(iter_jsonl(tmp_path / "gen/generations.jsonl"))
    assert all(r["reasoning"] and "<think>" not in r["response"] for r in rows)
    run_stage(FilterStage(), tmp_path / "gen", tmp_path / "filter")
    kept = {r["id"]: r for r in iter_jsonl(tmp_path / "filter/kept.jsonl")}
    assert len(kept) == 10
    for r in rows:
        assert kept[r["id"]]["messages"][1]["content"].startswith(f"<think>{r['reasoning'].strip()}</think>")


def test_scripted_teacher_reads_the_diagnosis_from_the_caption():
    from patho_r1.curate.grid import PromptGrid

    caption = ("H&E-stained section showing gland-like rings lined by crowded nuclei and irregular lumens, consistent "
               "with adenocarcinoma (colon, case 3, patient aged 61). The differential diagnosis includes metastatic "
               "adenocarcinoma and poorly differentiated carcinoma.")
    text, _, finish = scripted_reply(PromptGrid().render("histopathology/hard/description", caption=caption))
    assert finish == "stop" and text.endswith("the appearance is that of adenocarcinoma.</answer>")
    caption2 = caption.replace("consistent with adenocarcinoma", "consistent with mucinous pools")
    text2, _, _ = scripted_reply(PromptGrid().render("histopathology/hard/reasoning", caption=caption2))
    assert "Mucinous pools:" in text2


# ----------------------------------------------------------------------------------------------------------------------
# The RL MCQ builder
# ----------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def built(cluster_dir, tmp_path_factory):
    cluster, root = cluster_dir
    out = tmp_path_factory.mktemp("built")
    server = serve(flawed=0.1)
    labels = str(root / "raw/diagnosis.csv")
    # one request at a time: replies land in generations.jsonl in the planned order, so the filter's near-duplicate
    # rule (the first of two near-copies is kept) and everything downstream are the same on every run
    endpoint = {"base_url": server.url, "model": "scripted", "concurrency": 1}
    try:
        run_stage(GenerateStage(endpoint=endpoint, fraction=0.5, tasks_per_record=2, labels=labels), cluster,
                  out / "gen")
        run_stage(FilterStage(), out / "gen", out / "filter")
        rules = run_stage(MCQStage(n=240, labels=labels, heldout=0.1), out / "filter", out / "mcq")
        teach = run_stage(MCQStage(n=240, source="teacher", endpoint=endpoint, labels=labels), out / "filter",
                          out / "mcq-teacher")
    finally:
        server.stop()
    return out, rules, teach, cluster, root


def test_mcqs_never_share_an_image_or_caption_with_the_sft_data(built):
    from patho_r1.curate.filters import normalize
    from patho_r1.curate.rows import image_key

    out, _, _, cluster, _ = built
    kept = list(iter_jsonl(out / "filter/kept.jsonl"))
    sft_images = {image_key(r, out / "filter") for r in kept}
    sft_captions = {normalize(r["caption"]) for r in kept}
    captions = {r["id"]: r["caption"] for r in iter_jsonl(cluster / "caption.jsonl")}
    for folder in ("mcq", "mcq-teacher"):
        items = list(iter_jsonl(out / folder / "mcq.jsonl")) + list(iter_jsonl(out / folder / "heldout.jsonl"))
        assert items and all(image_key(i, out / folder) not in sft_images for i in items)
        assert all(normalize(captions[i["record_id"]]) not in sft_captions for i in items)


def test_mcqs_are_stratified_balanced_and_blind_rules_stay_at_chance(built):
    from patho_r1.data import MCQRecord

    out, rules, _, _, _ = built
    for folder in ("mcq", "mcq-teacher"):
        items = list(iter_jsonl(out / folder / "mcq.jsonl")) + list(iter_jsonl(out / folder / "heldout.jsonl"))
        for item in items:
            MCQRecord.model_validate(item)
        shares = Counter(i["answer"] for i in items)
        assert all(abs(shares[k] / len(items) - 0.25) <= 0.02 for k in "ABCD"), shares
    blind = rules.counts["no_image"]
    assert blind["best"] - blind["chance"] <= 0.03, blind
    report = json.loads((out / "mcq/mcq_report.json").read_text())
    assert rules.counts["made"] == 240 and report["heldout"] == 24
    strata = report["strata"]
    pool = sum(s["pool"] for s in strata.values())
    for s in strata.values():  # proportionate: each stratum within one question of its share
        assert abs(s["drawn"] - 240 * s["pool"] / pool) < 1
    assert any(k.startswith("histopathology/") for k in strata)  # split by tissue system within histopathology
    items = list(iter_jsonl(out / "mcq/mcq.jsonl"))
    # hard negatives: distractors are other diagnoses, never the correct one again
    assert all(i["options"][i["answer"]] == i["category"] for i in items)
    assert all(sum(v == i["category"] for v in i["options"].values()) == 1 for i in items)


def test_teacher_mode_mcqs_keep_blind_rules_at_chance(built):
    # The option-text prior scored 0.30 against chance 0.25 while the teacher's own distractors were kept (now
    # `teacher_distractors: keep`); re-drawn, 0.22, and the best blind rule 0.256.
    blind = built[2].counts["no_image"]
    assert blind["best"] - blind["chance"] <= 0.03, blind


def test_balancing_teacher_distractors_takes_the_option_text_prior_back_to_chance():
    """A teacher drawing distractors uniformly (plus one of its own invention) over Zipf-distributed diagnoses: the
    option-text prior beats chance with its distractors kept, and is at chance once they are re-drawn."""
    from collections import Counter

    import numpy as np

    from patho_r1.curate.mcq import balance_teacher_distractors, balanced_letters, no_image_baselines, place

    rng = np.random.default_rng(0)
    names = [f"diagnosis {i}" for i in range(24)]
    weights = 1 / np.arange(1, 25)  # the commonest is 27% of the answers
    questions = []
    for i in range(1200):
        answer = names[rng.choice(24, p=weights / weights.sum())]
        others = [n for n in names if n != answer]
        distractors = list(rng.choice(others, 2, replace=False)) + [f"invented {rng.integers(10_000)}"]
        questions.append(({"id": i, "tissue_system": "breast" if i % 2 else "lung"}, "Which?", answer, distractors))

    def prior(qs):
        letters = balanced_letters([len(q[3]) + 1 for q in qs], rng)
        items = [{"options": place(c, d, letter, rng), "answer": letter}
                 for (_, _, c, d), letter in zip(qs, letters, strict=True)]
        return no_image_baselines(items)

    kept = prior(questions)
    balanced = balance_teacher_distractors(questions, rng, Counter())
    assert all(q is not None and len(q[3]) == 3 and q[2] not in q[3] for q in balanced)
    assert [q[2] for q in balanced] == [q[2] for q in questions]  # the teacher's answers stay
    fair = prior(balanced)
    assert kept["option_text_prior"] - kept["chance"] > 0.2, kept  # measured 0.61 against 0.25
    assert fair["best"] - fair["chance"] <= 0.03, fair  # measured 0.25


def test_kept_conversations_go_through_trl_multimodal_preparation(built):
    from PIL import Image
    from trl.data_utils import prepare_multimodal_messages

    out = built[0]
    kept = list(iter_jsonl(out / "filter/kept.jsonl"))
    multi = [r for r in kept if r["task"] == "conversation"]
    assert multi and all(r["images"] for r in kept)
    image = Image.new("RGB", (28, 28))
    for row in kept:
        messages = prepare_multimodal_messages(row["messages"], images=[image] * len(row["images"]))
        assert sum(p["type"] == "image" for m in messages for p in m["content"]) == len(row["images"])


def test_synth_teacher_endpoint_in_a_curate_phase(cluster_dir, tmp_path):
    from patho_r1.launch.curate_phase import run_curate

    cluster, root = cluster_dir
    cfg = CuratePhaseConfig(output_dir=str(tmp_path / "cur"), input=str(cluster), stages=[
        {"stage": "generate", "endpoint": {"base_url": "synth:teacher", "model": "scripted"}, "limit": 12,
         "labels": str(root / "raw/diagnosis.csv")},
        {"stage": "filter"}])
    result = run_curate(cfg)
    assert result.metrics["stages"]["01-generate"]["answered"] == 12
    again = run_curate(CuratePhaseConfig.model_validate(cfg.model_dump()))  # another port, same work: skipped
    assert again.metrics["stages"]["01-generate"] == result.metrics["stages"]["01-generate"]


def test_word_signatures_estimate_shingle_jaccard():
    import numpy as np

    from patho_r1.curate.chunk_text import ChunkText
    from patho_r1.curate.minhash import shingles, word_signatures

    def hashes(*texts):
        chunk = ChunkText([[t] for t in texts], [""] * len(texts))
        return [chunk.word_hashes(i) for i in range(len(texts))]

    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(300)]
    base = [vocab[i] for i in rng.integers(0, 300, 60)]
    for changed in (0, 3, 10, 30):
        other = list(base)
        for i in rng.choice(60, changed, replace=False):
            other[i] = "x" + other[i]
        a, b = set(shingles(" ".join(base))), set(shingles(" ".join(other)))
        truth = len(a & b) / len(a | b)
        sigs = word_signatures(hashes(" ".join(base), " ".join(other)), num_perm=256)
        assert abs((sigs[0] == sigs[1]).mean() - truth) < 0.1, (changed, truth)
    short = word_signatures(hashes("a b", "A, b.", ""), num_perm=32)
    assert (short[0] == short[1]).all() and (short[2] == np.iinfo(np.uint32).max).all()


# ----------------------------------------------------------------------------------------------------------------------
# Alignment: every stage keeps each text with the image it was written about
# ----------------------------------------------------------------------------------------------------------------------

def _true_class_by_image(raw: Path) -> dict[str, set[str]]:
    """sha256 of each exported image's bytes -> the tissue class(es) the world drew it as (`diagnosis.csv`); the
    store names every image by that digest, so a row's image path says which exported tile it is."""
    import csv
    import hashlib

    diagnosis = {r["id"]: r["diagnosis"] for r in csv.DictReader((raw / "diagnosis.csv").open(encoding="utf-8"))}
    by_image: dict[str, set[str]] = {}
    with (raw / "quilt_1M_lookup.csv").open(encoding="utf-8", newline="") as fh:
        for k, row in enumerate(csv.DictReader(fh)):
            sha = hashlib.sha256((raw / "images" / row["image_path"]).read_bytes()).hexdigest()
            by_image.setdefault(sha, set()).add(diagnosis[f"quilt-1m:{k}"])
    return by_image


def _text_class(kind: str, row: dict) -> str | None:
    """The tissue class a row's text says its image shows: a caption's diagnosis, an MCQ's answer option, or the
    last answer of a conversation (an MCQ letter read back through its options)."""
    import re

    from patho_r1.fixtures.synth import TISSUES
    from patho_r1.fixtures.teacher import diagnosis_of

    def named(text):
        return next((t.name for t in sorted(TISSUES, key=lambda t: -len(t.name)) if t.name in (text or "")), None)

    if kind == "caption":
        found = diagnosis_of(row["caption"])
        return found.name if found else None
    if kind == "mcq":
        return named(row["options"].get(row["answer"]))
    last = [m for m in row["messages"] if m["role"] == "assistant"][-1]["content"]
    answer = re.search(r"<answer>(.*?)</answer>", last, re.S).group(1).strip()
    if re.fullmatch(r"[A-F]", answer):
        user = [m for m in row["messages"] if m["role"] == "user"][-1]["content"]
        text = " ".join(p.get("text", "") for p in user) if isinstance(user, list) else user
        option = re.search(rf"^{answer}\. (.+)$", text, re.M)
        return named(option.group(1) if option else None)
    return named(answer)


def _aligned(path: Path, kind: str, by_image: dict[str, set[str]]) -> tuple[float, int]:
    """The share of a stage file's rows whose text names the true class of the image the row points at."""
    checked = ok = 0
    for row in iter_jsonl(path):
        cls = _text_class(kind, row)
        if cls is None or not row.get("images"):
            continue
        checked += 1
        ok += cls in by_image.get(Path(row["images"][0]).stem, set())
    return ok / max(checked, 1), checked


def test_every_stage_keeps_each_text_with_its_image(built, tmp_path):
    """The world knows the class of every tile it exported: after every stage (import, dedup, tag, cluster, the
    teacher's filtered conversations, the RL MCQs) at least 99% of rows name the class of the image they point at.
    (Import is the exception that proves the rule: its planted near-duplicate captions sit on other classes' tiles,
    until dedup removes them.)  The same check on a copy whose images were shuffled among its rows fails."""
    import random

    out, _, _, cluster, root = built
    by_image = _true_class_by_image(root / "raw")
    files = [(p, "caption") for p in sorted(cluster.parent.glob("*/caption.jsonl"))]
    files += [(out / "filter/kept.jsonl", "conversation"), (out / "mcq/mcq.jsonl", "mcq"),
              (out / "mcq-teacher/mcq.jsonl", "mcq")]
    assert len(files) == 7
    for path, kind in files:
        share, checked = _aligned(path, kind, by_image)
        assert checked >= 100, (path, checked)
        assert share >= (0.98 if path.parent.name.endswith("import") else 0.99), (path, share)
    rows = [json.loads(line) for line in (out / "filter/kept.jsonl").read_text().splitlines()]
    images = [r["images"] for r in rows]
    random.Random(0).shuffle(images)
    broken = tmp_path / "kept.jsonl"
    broken.write_text("".join(json.dumps({**r, "images": im}) + "\n" for r, im in zip(rows, images, strict=True)))
    share, _ = _aligned(broken, "conversation", by_image)
    assert share < 0.5, share  # about 1 in 12 by chance
