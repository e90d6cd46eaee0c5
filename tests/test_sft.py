"""CPT and SFT on the tiny model: label masking token by token, learning, resume, reload, LoRA, config errors."""

import json
import math

import pytest
import torch
from transformers import TrainerCallback

from patho_r1.checkpoint import read_manifest
from patho_r1.config import load_config
from patho_r1.errors import ConfigError
from patho_r1.models import load_backbone
from patho_r1.sft.collator import PathoVLMCollator
from patho_r1.sft.config import CPTPhaseConfig, SFTPhaseConfig
from patho_r1.sft.cpt import run_cpt
from patho_r1.sft.data import caption_rows, conversation_rows
from patho_r1.sft.sft import run_sft

FAST = dict(per_device_train_batch_size=4, learning_rate=2e-3, warmup_ratio=0.0, max_length=512,
            wandb={"mode": "disabled"}, save_steps=1000, logging_steps=1)


def _collator(model_dir, system_prompt=None):
    bb = load_backbone(model_dir, padding_side="right")
    return bb, PathoVLMCollator(processor=bb.processor, max_length=512, completion_only_loss=True,
                                system_prompt=system_prompt)


def _spans(tokenizer, ids, labels):
    kept = [i for i, lab in zip(ids.tolist(), labels.tolist(), strict=True) if lab != -100]
    return tokenizer.decode(kept)


def test_sft_labels_cover_every_assistant_turn_and_nothing_else(tiny_model_dir, tmp_path):
    conv = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What do you see?"}]},
        {"role": "assistant", "content": "<think>dense nuclei</think><answer>lymphocytes</answer>"},
        {"role": "user", "content": [{"type": "text", "text": "Which option? A. x B. y"}]},
        {"role": "assistant", "content": "<think>so A</think><answer>A</answer>"},
    ]
    short = [conv[0], {"role": "assistant", "content": "<think>t</think><answer>B</answer>"}]
    data = tmp_path / "c.jsonl"
    from PIL import Image

    Image.new("RGB", (56, 56), (200, 120, 180)).save(tmp_path / "t.png")
    data.write_text(json.dumps({"messages": conv, "images": ["t.png"]}) + "\n"
                    + json.dumps({"messages": short, "images": ["t.png"]}) + "\n")
    bb, collator = _collator(tiny_model_dir, system_prompt="You are a pathologist.")
    batch = collator(list(conversation_rows(str(data))))
    tok = bb.tokenizer
    ids, labels = batch["input_ids"], batch["labels"]
    assert _spans(tok, ids[0], labels[0]) == ("<think>dense nuclei</think><answer>lymphocytes</answer><|im_end|>"
                                             "<think>so A</think><answer>A</answer><|im_end|>")
    assert _spans(tok, ids[1], labels[1]) == "<think>t</think><answer>B</answer><|im_end|>"
    # Token by token: nothing from system/user turns, image tokens or right padding is learned.
    image_id = bb.model.config.image_token_id
    for row in range(2):
        mask = batch["attention_mask"][row].tolist()
        for tid, lab, att in zip(ids[row].tolist(), labels[row].tolist(), mask, strict=True):
            if lab != -100:
                assert tid == lab and att == 1 and tid != image_id
    assert (labels[1][batch["attention_mask"][1] == 0] == -100).all() and (batch["attention_mask"][1] == 0).any()
    assert "You are a pathologist." in tok.decode(ids[0])


def test_cpt_labels_are_the_caption_only(tiny_model_dir, world_dir):
    bb, collator = _collator(tiny_model_dir)
    rows = list(caption_rows(str(world_dir / "cpt/train.jsonl"), "Describe this pathology image."))[:3]
    batch = collator([dict(r) for r in rows])
    for i, row in enumerate(rows):
        # TRL renders the completion through the chat template, so the learned turn ends with "<|im_end|>\n"
        assert _spans(bb.tokenizer, batch["input_ids"][i], batch["labels"][i]) == row["completion"][0]["content"] \
            + "<|im_end|>\n"
    assert batch["pixel_values"].shape[0] == int(batch["image_grid_thw"].prod(-1).sum())


def _caption_loss(model_dir, world_dir):
    bb, collator = _collator(model_dir)
    rows = list(caption_rows(str(world_dir / "cpt/train.jsonl"), "Describe this pathology image."))[-16:]
    with torch.no_grad():
        return float(bb.model(**collator([dict(r) for r in rows])).loss)


def test_cpt_lowers_caption_loss(tiny_model_dir, world_dir, tmp_path):
    before = _caption_loss(tiny_model_dir, world_dir)
    cfg = CPTPhaseConfig(model=str(tiny_model_dir), data=str(world_dir / "cpt/train.jsonl"),
                         output_dir=str(tmp_path / "cpt"), max_steps=40, mode="language_model", **FAST)
    result = run_cpt(cfg)
    after = _caption_loss(result.model_dir, world_dir)
    assert after < 0.3 * before, (before, after)
    manifest = read_manifest(result.model_dir)
    assert manifest.phase == "cpt" and manifest.step == 40 and manifest.parent == str(tiny_model_dir)
    visual_before = load_backbone(tiny_model_dir).model.model.visual.state_dict()
    visual_after = load_backbone(result.model_dir).model.model.visual.state_dict()
    assert all(torch.equal(visual_before[k], visual_after[k]) for k in visual_before)  # frozen in this mode


class _Crash(TrainerCallback):
    def __init__(self, at_step):
        self.at_step = at_step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at_step:
            raise KeyboardInterrupt("simulated kill")


def _weights(model_dir):
    return {k: v.clone() for k, v in load_backbone(model_dir).model.state_dict().items()}


def test_killed_sft_resumes_to_the_same_step_count_and_reloads_identically(tiny_model_dir, world_dir, tmp_path):
    cfg = dict(model=str(tiny_model_dir), data=str(world_dir / "sft/train.jsonl"), output_dir=str(tmp_path / "sft"),
               **{**FAST, "save_steps": 2, "max_steps": 6})
    straight = run_sft(SFTPhaseConfig(**{**cfg, "output_dir": str(tmp_path / "straight")}))
    with pytest.raises(KeyboardInterrupt):
        run_sft(SFTPhaseConfig(**cfg), callbacks=[_Crash(at_step=3)])
    assert (tmp_path / "sft/checkpoints/checkpoint-2").is_dir()
    assert not (tmp_path / "sft/model").exists()
    result = run_sft(SFTPhaseConfig(**cfg, resume=True))
    assert result.global_step == 6
    log = [json.loads(x) for x in (tmp_path / "sft/metrics.jsonl").read_text().splitlines()]
    resumed_steps = [r["step"] for r in log if "loss" in r][-3:]
    assert resumed_steps == [4, 5, 6]  # continued after checkpoint-2 + replay of step 3, not from scratch
    assert all(math.isfinite(r["loss"]) for r in log if "loss" in r)
    again = load_backbone(result.model_dir)
    again2 = load_backbone(result.model_dir)
    bb, collator = _collator(result.model_dir)
    batch = collator([dict(r) for r in list(conversation_rows(str(world_dir / "sft/train.jsonl")))[:2]])
    with torch.no_grad():
        assert torch.equal(again.model(**batch).logits, again2.model(**batch).logits)
    assert read_manifest(result.model_dir).step == 6
    # Same data order and restored weights: the resumed run ends where an uninterrupted run ends.
    a, b = _weights(straight.model_dir), _weights(result.model_dir)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a), "resume did not restore the weights"


def test_lora_sft_saves_adapter_or_merged_model(tiny_model_dir, world_dir, tmp_path):
    common = dict(model=str(tiny_model_dir), data=str(world_dir / "sft/train.jsonl"), **{**FAST, "max_steps": 2},
                  lora={"r": 4, "alpha": 8})
    adapter = run_sft(SFTPhaseConfig(output_dir=str(tmp_path / "a"), **common))
    assert (adapter.model_dir / "adapter_config.json").is_file()
    merged = run_sft(SFTPhaseConfig(output_dir=str(tmp_path / "m"), merge_lora=True, **common))
    assert (merged.model_dir / "config.json").is_file() and not (merged.model_dir / "adapter_config.json").exists()
    a, m = load_backbone(adapter.model_dir), load_backbone(merged.model_dir)
    assert type(a.model).__name__ == type(m.model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert read_manifest(merged.model_dir).extra == {"lora": True, "merged": True}


def test_bad_config_names_every_field_before_loading_a_model(tmp_path, world_dir):
    path = tmp_path / "sft.yaml"
    path.write_text(f"model: /nonexistent/model\ndata: {world_dir}/sft/train.jsonl\noutput_dir: {tmp_path}/o\n"
                    "learning_rate: -1\nper_device_train_batch_size: 0\nlearnig_rate: 1e-5\n")
    with pytest.raises(ConfigError) as info:
        load_config(SFTPhaseConfig, path)
    text = str(info.value)
    for field in ("learning_rate", "per_device_train_batch_size", "learnig_rate"):
        assert field in text
    assert "3 invalid field(s)" in text
    path.write_text(f"model: /nonexistent/model\ndata: {tmp_path}/missing.jsonl\noutput_dir: {tmp_path}/o\n")
    with pytest.raises(ConfigError, match="data: not found"):
        load_config(SFTPhaseConfig, path)
    path.write_text(f"model: /nonexistent/model\ndata: {world_dir}/sft/train.jsonl\noutput_dir: {tmp_path}/o\n")
    cfg = load_config(SFTPhaseConfig, path)
    with pytest.raises(ConfigError, match="model: /nonexistent/model is not a model directory"):
        run_sft(cfg)


def test_cpt_streams_its_corpus(tiny_model_dir, world_dir, tmp_path):
    from datasets import IterableDataset

    from patho_r1.sft.data import to_dataset

    stream = to_dataset(caption_rows, streaming=True, source=str(world_dir / "cpt/train.jsonl"),
                        instruction="Describe.")
    assert isinstance(stream, IterableDataset)
    assert next(iter(stream))["completion"][0]["content"]
    with pytest.raises(ValueError, match="max_steps"):
        CPTPhaseConfig(model=str(tiny_model_dir), data=str(world_dir / "cpt/train.jsonl"),
                       output_dir=str(tmp_path / "x"), streaming=True, wandb={"mode": "disabled"})
    result = run_cpt(CPTPhaseConfig(model=str(tiny_model_dir), data=str(world_dir / "cpt/train.jsonl"),
                                    output_dir=str(tmp_path / "cpt"), streaming=True, **{**FAST, "max_steps": 3}))
    assert result.global_step == 3


def test_collator_handles_several_images_per_sample(tiny_model_dir, tmp_path):
    from PIL import Image

    Image.new("RGB", (56, 56), (200, 120, 180)).save(tmp_path / "a.png")
    Image.new("RGB", (112, 84), (90, 60, 160)).save(tmp_path / "b.png")
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare."}]},
            {"role": "assistant", "content": "<think>t</think><answer>A</answer>"}]
    (tmp_path / "c.jsonl").write_text(json.dumps({"messages": conv, "images": ["a.png", "b.png"]}) + "\n")
    bb, collator = _collator(tiny_model_dir)
    batch = collator(list(conversation_rows(str(tmp_path / "c.jsonl"))))
    grid = batch["image_grid_thw"]
    assert grid.shape[0] == 2 and batch["pixel_values"].shape[0] == int(grid.prod(-1).sum())
    assert int((batch["input_ids"] == bb.model.config.image_token_id).sum()) == int(grid.prod(-1).sum()) // 4
    with torch.no_grad():
        assert torch.isfinite(bb.model(**batch).loss)
