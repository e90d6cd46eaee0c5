"""Region answers: the grounding record kind, box conversion through the processor's resize, the COCO and CSV
importers, the grounding reward, the detection scorer (AP by pycocotools) and the synthetic world's scenes."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from PIL import Image

from patho_r1.boxes import answer_json, resized_size, round_trip_bound, to_original, to_resized
from patho_r1.data import GroundingRecord, load_records, parse_record
from patho_r1.errors import DataError
from patho_r1.eval.detection import DetectionItem, score_detection
from patho_r1.fixtures.grounding import (
    STRUCTURE_BY_KEY,
    STRUCTURES,
    GroundingConfig,
    generate_grounding_world,
    make_scene,
    render_scene,
    structure_mask,
)
from patho_r1.formats import ImportOptions, get_format
from patho_r1.grounding_formats import write_boxes_csv, write_coco
from patho_r1.rewards import build_rewards
from patho_r1.rewards.grounding import Box, GroundingReward, iou_matrix, match_boxes, parse_boxes

TINY = {"min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 16}
SIZES = [(150, 200), (230, 170), (250, 130), (97, 61), (1000, 333)]  # none of them all multiples of 28


def _answer(*boxes, label="necrotic region") -> str:
    return json.dumps([{"bbox_2d": list(b), "label": label} for b in boxes])


# ----------------------------------------------------------------------------------------------------------------------
# The record kind
# ----------------------------------------------------------------------------------------------------------------------

def test_a_grounding_row_in_the_slide_tilers_form_validates_and_bad_boxes_name_their_field():
    row = {"id": "t1", "image": "tile.png", "question": "Locate the tumour.", "image_size": [300, 200],
           "boxes": [{"bbox": [10, 20, 110, 80], "label": "tumour"}]}
    rec = parse_record(row, "grounding", path="g.jsonl", row=4, check_images=False)
    assert isinstance(rec, GroundingRecord) and rec.images == ["tile.png"] and rec.boxes[0].bbox == [10, 20, 110, 80]
    for boxes, field in (([{"bbox": [50, 20, 10, 80], "label": "t"}], "boxes.0"),
                         ([{"bbox": [10, 20, 310, 80], "label": "t"}], "boxes.0.bbox"),
                         ([{"bbox": [1, 2, 3], "label": "t"}], "boxes.0.bbox")):
        with pytest.raises(DataError) as err:
            parse_record({**row, "boxes": boxes}, "grounding", path="g.jsonl", row=4, check_images=False)
        assert (err.value.row, err.value.field) == (4, field)


# ----------------------------------------------------------------------------------------------------------------------
# Box conversion through the processor's resize
# ----------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("budget", [TINY, {}])
def test_the_resized_size_is_the_processors_own(budget):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    processor = Qwen2VLImageProcessorPil(size={"shortest_edge": budget.get("min_pixels", 56 * 56),
                                               "longest_edge": budget.get("max_pixels", 28 * 28 * 1280)})
    for w, h in SIZES:
        grid = processor(images=[np.zeros((h, w, 3), np.uint8)], return_tensors="np")["image_grid_thw"][0]
        assert resized_size(w, h, **budget) == (int(grid[2]) * 14, int(grid[1]) * 14)
        assert (w, h) != resized_size(w, h, **budget)  # the case under test: the image really is rescaled


@pytest.mark.parametrize("size", SIZES)
def test_a_resized_box_goes_to_the_original_and_back_exactly(size):
    rw, rh = resized_size(*size, **TINY)
    for x, y in itertools.product(range(rw + 1), range(0, rh + 1, 7)):
        box = [x, y, rw - x, rh - y]
        assert to_resized(to_original(box, size, **TINY), size, **TINY) == box


@pytest.mark.parametrize("size", SIZES)
def test_an_original_box_comes_back_within_half_a_resized_pixel(size):
    w, h = size
    bx, by = round_trip_bound(size, **TINY)
    rw, rh = resized_size(w, h, **TINY)
    assert (bx, by) == (w / (2 * rw), h / (2 * rh))
    worst = [0.0, 0.0]
    for x, y in zip(range(w + 1), itertools.cycle(range(h + 1)), strict=False):
        back = to_original(to_resized([x, y, x, y], size, **TINY), size, **TINY)
        worst = [max(worst[0], abs(back[0] - x)), max(worst[1], abs(back[1] - y))]
        assert abs(back[0] - x) <= bx + 1e-9 and abs(back[1] - y) <= by + 1e-9
    assert worst[0] > 0.5 * bx  # the bound is what rounding costs, not a loose cap
    assert to_resized([0, 0, w, h], size, **TINY) == [0, 0, rw, rh]


def test_a_drawn_rectangle_lands_where_the_conversion_says_after_the_processors_resize():
    w, h = 230, 170
    box = [41, 37, 163, 121]
    img = np.full((h, w, 3), 255, np.uint8)
    img[box[1]:box[3], box[0]:box[2]] = 0
    rw, rh = resized_size(w, h, **TINY)
    small = np.asarray(Image.fromarray(img).resize((rw, rh), Image.Resampling.BICUBIC))  # the PIL backend's resample
    ys, xs = np.nonzero(small[..., 0] < 128)
    seen = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    assert max(abs(a - b) for a, b in zip(seen, to_resized(box, (w, h), **TINY), strict=True)) <= 1


# ----------------------------------------------------------------------------------------------------------------------
# The reward
# ----------------------------------------------------------------------------------------------------------------------

GOLD = _answer([0, 0, 10, 10])


@pytest.mark.parametrize("completion, target, expected", [
    ("<answer>[]</answer>", "[]", 1.0),  # both empty: "there is none", correctly
    ("<answer>[]</answer>", GOLD, 0.0),  # prediction empty
    (f"<answer>{GOLD}</answer>", "[]", 0.0),  # target empty
    (f"<think>pale areas</think><answer>{GOLD}</answer>", GOLD, 1.0),
    (GOLD, GOLD, 1.0),  # no tags: the whole completion is the answer
    (f"```json\n{GOLD}\n```", GOLD, 1.0),
    ('{"bbox_2d": [0, 0, 10, 10]}', GOLD, 1.0),  # one object alone
    (_answer([0, 0, 10, 5]), GOLD, 0.5 * 1 + 0.5 * 0.5),  # IoU exactly 0.5 is a hit
    (_answer([0, 0, 10, 4]), GOLD, 0.5 * 0 + 0.5 * 0.4),  # a near miss still earns its IoU
    (_answer([0, 0, 10, 10], [50, 50, 60, 60]), GOLD, 0.5 * 2 / 3 + 0.5 * 1 / 2),  # an extra box
    (_answer([0, 0, 10, 10], [0, 0, 10, 10]), GOLD, 0.5 * 2 / 3 + 0.5 * 1 / 2),  # a duplicate
    (_answer([0, 0, 10, 10]), _answer([0, 0, 10, 10], [20, 0, 30, 10]), 0.5 * 2 / 3 + 0.5 * 1 / 2),  # a miss
    ("<answer>[{'bbox_2d': [0, 0, 10, 10]}]</answer>", GOLD, 0.0),  # not JSON
    ('<answer>[{"bbox_2d": [0, 0, 10]}]</answer>', GOLD, 0.0),
    ('<answer>[{"bbox_2d": [0, 0, "10", 10]}]</answer>', GOLD, 0.0),
    ('<answer>[{"bbox_2d": [0, 0, NaN, 10]}]</answer>', GOLD, 0.0),
    ('<answer>[{"box": [0, 0, 10, 10]}]</answer>', GOLD, 0.0),
    ("<answer>" + "[" * 50_000 + "]" * 50_000 + "</answer>", GOLD, 0.0),
    ("<answer>[{\"bbox_2d\": [0, 0, 10", GOLD, 0.0),  # cut off
    (None, GOLD, 0.0),
])
def test_the_grounding_reward_equals_the_hand_computed_value(completion, target, expected):
    assert GroundingReward()(completions=[completion], answer=[target]) == [pytest.approx(expected)]


def test_the_weights_labels_and_the_boxes_column():
    pred, gold = _answer([0, 0, 10, 4], label="mucin pool"), _answer([0, 0, 10, 10])
    assert GroundingReward(w_f1=0.0, w_iou=1.0)(completions=[pred], answer=[gold]) == [pytest.approx(0.4)]
    hit = _answer([0, 0, 10, 10], label="Mucin  Pool")
    assert GroundingReward(match_labels=True)(completions=[hit], answer=[gold]) == [0.0]
    assert GroundingReward(match_labels=True)(completions=[hit], answer=[_answer([0, 0, 10, 10], label="mucin pool")]) \
        == [1.0]
    boxes = [[{"bbox": [0, 0, 10, 10], "label": "x"}]]
    assert GroundingReward()(completions=[[{"role": "assistant", "content": hit}]], boxes=boxes) == [1.0]
    with pytest.raises(ValueError):
        GroundingReward(w_f1=0, w_iou=0)


def test_the_reward_is_built_by_name_from_a_recipe():
    rewards = build_rewards([{"name": "format", "weight": 1.0}, {"name": "grounding", "weight": 2.0, "w_f1": 1.0,
                                                                 "w_iou": 0.0}])
    out = rewards.score([f"<think>a</think><answer>{GOLD}</answer>", "junk"], answer=[GOLD, GOLD])
    assert out["grounding"] == [1.0, 0.0] and out["total"] == [3.0, 0.0]


def test_the_matching_maximises_the_summed_iou_like_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(20):
        def boxes(n):
            xy = rng.uniform(0, 40, (n, 2))
            return [Box((x, y, x + w, y + h)) for (x, y), (w, h) in zip(xy, rng.uniform(5, 20, (n, 2)), strict=True)]
        preds, targets = boxes(int(rng.integers(1, 5))), boxes(int(rng.integers(1, 5)))
        ious = iou_matrix(preds, targets)
        small, big = (ious, len(targets)) if len(preds) <= len(targets) else (ious.T, len(preds))
        best = max(sum(small[i, p[i]] for i in range(small.shape[0]))
                   for p in itertools.permutations(range(big), small.shape[0]))
        assert math.fsum(match_boxes(preds, targets).ious) == pytest.approx(best)


# ----------------------------------------------------------------------------------------------------------------------
# The detection scorer
# ----------------------------------------------------------------------------------------------------------------------

def _box(*c, label="n"):
    return Box(tuple(float(v) for v in c), label)


@pytest.mark.parametrize("items, expected", [
    ([("n", [(0, 0, 10, 10)], [(0, 0, 10, 10)])], dict(f1=1.0, AP=1.0, AP50=1.0)),
    # IoU 0.625: a hit at the thresholds .50, .55, .60 of ten
    ([("n", [(0, 0, 10, 10)], [(0, 0, 10, 6.25)])], dict(f1=1.0, AP=0.3, AP50=1.0, AP75=0.0)),
    # a duplicate after the hit: a false positive at recall 1 already reached, so AP is untouched
    ([("n", [(0, 0, 10, 10)], [(0, 0, 10, 10), (0, 0, 10, 10)])], dict(precision=0.5, f1=2 / 3, AP50=1.0)),
    # an extra box listed first (scored higher): precision 1/2 when recall reaches 1
    ([("n", [(0, 0, 10, 10)], [(50, 50, 60, 60), (0, 0, 10, 10)])], dict(precision=0.5, AP50=0.5)),
    # a box on an item with no target, ranked with the hit: 1/2 precision at full recall
    ([("n", [], [(0, 0, 10, 10)]), ("n", [(0, 0, 10, 10)], [(0, 0, 10, 10)])], dict(precision=0.5, recall=1.0,
                                                                                    AP50=0.5)),
    ([("n", [(0, 0, 10, 10)], [])], dict(precision=None, recall=0.0, f1=0.0, AP=0.0)),  # prediction empty
    ([("n", [], [(0, 0, 10, 10)])], dict(precision=0.0, recall=None, f1=0.0, AP=None)),  # target empty
    ([("n", [], [])], dict(precision=None, recall=None, f1=None, AP=None)),  # both
    # a malformed answer scores as no boxes; classes are averaged as COCO averages them
    ([("n", [(0, 0, 10, 10)], None), ("m", [(0, 0, 5, 5)], [(0, 0, 5, 5)])], dict(recall=0.5, AP=0.5)),
])
def test_the_detection_scores_equal_the_hand_computed_values(items, expected):
    report = score_detection([DetectionItem(label, [_box(*t) for t in targets],
                                            None if preds is None else [_box(*p) for p in preds])
                              for label, targets, preds in items])
    for key, value in expected.items():
        assert report["overall"][key] == (None if value is None else pytest.approx(value)), key
    assert report["malformed"] == sum(p is None for _, _, p in items)


def test_detection_per_class_numbers_and_per_item_f1():
    report = score_detection([DetectionItem("a", [_box(0, 0, 10, 10)], [_box(0, 0, 10, 10)]),
                              DetectionItem("b", [_box(0, 0, 10, 10)], [_box(30, 30, 40, 40)]),
                              DetectionItem("b", [], []), DetectionItem("b", [], None)])  # malformed: 0, as rewarded
    assert report["per_class"]["a"]["AP"] == pytest.approx(1.0) and report["per_class"]["b"]["AP"] == 0.0
    assert (report["per_class"]["b"]["fp"], report["per_class"]["b"]["fn"]) == (1, 1)
    assert report["per_item_f1"] == [1.0, 0.0, 1.0, 0.0] and report["overall"]["mean_iou"] == pytest.approx(2 / 4)


# ----------------------------------------------------------------------------------------------------------------------
# COCO and CSV
# ----------------------------------------------------------------------------------------------------------------------

def _records(tmp_path):
    for name, size in (("a.png", (150, 200)), ("b.png", (230, 170))):
        Image.new("RGB", size).save(tmp_path / name)
    return [{"image": "a.png", "image_size": [150, 200], "question": "Locate every mucin pool in this image.",
             "category": "mucin pool", "boxes": [{"bbox": [10.0, 20.0, 60.5, 90.0], "label": "mucin pool"},
                                                 {"bbox": [70.0, 100.0, 140.0, 199.0], "label": "mucin pool"}]},
            {"image": "a.png", "image_size": [150, 200], "question": "Locate every gland ring in this image.",
             "category": "gland ring", "boxes": [{"bbox": [1.0, 2.0, 3.0, 4.0], "label": "gland ring"}]},
            {"image": "b.png", "image_size": [230, 170], "question": "Locate every gland ring in this image.",
             "category": "gland ring", "boxes": [{"bbox": [0.0, 0.0, 230.0, 170.0], "label": "gland ring"}]}]


def _import(fmt_name, src, opts=None):
    fmt = get_format(fmt_name)
    opts = opts or ImportOptions()
    out = []
    for label, row, raw in fmt.rows(src, opts):
        converted = fmt.convert(raw, (label, row), opts)
        rec = parse_record({**converted.record, "images": [str(p) for p in converted.images]}, converted.kind,
                           path=label, row=row)
        out.append(rec)
    return out


def _comparable(rec) -> tuple:
    return (rec.images[0].rsplit("/", 1)[-1], tuple(rec.image_size or ()), rec.question,
            tuple((tuple(b.bbox), b.label) for b in rec.boxes))


def test_coco_round_trip_skips_crowds_and_names_a_bad_box(tmp_path):
    records = _records(tmp_path)
    path = write_coco(records, tmp_path / "instances.json")
    assert {_comparable(r) for r in _import("coco", path)} == {
        (r["image"], tuple(r["image_size"]), r["question"], tuple((tuple(b["bbox"]), b["label"]) for b in r["boxes"]))
        for r in records}
    data = json.loads(path.read_text())
    data["annotations"].append({"id": 99, "image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5], "iscrowd": 1})
    path.write_text(json.dumps(data))
    assert sum(len(r.boxes) for r in _import("coco", path)) == 4  # the crowd region is not a target
    data["annotations"][1]["bbox"] = [0, 0, -5, 5]
    path.write_text(json.dumps(data))
    with pytest.raises(DataError) as err:
        _import("coco", path)
    assert (err.value.path, err.value.row, err.value.field) == (str(path), 1, "annotations[1].bbox")


def test_boxes_csv_round_trip_keeps_negatives_and_names_a_bad_cell(tmp_path):
    records = _records(tmp_path)
    negative = {"image": "b.png", "image_size": [230, 170], "question": "Locate every mucin pool in this image.",
                "category": "mucin pool", "boxes": []}
    path = write_boxes_csv([*records, negative], tmp_path / "boxes.csv")
    back = _import("boxes-csv", path)
    assert sorted(_comparable(r) for r in back) == sorted(
        (r["image"], tuple(r["image_size"]), r["question"], tuple((tuple(b["bbox"]), b["label"]) for b in r["boxes"]))
        for r in [*records, negative])
    lines = path.read_text().splitlines()
    lines[1] = lines[1].replace("60.5", "sixty")  # line 2 of the file, its x2
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        _import("boxes-csv", path)
    assert (err.value.row, err.value.field) == (2, "x2") and "sixty" in str(err.value)


def test_boxes_csv_takes_its_own_column_names(tmp_path):
    Image.new("RGB", (64, 48)).save(tmp_path / "t.png")
    (tmp_path / "b.csv").write_text("file,cls,xmin,ymin,xmax,ymax\nt.png,tumour,1,2,30,40\nt.png,tumour,5,5,9,9\n")
    opts = ImportOptions(columns={"image": "file", "label": "cls", "x1": "xmin", "y1": "ymin", "x2": "xmax",
                                  "y2": "ymax"})
    (rec,) = _import("boxes-csv", tmp_path / "b.csv", opts)
    assert [b.bbox for b in rec.boxes] == [[1, 2, 30, 40], [5, 5, 9, 9]]
    assert rec.question == "Locate every tumour in this image."


# ----------------------------------------------------------------------------------------------------------------------
# The synthetic world's scenes
# ----------------------------------------------------------------------------------------------------------------------

def _scenes_covering_every_kind(cfg: GroundingConfig):
    scenes, kinds = [], set()
    for i in range(60):
        scene = make_scene(0, "train", i, cfg)
        new = {p.kind for p in scene.placed} - kinds
        if new:
            scenes.append(scene)
            kinds |= new
        if len(kinds) == len(STRUCTURES):
            return scenes
    raise AssertionError(f"60 scenes hold only {kinds}")


GRID = GroundingConfig(max_structures=2, scene_size=112, grid=28, min_fraction=0.5, max_fraction=0.5)
FREE = GroundingConfig()


@pytest.mark.parametrize("cfg", [FREE, GRID], ids=["free", "grid"])
def test_every_box_is_exactly_the_drawn_structures_extent(cfg):
    for scene in _scenes_covering_every_kind(cfg):
        full = render_scene(scene)
        for k, placed in enumerate(scene.placed):
            changed = (full != render_scene(scene, omit=k)).any(axis=-1)  # the pixels this structure painted
            ys, xs = np.nonzero(changed)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == placed.bbox
            assert np.array_equal(changed, structure_mask(changed.shape, placed.bbox))


def test_the_grid_layout_puts_whole_cell_boxes_anywhere_on_the_grid_and_draws_only_the_kinds_asked():
    cfg = GroundingConfig(n_train=200, max_structures=1, scene_size=112, grid=28, min_fraction=0.25,
                          max_fraction=0.5, absent_share=0.0, kinds="gland,mucin")
    scenes = [make_scene(0, "train", i, cfg) for i in range(200)]
    boxes = [p.bbox for s in scenes for p in s.placed]
    assert all((s.width, s.height) == (112, 112) and len(s.placed) == 1 for s in scenes)
    assert all(v % 28 == 0 and 0 <= v <= 112 for b in boxes for v in b)
    # 0.25 and 0.5 of 112 px are 1 and 2 cells: every side length and every start on the grid that fits occurs
    assert {b[2] - b[0] for b in boxes} == {b[3] - b[1] for b in boxes} == {28, 56}
    assert {(b[0], b[2] - b[0]) for b in boxes} == {(x, w) for w in (28, 56) for x in range(0, 112 - w + 1, 28)}
    assert {p.kind for s in scenes for p in s.placed} == {s.asked for s in scenes} == {"gland", "mucin"}
    with pytest.raises(ValueError, match="kinds"):
        GroundingConfig(kinds="gland,tumour")
    # the grid's answers need no rounding: at the tiny budget a 112 px scene is seen as it is
    assert answer_json(scenes[0].targets(), (112, 112), **TINY) == json.dumps(
        [{"bbox_2d": list(scenes[0].placed[0].bbox), "label": STRUCTURE_BY_KEY[scenes[0].asked].label}])


def test_the_world_writes_records_whose_answers_are_the_boxes_in_resized_pixels(tmp_path):
    manifest = generate_grounding_world(tmp_path, seed=1, config=GroundingConfig(n_train=8, n_heldout=2))
    assert manifest["files"]["grounding/train.jsonl"] == 8
    ground = load_records(tmp_path / "grounding/train.jsonl", "grounding")
    sft = load_records(tmp_path / "sft/train.jsonl", "conversation")
    rl = load_records(tmp_path / "rl/train.jsonl", "mcq")
    assert any(w % 28 or h % 28 for w, h in (r.image_size for r in ground))
    for g, s, r in zip(ground, sft, rl, strict=True):
        assert Image.open(g.images[0]).size == tuple(g.image_size)
        reply = s.messages[-1].text()
        assert r.answer == answer_json([b.model_dump() for b in g.boxes], g.image_size, **TINY) in reply
        assert GroundingReward()(completions=[reply], answer=[r.answer]) == [1.0]
        bx, by = round_trip_bound(g.image_size, **TINY)
        for got, want in zip(parse_boxes(reply), g.boxes, strict=True):
            back = to_original(got.bbox, g.image_size, **TINY)
            assert all(abs(a - b) <= (bx, by)[i % 2] for i, (a, b) in enumerate(zip(back, want.bbox, strict=True)))
    choices = {r.id.removeprefix("ground-mcq-"): r for r in load_records(tmp_path / "mcq/train.jsonl", "mcq")}
    assert choices
    for g in ground:
        choice = choices.get(g.id.removeprefix("ground-"))
        assert (choice is not None) == (len(g.boxes) == 1)
        if choice is not None:
            gold = json.loads(choice.options[choice.answer])
            assert gold == to_resized(g.boxes[0].bbox, g.image_size, **TINY)
            others = [Box(tuple(json.loads(v))) for k, v in choice.options.items() if k != choice.answer]
            assert others and iou_matrix(others, [Box(tuple(gold))]).max() < 0.3


# ----------------------------------------------------------------------------------------------------------------------
# A checkpoint's grounding eval and the paired test
# ----------------------------------------------------------------------------------------------------------------------

class _Scripted:
    """Answers the gold boxes when it sees an image, `[]` when it does not."""

    def __init__(self, records):
        self.gold = [r.answer for r in records]

    def generate(self, requests, sampling):
        return [f"<think>x</think><answer>{gold if r.images else '[]'}</answer>"
                for gold, r in zip(self.gold, requests, strict=True)]


def test_a_checkpoint_is_scored_with_and_without_its_images_and_compared_paired(tmp_path):
    from patho_r1.eval.detection import evaluate_grounding, paired_f1_test
    from patho_r1.eval.generation import SamplingConfig

    generate_grounding_world(tmp_path, seed=2, config=GroundingConfig(n_train=0, n_heldout=6))
    records = load_records(tmp_path / "rl/heldout.jsonl", "mcq")
    seeing, _ = evaluate_grounding(_Scripted(records), records, SamplingConfig())
    blind, _ = evaluate_grounding(_Scripted(records), records, SamplingConfig(), blind=True)
    assert seeing["overall"]["f1"] == 1.0 and seeing["overall"]["AP"] == pytest.approx(1.0)
    negatives = sum(r.answer == "[]" for r in records)
    assert blind["per_item_f1"] == [1.0 if r.answer == "[]" else 0.0 for r in records] and negatives < len(records)
    assert paired_f1_test([0.0] * 6, [1.0] * 6)["p_value"] == pytest.approx(2 / 64)  # exact: 2 of 2^6 sign flips
    same = paired_f1_test(seeing["per_item_f1"], seeing["per_item_f1"])
    assert same["diff"] == 0.0 and same["p_value"] == 1.0


def test_the_prior_baseline_answers_each_classs_median_training_box():
    from patho_r1.data import MCQRecord
    from patho_r1.eval.detection import prior_items

    def row(category, *boxes):
        return MCQRecord(question="q", answer=_answer(*boxes), answer_type="open", category=category)

    train = [row("a", [0, 0, 10, 10]), row("a", [2, 2, 12, 12], [4, 4, 14, 14]), row("b")]
    items = prior_items(train, [row("a", [2, 2, 12, 12]), row("b", [0, 0, 5, 5])])
    assert [b.bbox for b in items[0].predictions] == [(2.0, 2.0, 12.0, 12.0)] and items[1].predictions == []
    assert score_detection(items)["per_item_f1"] == [1.0, 0.0]
