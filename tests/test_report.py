"""The run report (tables, plots, one-page HTML) redrawn from a run folder, and the console's progress display."""

import base64
import io
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console

from patho_r1.launch.console import MetricsTail, RunConsole
from patho_r1.launch.report import STATE_FILE, write_report


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def run_dir(tmp_path):
    """A finished run's folder, in the layout `patho-r1 run` writes."""
    root = tmp_path / "demo"
    phases = {"cpt": "cpt", "sft": "sft", "rl": "rl", "embed": "embed", "eval": "eval"}
    state = {"recipe": "demo", "recipe_hash": "abc123", "phases": {
        name: {"name": name, "type": kind, "status": "done", "seconds": 10.0 + i, "metrics": {},
               "output_dir": str(root / name)} for i, (name, kind) in enumerate(phases.items())}}
    root.mkdir()
    (root / STATE_FILE).write_text(json.dumps(state))
    for name in ("cpt", "sft"):
        _jsonl(root / name / "metrics.jsonl", [{"phase": name, "step": s, "total": 30, "loss": 3.0 / s, "time": s}
                                              for s in (10, 20, 30)])
    _jsonl(root / "rl/metrics.jsonl", [
        {"phase": "rl", "step": s, "total": 20, "loss": 0.01, "reward": 1.0 + s / 20, "rewards/format/mean": 0.9,
         "rewards/accuracy/mean": s / 40, "completions/mean_length": 30.0 - s, "completions/min_length": 5.0,
         "completions/max_length": 48.0, "dynamic_sampling/filtered_frac": 0.5 - s / 50,
         "dynamic_sampling/rounds": 2.0, "time": s} for s in (5, 10, 15, 20)])
    _jsonl(root / "embed/metrics.jsonl", [{"phase": "embed", "stage": st, "step": s, "total": 4, "loss": 2.0 / s}
                                          for st in ("stage1", "stage2") for s in (2, 4)])
    (root / "embed/eval").mkdir(parents=True)
    (root / "embed/eval/metrics.json").write_text(json.dumps({"tasks": {
        t: {"recall@1": 0.5, "recall@5": 0.8, "recall@10": 0.9, "chance@1": 0.1, "simple_add_recall@1": 0.3}
        for t in ("it2i", "it2t")}}))
    (root / "eval").mkdir()
    (root / "eval/summary.json").write_text(json.dumps({
        label: {"n": 60, "accuracy": acc, "strict_accuracy": acc, "format_rate": 1.0, "chance": 0.2,
                "mean_response_tokens": 20.0, "wrong_image_accuracy": 13 / 60}
        for label, acc in (("base", 0.0), ("sft", 38 / 60))}))
    (root / "eval/paired.json").write_text(json.dumps([{"from": "base", "to": "sft", "gained": 38, "lost": 0,
                                                        "p_value": 2 * 0.5 ** 38}]))
    return root


def _wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval, by its formula (Wilson 1927)."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def test_report_draws_every_plot_and_links_them(run_dir):
    numbers = write_report(run_dir)
    expected = ["cpt_training.png", "sft_training.png", "rl_training.png", "embed_training.png", "rl_rewards.png",
                "rl_length.png", "rl_dynamic_sampling.png", "accuracy.png",
                "embed_retrieval.png"]
    for name in expected:
        png = run_dir / "plots" / name
        assert png.is_file() and png.stat().st_size > 5_000, name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (run_dir / "report.md").read_text()
    for name in expected:
        assert f"](plots/{name})" in markdown, name
    page = (run_dir / "report.html").read_text()
    inline = page.count("src='data:image/png;base64,")
    assert inline == len(expected)
    first = page.split("base64,")[1].split("'")[0]
    assert base64.b64decode(first)[:4] == b"\x89PNG"
    assert "<table>" in page and "<td>sft</td>" in page
    lo, hi = _wilson(38, 60)
    assert numbers["mcq"]["sft"]["ci95"] == pytest.approx([lo, hi], abs=1e-9)
    assert f"| sft | 60 | 0.633 | {lo:.2f}-{hi:.2f} | 0.217 |" in markdown and 0.50 < lo < hi < 0.76
    assert "| base | sft | 38 | 0 | 7.3e-12 |" in markdown  # 2 * 0.5**38, McNemar's exact p
    assert numbers["wall_time_s"]["rl"] == 12.0 and "training" not in json.loads((run_dir / "report.json").read_text())


def test_patho_r1_report_redraws_a_past_run(run_dir):
    out = subprocess.run([sys.executable, "-m", "patho_r1.launch.cli", "report", str(run_dir)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert (run_dir / "plots/sft_training.png").is_file() and (run_dir / "report.html").is_file()
    bad = subprocess.run([sys.executable, "-m", "patho_r1.launch.cli", "report", str(run_dir / "nope")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no run_state.json" in bad.stderr and "Traceback" not in bad.stderr


def _write_rows_slowly(path: Path, rows: list[dict], pause: float) -> threading.Thread:
    def write():
        with path.open("a") as fh:
            for row in rows:
                fh.write(json.dumps(row))
                fh.flush()
                time.sleep(pause / 2)
                fh.write("\n")  # a row is read only once its line is complete
                fh.flush()
                time.sleep(pause / 2)

    thread = threading.Thread(target=write)
    thread.start()
    return thread


def test_plain_progress_lines_with_rate_eta_and_metrics(tmp_path):
    out = io.StringIO()
    console = RunConsole(console=Console(file=out, force_terminal=False, width=200), poll_s=0.02)
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "total": 100, "time": s / 10, "loss": 1.0 / s} for s in range(10, 101, 10)]
    with console.phase_progress("sft", path, ("loss",)):
        _write_rows_slowly(path, rows, 0.02).join()
        time.sleep(0.1)
    lines = out.getvalue().splitlines()
    assert [line.split()[2] for line in lines] == ["30/100", "50/100", "80/100"]  # one line per quarter reached
    assert lines[0] == "  sft step 30/100 (30%) 10.00 step/s ETA 0:07  loss=0.0333"


def test_terminal_progress_is_a_live_bar(tmp_path):
    out = io.StringIO()
    console = RunConsole(console=Console(file=out, force_terminal=True, width=160), poll_s=0.02)
    path = tmp_path / "metrics.jsonl"
    with console.phase_progress("rl", path, ("reward", "dynamic_sampling/filtered_frac")):
        _write_rows_slowly(path, [{"step": s, "total": 40, "reward": 1.5, "dynamic_sampling/filtered_frac": 0.25}
                                  for s in (10, 20)], 0.05).join()
        time.sleep(0.2)
    screen = out.getvalue()
    assert "20/40" in screen and "reward=1.5" in screen and "filtered_frac=0.25" in screen and "ETA" in screen


def test_metrics_tail_reads_only_complete_new_rows(tmp_path):
    path = tmp_path / "m.jsonl"
    tail = MetricsTail(path)
    assert tail.new_rows() == []
    path.write_text('{"step": 1}\n{"step": 2')
    assert tail.new_rows() == [{"step": 1}]
    with path.open("a") as fh:
        fh.write('}\n')
    assert tail.new_rows() == [{"step": 2}] and tail.new_rows() == []


def test_worker_output_goes_to_its_log_file_then_comes_back(tmp_path):
    log = tmp_path / "logs/sft.rank0.log"
    code = f"""
import logging, os, sys, warnings
from pathlib import Path
from patho_r1.launch.console import worker_output
with worker_output(Path({str(log)!r})):
    print("from python")
    os.write(2, b"from C\\n")
    logging.getLogger("transformers").warning("from a library")
    warnings.warn("deprecated thing", FutureWarning)
print("back on the console")
try:
    with worker_output(Path({str(log)!r})):
        raise RuntimeError("worker broke")
except RuntimeError:
    pass
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONWARNINGS": "default"})
    assert out.returncode == 0, out.stderr
    assert out.stdout == "back on the console\n" and out.stderr == ""
    text = log.read_text()
    for needle in ("from python", "from C", "from a library", "deprecated thing", "RuntimeError: worker broke"):
        assert needle in text, needle


def test_metrics_tail_skips_rows_of_an_earlier_attempt(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 40}\n')  # the attempt being resumed
    tail = MetricsTail(path)
    with path.open("a") as fh:
        fh.write('{"step": 41}\n')
    assert tail.new_rows() == [{"step": 41}]


def test_two_eval_phases_keep_their_own_rows(run_dir):
    from patho_r1.launch.report import collect

    state = json.loads((run_dir / STATE_FILE).read_text())
    state["phases"]["eval-curated"] = {"name": "eval-curated", "type": "eval", "status": "done", "seconds": 1.0,
                                       "metrics": {}, "output_dir": str(run_dir / "eval-curated")}
    (run_dir / STATE_FILE).write_text(json.dumps(state))
    (run_dir / "eval-curated").mkdir()
    (run_dir / "eval-curated/summary.json").write_text(json.dumps({"sft": {
        "n": 10, "accuracy": 0.3, "strict_accuracy": 0.3, "format_rate": 1.0, "chance": 0.25}}))
    report = collect(run_dir)
    assert report["mcq"]["eval: sft"]["n"] == 60 and report["mcq"]["eval-curated: sft"]["n"] == 10
    assert report["paired"][0]["from"] == "eval: base"


def test_a_class_that_falls_beyond_its_intervals_is_flagged_with_where_its_items_went():
    from patho_r1.eval.stats import wilson_interval
    from patho_r1.launch.report import class_lines

    def classes(per_class: dict[str, tuple[int, int]], confusion_rows: list[list[int]]) -> dict:
        return {"balanced_accuracy": round(sum(k / n for k, n in per_class.values()) / len(per_class), 4),
                "per_class": {c: {"n": n, "accuracy": k / n, "ci95": list(wilson_interval(k, n))}
                              for c, (k, n) in per_class.items()},
                "confusion": {"rows": list(per_class), "columns": [*per_class, "(none)"], "matrix": confusion_rows}}

    # necrosis 95/178 -> 37/178 (intervals apart: flagged), stroma 120/170 -> 170/170 (a rise), 3 classes
    sft = classes({"necrosis": (95, 178), "stroma": (120, 170), "tumour": (50, 100)},
                  [[95, 80, 3, 0], [50, 120, 0, 0], [10, 40, 50, 0]])
    rl = classes({"necrosis": (37, 178), "stroma": (170, 170), "tumour": (47, 100)},
                 [[37, 97, 40, 4], [0, 170, 0, 0], [13, 40, 47, 0]])
    paired = [{"from": "sft", "to": "rl", "gained": 90, "lost": 70, "p_value": 0.13, "per_class": {
        "necrosis": {"gained": 2, "lost": 60, "p_value": 1.1e-15, "n": 178},
        "stroma": {"gained": 50, "lost": 0, "p_value": 1.8e-15, "n": 170},
        "tumour": {"gained": 5, "lost": 8, "p_value": 0.58, "n": 100}}}]
    lines = class_lines({"sft": {"classes": sft}, "rl": {"classes": rl}, "base": {"classes": None}}, paired)
    text = "\n".join(lines)
    assert "| class | sft | rl |" in text and "| necrosis | 0.53 | 0.21 |" in text
    assert f"| balanced accuracy | {sft['balanced_accuracy']:.3f} | {rl['balanced_accuracy']:.3f} |" in text
    # the per-class change with the class's own paired test
    assert "| class | sft → rl |" in text
    assert f"| necrosis | {37 / 178 - 95 / 178:+.2f} (+2/-60, p 1.1e-15) |" in text
    assert "| tumour | -0.03 (+5/-8, p 0.58) |" in text
    flagged = [line for line in lines if "fell" in line]
    assert flagged == ["**necrosis fell** from 0.53 (sft) to 0.21 (rl), beyond both 95% intervals (paired test on "
                       "its items: p 1.1e-15); answered 'stroma' on 97 of 178"]  # tumour: inside the intervals
    assert class_lines({"sft": {"n": 3}}) == []
    # the last checkpoint of one benchmark and the first of the next (another eval phase) are not a step
    empty = classes({"necrosis": (0, 178), "stroma": (0, 170), "tumour": (0, 100)},
                    [[0, 0, 0, 178], [0, 0, 0, 170], [0, 0, 0, 100]])
    for second_phase, flags in (("eval-curated", 0), ("eval", 3)):
        lines = class_lines({"eval: rl": {"classes": sft, "eval_phase": "eval"},
                             f"{second_phase}: cpt": {"classes": empty, "eval_phase": second_phase}})
        assert len([line for line in lines if "fell" in line]) == flags


@pytest.mark.parametrize("original", ["kept", "gone"])
def test_a_copied_or_moved_run_reports_itself_and_a_damaged_one_keeps_its_report(run_dir, tmp_path, original,
                                                                                  capsys):
    import shutil

    from patho_r1.launch.cli import main

    write_report(run_dir)
    before = (run_dir / "report.md").read_text()
    copy = tmp_path / "elsewhere" / "demo"
    shutil.copytree(run_dir, copy)
    if original == "gone":  # rsync'd off the cluster: the recorded absolute paths lead nowhere
        shutil.rmtree(run_dir)
    else:  # the original still there, different: the copy must not read it
        (run_dir / "eval/summary.json").write_text(json.dumps({}))
    assert main(["report", str(copy)]) == 0
    assert (copy / "report.md").read_text().replace(str(copy), "RUN") == before.replace(str(run_dir), "RUN")
    assert "| sft | 60 | 0.633 |" in (copy / "report.md").read_text()
    capsys.readouterr()
    # a damaged folder: one line, exit 2, and the old report byte for byte, plots included
    kept = {p: p.read_bytes() for p in [copy / "report.md", copy / "report.html", copy / "report.json",
                                        *sorted((copy / "plots").iterdir())]}
    (copy / "sft/metrics.jsonl").write_text('{"phase": "sft", "step": 10, "loss": \n')
    assert main(["report", str(copy)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "sft/metrics.jsonl:1" in err and "Traceback" not in err
    assert {p: p.read_bytes() for p in kept} == kept and not list(copy.glob(".report-*"))
    (copy / STATE_FILE).write_text("{not json")
    assert main(["report", str(copy)]) == 2
    assert "run_state.json: not a readable run state" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in kept} == kept


def _write_samples(run_dir: Path) -> None:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (128, 128), (200, 100, 150)).save(buffer, format="PNG")
    thumb = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    reasoning = "<think>" + " ".join(["eosinophilic debris with ghost outlines of cells"] * 12) + "</think>"
    samples = [{"id": f"mcq:{i}", "question": "Which tissue type is shown in this H&E tile?", "answer": "B",
                "options": {"A": "benign fibrous stroma", "B": "coagulative necrosis"}, "thumbnail": thumb,
                "responses": {label: {"response": reasoning + "<answer>A</answer>" + "x" * 80, "prediction": "A",
                                      "correct": False} for label in ("base", "sft")}} for i in range(2)]
    (run_dir / "eval/samples.json").write_text(json.dumps(samples))


def _browser() -> str | None:
    import shutil

    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.parametrize("width", [1400, 390])
def test_the_report_page_fits_the_screen_in_a_real_browser(run_dir, tmp_path, width):
    """Headless Chromium lays the page out at a desktop and a phone width (the page in an iframe of that width, read
    by its parent page): nothing wider than the screen outside the tables' own scroll boxes, every image loaded,
    every table with a header row, no raw Markdown."""
    browser = _browser()
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("CI installs Debian's chromium (.ci/run): the browser check must run there")
        pytest.skip("needs chromium (apt-get install chromium)")
    _write_samples(run_dir)  # long responses and a thumbnail: the part of the page most likely to overflow a phone
    write_report(run_dir)
    page = (run_dir / "report.html").read_text()
    assert "<meta name='viewport'" in page and "`" not in page and "**" not in page
    assert page.count("<table>") == page.count("<thead>") == page.count("<div class='scroll'><table>") >= 3
    probe = tmp_path / "probe.html"
    probe.write_text(
        f"<!doctype html><html><body style='margin:0'><iframe id='f' src='{(run_dir / 'report.html').as_uri()}' "
        f"style='width:{width}px;height:900px;border:0'></iframe><script>"
        "document.getElementById('f').addEventListener('load', () => {"
        " const f = document.getElementById('f'), d = f.contentDocument, w = f.contentWindow;"
        " const out = document.createElement('pre'); out.id = 'layout';"
        " out.textContent = JSON.stringify({scroll: d.documentElement.scrollWidth, width: w.innerWidth,"
        "   images: [...d.images].map(i => i.complete && i.naturalWidth > 0)});"
        " document.body.appendChild(out); });</script></body></html>")
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
                          f"--window-size={width + 100},1000", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    layout = json.loads(dom.split("<pre id=\"layout\">", 1)[1].split("</pre>", 1)[0])
    assert layout["width"] == width and layout["scroll"] <= width, layout
    assert layout["images"] and all(layout["images"]), layout


def test_the_context_section_names_what_produced_the_numbers(run_dir):
    from patho_r1.launch.context import run_context

    context = run_context()
    assert {"torch", "transformers", "trl", "ray", "patho-r1"} <= set(context["versions"])
    assert context["hardware"]["cpus"] == os.cpu_count()
    state = json.loads((run_dir / STATE_FILE).read_text())
    state["context"] = {**context, "finished": "later"}
    (run_dir / STATE_FILE).write_text(json.dumps(state))
    write_report(run_dir)
    text = (run_dir / "report.md").read_text()
    assert f"- source commit `{context['commit'] or 'not a git checkout'}`" in text
    assert f"torch {context['versions']['torch']}" in text and "last phase finished later" in text
    # steps/s from the phase's own rows: sft logged up to step 30 in 11 s
    assert f"| sft | 11.0 | {30 / 11:.2f} |" in text


def test_a_confusion_matrix_is_drawn_for_each_checkpoint_scored_on_a_classification_set(run_dir):
    summary = json.loads((run_dir / "eval/summary.json").read_text())
    summary["sft"]["classes"] = {"balanced_accuracy": 0.6, "per_class": {
        c: {"n": 30, "accuracy": a, "ci95": [a - 0.1, a + 0.1]} for c, a in (("necrosis", 0.4), ("stroma", 0.8))},
        "confusion": {"rows": ["necrosis", "stroma"], "columns": ["necrosis", "stroma", "(none)"],
                      "matrix": [[12, 17, 1], [6, 24, 0]]}}
    (run_dir / "eval/summary.json").write_text(json.dumps(summary))
    write_report(run_dir)
    assert (run_dir / "plots/confusion_sft.png").stat().st_size > 1000
    assert not (run_dir / "plots/confusion_base.png").exists()  # base has no class table
    assert "](plots/confusion_sft.png)" in (run_dir / "report.md").read_text()


def test_training_figures_put_stages_on_their_own_axes_and_a_decaying_loss_on_a_log_scale(run_dir):
    from patho_r1.launch import plots

    sft = [{"step": s, "loss": 5.0 * 0.9 ** s, "learning_rate": 1e-3, "grad_norm": 2.0 / s, "entropy": 1.5}
           for s in range(1, 61)]
    panels = plots.training_panels(sft)
    assert [p.title for p in panels] == ["loss", "learning rate", "gradient norm", "token entropy"]
    assert not panels[1].log  # a learning rate stays linear
    assert panels[0].log and panels[2].log and not panels[3].log  # 5 -> 0.009 spans decades; a constant does not
    assert not plots.training_panels([{"step": s, "learning_rate": 10.0 ** -s} for s in range(1, 6)])[0].log
    embed = [{"stage": st, "step": s, "loss": 2.0 / s, "learning_rate": 1e-3 / s} for st in ("stage1", "stage2")
             for s in (1, 2, 3)]
    assert [p.title for p in plots.training_panels(embed)] == ["loss (stage1)", "loss (stage2)",
                                                               "learning rate (stage1)", "learning rate (stage2)"]
    rl = [{"step": s, "loss": (-1) ** s * 0.01, "clip_ratio/region_mean": 0.02} for s in range(1, 5)]
    assert [(p.title, p.log) for p in plots.training_panels(rl)] == [("loss", False),
                                                                     ("clip ratio (outside the region)", False)]
    # the centred moving average, and on a log axis the geometric one
    assert plots.smoothed([0.0, 3.0, 6.0, 30.0], window=3) == [1.5, 3.0, 13.0, 18.0]
    assert plots.smoothed([1.0, 100.0, 1.0], window=3, log=True) == pytest.approx([10.0, 100 ** (1 / 3), 10.0])
    assert plots.smoothed([1.0, 2.0]) == [1.0, 2.0]  # a short series is left as logged
    write_report(run_dir)
    text = (run_dir / "report.md").read_text()
    assert "](plots/embed_training.png)" in text and "each stage on its own axis" in text
    assert "it2i: an image and a modifying text to an image" in text


def test_sample_generations_show_each_checkpoint_on_the_same_items(run_dir):
    import base64

    from PIL import Image

    from patho_r1.launch.report import render_html

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 100, 150)).save(buffer, format="PNG")
    thumb = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    item = {"id": "mcq:7", "question": "Which tissue? | a *pipe*", "options": {"A": "stroma", "B": "necrosis"},
            "answer": "B", "thumbnail": thumb, "responses": {
                "base": {"response": "", "prediction": "", "correct": False},
                "sft": {"response": "<think>pale debris `x`</think><answer>B</answer>", "prediction": "B",
                        "correct": True}}}
    (run_dir / "eval/samples.json").write_text(json.dumps([item]))
    write_report(run_dir)
    text = (run_dir / "report.md").read_text()
    assert "## Sample generations (eval)" in text and "### mcq:7" in text
    assert "- **sft** (right, read 'B'): `` <think>pale debris `x`</think><answer>B</answer> ``" in text
    assert "- **base** (wrong, read '')" in text and "Gold: **B**" in text
    assert "samples" not in json.loads((run_dir / "report.json").read_text())
    from patho_r1.launch.report import collect

    page = render_html(collect(run_dir), {})
    assert f'<img src="{thumb}" alt="mcq:7"' in page  # the thumbnail is inline, the page stays one file
    assert "&lt;think&gt;pale debris" in page  # the model's tags shown as text, not parsed as HTML


def test_a_detection_phase_shows_its_rows_intervals_paired_tests_and_classes(run_dir):
    """A `detection` phase's folder (eval.detection_phase) beside an MCQ eval: its own section, numbers by hand."""
    from patho_r1.eval.detection import DetectionItem, score_detection
    from patho_r1.eval.detection_phase import paired_tests, row_numbers
    from patho_r1.launch.report import phase_headline
    from patho_r1.rewards.grounding import Box

    hit, miss = Box((0, 0, 10, 10)), Box((20, 20, 30, 30))
    answers = {"sft": [[hit], [miss], [miss]], "rl": [[hit], [hit], [miss]]}
    reports = {label: score_detection([DetectionItem(c, t, p) for c, t, p in
                                       zip("aba", [[hit], [hit], [miss]], boxes, strict=True)])
               for label, boxes in answers.items()}
    summary = {label: {"role": "checkpoint", **row_numbers(r, n_resamples=500)} for label, r in reports.items()}
    out = run_dir / "ground/detection"
    out.mkdir(parents=True)
    (out / "summary.json").write_text(json.dumps(summary))
    (out / "paired.json").write_text(json.dumps(paired_tests(reports, [("sft", "rl")], n_resamples=500)))
    state = json.loads((run_dir / STATE_FILE).read_text())
    state["phases"]["ground"] = {"name": "ground", "type": "detection", "status": "done", "seconds": 2.0,
                                 "metrics": {}, "output_dir": str(run_dir / "ground")}
    (run_dir / STATE_FILE).write_text(json.dumps(state))
    numbers = write_report(run_dir)
    text = (run_dir / "report.md").read_text()
    assert "## Referring detection (ground)" in text and "## Held-out MCQ" in text
    assert "| ground | 2.0 | - | [detection](ground/detection) |" in text  # the phase's folder, linked
    # sft: 2 of its 3 boxes right, 2 of 3 targets found: P = R = F1 = 2/3; per prompt F1 and IoU 1, 0, 1
    ci = summary["sft"]["f1_ci95"]
    assert ci == [0.0, 1.0]  # three prompts: a resample of the miss alone (1 in 27) and of the hits alone
    assert "| sft | 3 | 0.667 | 0.00 to 1.00 | 0.667 | 0.667 | 0.667 |" in text
    assert "| rl | 3 | 1.000 | 1.00 to 1.00 | 1.000 | 1.000 | 1.000 | 1.00 to 1.00 |" in text
    assert "| sft | rl | 3 | +0.333 |" in text  # mean per-prompt F1 2/3 -> 1
    assert "| a | sft | 2 | 1.000 |" in text and "| b | sft | 1 | 0.000 |" in text  # per class
    assert numbers["detection"]["ground"]["summary"]["sft"]["f1"] == 2 / 3 and "sft" in numbers["mcq"]
    assert phase_headline(run_dir / "ground", {}, "detection") == "F1@0.5 sft=0.67 rl=1.00  mean IoU sft=0.67 rl=1.00"
