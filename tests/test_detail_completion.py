"""Detail completion at inference (OmniPath's prompt-guided completion as two passes): the crop is the original
image's pixels at the box the model named, or the finer slide level's region; bad first answers fall back to the
whole image and are counted; `eval bench --detail-completion` reports both accuracies, paired."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from patho_r1.data import MCQRecord
from patho_r1.eval.benchmarks import get_benchmark
from patho_r1.eval.detail_completion import (
    Budget,
    DetailConfig,
    crop_window,
    detail_view,
    evaluate_with_details,
    load_detail_config,
    two_pass,
)
from patho_r1.eval.generation import SamplingConfig

TINY = Budget(28 * 28 * 4, 28 * 28 * 16)  # the tiny model's budget: 56x56 to 112x112
EXACT = DetailConfig(padding=0.0, min_crop=1, max_crop_pixels=10**6)


def _box(*coords) -> str:
    return json.dumps([{"bbox_2d": list(coords), "label": "region"}])


def _png(path, pixels: np.ndarray) -> str:
    Image.fromarray(pixels).save(path)
    return str(path)


def _record(image: str, n: int = 0, **extra) -> MCQRecord:
    return MCQRecord(id=f"q{n}", question=f"Which tissue is this? ({n})", options={"A": "gland", "B": "stroma"},
                     answer="A", images=[image], **extra)


class Scripted:
    """Pass 1 (its prompt asks for a box) gets the next of `boxes`; a request with the detail image gets A if that
    image is a crop and B if it is the whole image; the ordinary one-image request gets B.  Keeps what it saw."""

    def __init__(self, boxes: list[str]):
        self.boxes, self.seen = iter(boxes), []

    def generate(self, requests, sampling):
        out = []
        for r in requests:
            text = r.messages[-1]["content"][-1]["text"]
            self.seen.append(r)
            if "Before you answer" in text:
                out.append(next(self.boxes))
            elif len(r.images) == 2:
                out.append("<think>x</think><answer>A</answer>" if "higher magnification" in text else
                           "<think>x</think><answer>B</answer>")
            else:
                out.append("<think>x</think><answer>B</answer>")
        return out


# ----------------------------------------------------------------------------------------------------------------------
# The crop
# ----------------------------------------------------------------------------------------------------------------------

def test_the_crop_is_the_original_images_pixels_at_the_box_the_model_named(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (500, 1000, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    # 1000 x 500 under a 112 x 112 budget: the model sees 140 x 56 (smart_resize: beta = sqrt(500000 / 12544),
    # floor(1000 / beta / 28) * 28 = 140, floor(500 / beta / 28) * 28 = 56), so its box [28, 14, 70, 42] is
    # [28 * 1000/140, 14 * 500/56, 70 * 1000/140, 42 * 500/56] = [200, 125, 500, 375] in the image's own pixels.
    crop, out = detail_view(_record("x"), image, _box(28, 14, 70, 42), EXACT, TINY)
    assert out.source == "image" and out.box == [200, 125, 500, 375] and out.window == [200, 125, 500, 375]
    assert crop.size == (300, 250) and np.array_equal(np.asarray(crop), pixels[125:375, 200:500])
    # A closer look: 140/1000 model pixels per image pixel before; the 300 x 250 crop is seen at 112 x 84
    # (beta = sqrt(75000 / 12544)), 112/300 per pixel: 8/3 times as many.
    assert out.zoom == pytest.approx(8 / 3, abs=1e-4)
    # By default the crop is sent within the model's own budget: shrunk (never enlarged) to at most 12544 pixels.
    shrunk, _ = detail_view(_record("x"), image, _box(28, 14, 70, 42), DetailConfig(padding=0, min_crop=1), TINY)
    assert shrunk.size == (122, 102)  # 300 x 250 scaled by sqrt(12544 / 75000) = 0.4090, floored
    small = np.asarray(Image.fromarray(pixels[125:375, 200:500]).resize((122, 102), Image.Resampling.LANCZOS))
    assert np.array_equal(np.asarray(shrunk), small)


@pytest.mark.parametrize("box, size, padding, min_crop, window", [
    ((10, 10, 14, 14), (100, 50), 0.5, 20, (2, 2, 22, 22)),  # padded by 2 a side to 8, grown about its centre to 20
    ((95, 45, 100, 50), (100, 50), 0.0, 20, (80, 30, 100, 50)),  # grown to 20, then moved inside the corner
    ((10.4, 3.6, 20.2, 7.5), (100, 50), 0.0, 1, (10, 3, 21, 8)),  # edges rounded outwards
    ((0, 0, 30, 30), (40, 25), 1.0, 1, (0, 0, 40, 25)),  # padding past the image: the whole image
])
def test_the_crop_window_is_padded_grown_to_its_minimum_and_kept_inside(box, size, padding, min_crop, window):
    assert crop_window(box, size, padding, min_crop) == window


def _tile_on_slide(tmp_path):
    """The world's good slide and a 64 x 64 tile of its level 2 (level-0 origin 256, 256; 4 level-0 pixels a tile
    pixel), as `curate wsi` would write the tile's row."""
    from patho_r1.fixtures.slides import write_slide_set

    slides = write_slide_set(tmp_path / "slides", which=("good",))
    tile = _png(tmp_path / "tile.png", slides.levels[2][64:128, 64:128])
    record = _record(tile, slide="good/good.tif", x=256, y=256, level=2, downsample=4.0)
    return slides, record


def test_from_a_slide_the_crop_is_the_finer_levels_region_read_straight_from_the_slide(tmp_path):
    from patho_r1.slides import open_slide

    slides, record = _tile_on_slide(tmp_path)
    image = Image.open(record.images[0]).convert("RGB")
    cfg = EXACT.model_copy(update={"slides_dir": str(slides.root), "max_crop_pixels": 28 * 28 * 16})
    # The tile is seen at 56 x 56: the box [14, 14, 42, 28] is [16, 16, 48, 32] in the tile, [320, 320, 448, 384]
    # at level 0.  Levels 0 and 1 are finer than the tile's; level 0's 128 x 64 crop fits 12544 pixels.
    crop, out = detail_view(record, image, _box(14, 14, 42, 28), cfg, TINY)
    assert (out.source, out.level, out.level_box, out.window) == ("slide", 0, [320, 320, 448, 384], [16, 16, 48, 32])
    assert np.array_equal(np.asarray(crop), slides.levels[0][320:384, 320:448])
    with open_slide(slides.good) as slide:
        assert np.array_equal(np.asarray(crop), slide.read_region(320, 320, 0, 128, 64))
        assert np.array_equal(np.asarray(image), slide.read_region(256, 256, 2, 64, 64))  # the tile is its level 2
    # 56 model pixels over 256 level-0 pixels before; 140 (128 x 64 is seen at 140 x 56) over 128 now: 5 times.
    assert out.zoom == pytest.approx(5.0)
    # With room for 4000 pixels only, level 1 (64 x 32 = 2048) is the finest that fits.
    crop, out = detail_view(record, image, _box(14, 14, 42, 28), cfg.model_copy(update={"max_crop_pixels": 4000}),
                            TINY)
    assert (out.level, out.level_box) == (1, [160, 160, 224, 192])
    assert np.array_equal(np.asarray(crop), slides.levels[1][160:192, 160:224])
    # 64 x 32 is below the minimum, so it is seen enlarged, at 84 x 56: 84/128 over 56/256 = 3 times.
    assert out.zoom == pytest.approx(3.0)


def test_a_slide_the_record_names_but_that_is_not_there_is_one_clear_error(tmp_path, monkeypatch):
    from patho_r1.errors import DataError

    _, record = _tile_on_slide(tmp_path)
    image = Image.open(record.images[0]).convert("RGB")
    with pytest.raises(DataError, match=r"bench.jsonl: field 'slide': item q0: slide 'good/good.tif' not found "
                                        r"\(give the slides folder: --slides DIR\)"):
        detail_view(record, image, _box(14, 14, 42, 28), EXACT, TINY, where="bench.jsonl")
    # a relative name is looked up in the slides folder only: not in the working directory, not above the folder
    monkeypatch.chdir(tmp_path / "slides")
    with pytest.raises(DataError, match=r"slide 'good/good.tif' not found \(give the slides folder"):
        detail_view(record, image, _box(14, 14, 42, 28), EXACT, TINY, where="bench.jsonl")
    escaping = record.model_copy(update={"slide": "../slides/good/good.tif"})
    cfg = EXACT.model_copy(update={"slides_dir": str(tmp_path / "slides" / "good")})
    with pytest.raises(DataError, match=r"field 'slide': item q0: slide '../slides/good/good.tif' leads outside"):
        detail_view(escaping, image, _box(14, 14, 42, 28), cfg, TINY, where="bench.jsonl")


# ----------------------------------------------------------------------------------------------------------------------
# The two passes
# ----------------------------------------------------------------------------------------------------------------------

BAD_FIRST_ANSWERS = [
    ("I would look at the glands.", "malformed"),  # not JSON
    ("[]", "empty"),
    ('[{"bbox_2d": [1, 2], "label": "x"}]', "malformed"),  # not four numbers
    (_box(40, 40, 10, 10), "malformed"),  # x2 < x1
    (_box(200, 200, 260, 260), "outside"),  # beyond the 56 x 56 image the model saw
]


def test_bad_first_answers_fall_back_to_the_whole_image_are_counted_and_both_accuracies_are_paired(tmp_path):
    pixels = np.random.default_rng(1).integers(0, 256, (60, 60, 3), dtype=np.uint8)
    image = _png(tmp_path / "img.png", pixels)
    records = [_record(image, n) for n in range(7)]
    model = Scripted([a for a, _ in BAD_FIRST_ANSWERS] + [_box(0, 0, 28, 28), _box(28, 28, 56, 56)])
    result = evaluate_with_details(get_benchmark("mcq"), records, model, SamplingConfig(batch_size=2),
                                   DetailConfig(padding=0, min_crop=1), budget=TINY)
    reasons = [(o.source, o.reason) for o in result["outcomes"]]
    assert reasons == [("fallback", r) for _, r in BAD_FIRST_ANSWERS] + [("image", None)] * 2
    detail = result["detail"]
    assert (detail["n"], detail["cropped"], detail["fell_back"], detail["from_slide"]) == (7, 2, 5, 0)
    assert detail["fallback_reasons"] == {"empty": 1, "malformed": 3, "outside": 1}
    # The second pass got two images each: the whole image (fallbacks) or the crop [0, 0, 30, 30] (60 px seen as 56)
    second = [r for r in model.seen if len(r.images) == 2]
    assert len(second) == 7 and all(np.array_equal(np.asarray(r.images[0]), pixels) for r in second)
    assert all(np.array_equal(np.asarray(r.images[1]), pixels) for r in second[:5])
    assert np.array_equal(np.asarray(second[5].images[1]), pixels[0:30, 0:30])
    assert [p["type"] for p in second[5].messages[-1]["content"]] == ["image", "image", "text"]
    # The ordinary answers (B) are all wrong; with a crop the scripted model answers A: 0/7 -> 2/7, paired.
    paired = result["paired"]
    assert (paired["n"], paired["without"]["accuracy"], paired["with"]["accuracy"]) == (7, 0.0, round(2 / 7, 4))
    assert paired["mcnemar"]["gained"] == 2 and paired["mcnemar"]["lost"] == 0
    assert paired["mcnemar"]["p_value"] == pytest.approx(0.5)  # two discordant pairs, both one way: 2 * (1/2)^2
    assert result["with"][0]["n"] == result["without"][0]["n"] == 7


def test_the_second_pass_of_a_tile_carries_the_slides_finer_region(tmp_path):
    slides, record = _tile_on_slide(tmp_path)
    model = Scripted([_box(14, 14, 42, 28)])
    cfg = EXACT.model_copy(update={"slides_dir": str(slides.root), "max_crop_pixels": 12544})
    done = two_pass([record], lambda r: get_benchmark("mcq").request(r, "cot"), model, SamplingConfig(), cfg, TINY)
    assert done.counts["from_slide"] == 1 and done.outcomes[0].level == 0
    assert np.array_equal(np.asarray(model.seen[-1].images[1]), slides.levels[0][320:384, 320:448])
    assert "at a higher magnification" in model.seen[-1].messages[-1]["content"][-1]["text"]


class GoldWhenLookingCloser:
    """A grounding model that answers the gold boxes only when it has the detail image (and names the gold as the
    region to look at): what detail completion is for, so the paired F1 is known."""

    def __init__(self, records):
        from patho_r1.data import load_image

        self.gold = {np.asarray(load_image(r.images[0])).tobytes(): r.answer for r in records}

    def generate(self, requests, sampling):
        out = []
        for r in requests:
            closer = len(r.images) == 2 or "Before you answer" in r.messages[-1]["content"][-1]["text"]
            out.append(f"<answer>{self.gold[np.asarray(r.images[0]).tobytes()] if closer else '[]'}</answer>")
        return out


def test_the_grounding_eval_reports_f1_without_and_with_detail_completion_paired(tmp_path):
    from patho_r1.data import load_records
    from patho_r1.eval.detail_completion import evaluate_grounding_with_details
    from patho_r1.fixtures.grounding import GroundingConfig, generate_grounding_world

    generate_grounding_world(tmp_path, seed=3, config=GroundingConfig(n_train=0, n_heldout=6))
    records = load_records(tmp_path / "rl/heldout.jsonl", "mcq")
    out = evaluate_grounding_with_details(GoldWhenLookingCloser(records), records, SamplingConfig(), DetailConfig(),
                                          budget=TINY)
    negatives = [r.answer == "[]" for r in records]
    assert sum(negatives) == 2  # this seed's world asks two questions about kinds its scenes lack
    # Without the crop the model answers [] everywhere: F1 1 on the negatives, 0 on the rest; with it, 1 everywhere.
    assert out["without"]["per_item_f1"] == [1.0 if neg else 0.0 for neg in negatives]
    assert out["with"]["per_item_f1"] == [1.0] * len(records) and out["with"]["overall"]["f1"] == 1.0
    assert out["paired"]["diff"] == pytest.approx(4 / 6)
    # A negative's first answer is [] (no region): it falls back; every other item is cropped.
    assert out["detail"]["fallback_reasons"] == {"empty": 2} and out["detail"]["cropped"] == 4


def test_the_prompt_templates_are_data_and_a_template_without_its_field_is_refused(tmp_path):
    from patho_r1.errors import ConfigError

    path = tmp_path / "detail.yaml"
    path.write_text("locate_prompt: 'Where to zoom for: {question}'\npadding: 0.25\n")
    cfg = load_detail_config(path, slides_dir="slides/")
    assert cfg.locate_prompt == "Where to zoom for: {question}" and cfg.padding == 0.25 and cfg.slides_dir == "slides/"
    path.write_text("answer_prompt: 'no field here'\n")
    with pytest.raises(ConfigError, match=r"answer_prompt: must hold \{prompt\}"):
        load_detail_config(path)


# ----------------------------------------------------------------------------------------------------------------------
# End to end on the tiny model
# ----------------------------------------------------------------------------------------------------------------------

def test_eval_bench_with_detail_completion_runs_the_tiny_model_and_writes_both_accuracies(tiny_model_dir, tmp_path,
                                                                                          capsys, monkeypatch):
    """The real tiny model answers every pass; its first answer for q0 and q1 is replaced by a box (a random model
    writes none), so the batch holds a real crop beside a fallback, images of different sizes, through the real
    processor."""
    from patho_r1.eval import benchmarks
    from patho_r1.launch.cli import main

    real = benchmarks.load_generator

    def box_for_two(model, engine):
        generator, tokenizer, processor = real(model, engine)

        class FirstTwoPointed:
            def __init__(self):
                self.processor, self.sizes = generator.processor, []

            def generate(self, requests, sampling):
                out = generator.generate(requests, sampling)
                self.sizes += [[im.size for im in r.images] for r in requests if len(r.images) == 2]
                texts = [r.messages[-1]["content"][-1]["text"] for r in requests]
                return [_box(0, 0, 56, 42) if "Before you answer" in t and ("(0)" in t or "(1)" in t) else o
                        for t, o in zip(texts, out, strict=True)]

        box_for_two.made = FirstTwoPointed()
        return box_for_two.made, tokenizer, processor

    monkeypatch.setattr(benchmarks, "load_generator", box_for_two)
    rng = np.random.default_rng(2)
    rows = [{"id": f"q{n}", "question": f"Which tissue is this? ({n})", "options": {"A": "gland", "B": "stroma"},
             "answer": "AB"[n % 2], "images": [_png(tmp_path / f"{n}.png", rng.integers(0, 256, (300, 400, 3),
                                                                                          dtype=np.uint8))]}
            for n in range(4)]
    data = tmp_path / "mcq.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out, config = tmp_path / "bench", tmp_path / "detail.yaml"
    config.write_text("locate_max_new_tokens: 12\npadding: 0.2\n")  # a random model writes no box: keep it short
    assert main(["eval", "bench", "--name", "mcq", "--data", str(data), "--model", str(tiny_model_dir), "--out",
                 str(out), "--max-new-tokens", "6", "--prompt", "direct", "--detail-completion", "--detail-config",
                 str(config)]) == 0
    without = json.loads((out / "results.json").read_text())["report"]
    with_ = json.loads((out / "detail-completion/results.json").read_text())["report"]
    comparison = json.loads((out / "detail-completion/comparison.json").read_text())
    assert without["n"] == with_["n"] == comparison["paired"]["n"] == 4
    assert not without["detail_completion"] and with_["detail_completion"]
    assert comparison["paired"]["without"]["accuracy"] == without["overall"]["accuracy"]
    assert comparison["paired"]["with"]["accuracy"] == with_["overall"]["accuracy"]
    detail = comparison["detail"]
    assert detail["budget"] == {"min_pixels": 3136, "max_pixels": 12544}  # read from the tiny model's processor
    assert detail["from_image"] >= 2 and detail["cropped"] + detail["fell_back"] == 4
    details = [json.loads(line) for line in (out / "detail-completion/details.jsonl").read_text().splitlines()]
    assert [d["id"] for d in details] == ["q0", "q1", "q2", "q3"]
    # 400 x 300 is seen at 112 x 84: the box [0, 0, 56, 42] is [0, 0, 200, 150]; padded by 0.2 and kept inside,
    # [0, 0, 280, 210]; 58800 pixels shrunk to 12544 (x 0.4619): 129 x 96, seen at 140 x 84.  Zoom: 140/280 model
    # pixels per image pixel against 112/400: 1.7857.
    for d in details[:2]:
        assert (d["source"], d["window"], d["crop_size"]) == ("image", [0, 0, 280, 210], [129, 96])
        assert d["zoom"] == pytest.approx(0.5 / 0.28, abs=1e-4)
    assert box_for_two.made.sizes[:2] == [[(400, 300), (129, 96)]] * 2  # pass 2 of q0, q1: the image and the crop
    assert comparison["config"]["padding"] == 0.2 and comparison["config"]["locate_max_new_tokens"] == 12
    printed = capsys.readouterr().out
    assert "accuracy without" in printed and "with detail completion" in printed and "fell back" in printed
