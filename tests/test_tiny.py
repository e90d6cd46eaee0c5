import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from patho_r1.fixtures.tiny import REASONING_TOKENS, TinySpec
from patho_r1.models import Qwen2_5_VLImageOnlyProcessor, load_backbone


def _image(seed=0, h=56, w=56):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def test_tiny_model_loads_through_the_common_loader(tiny_model_dir):
    bb = load_backbone(tiny_model_dir)
    assert type(bb.model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert isinstance(bb.processor, Qwen2_5_VLImageOnlyProcessor)
    # TRL decides "is this a VLM" from AutoProcessor; it must not fall back to the bare tokenizer.
    assert isinstance(AutoProcessor.from_pretrained(str(tiny_model_dir)), Qwen2_5_VLImageOnlyProcessor)
    cfg = bb.model.config.text_config
    assert cfg.hidden_size // cfg.num_attention_heads >= 32
    assert sum(cfg.rope_parameters["mrope_section"]) == cfg.hidden_size // cfg.num_attention_heads // 2


def test_reasoning_tags_are_single_tokens_that_survive_decoding(tiny_model_dir):
    tok = load_backbone(tiny_model_dir).tokenizer
    text = "<think>dense nuclei</think><answer>B</answer>"
    pieces = tok.tokenize(text)
    for tag in REASONING_TOKENS:
        assert tag in pieces
    ids = tok(text)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.eos_token == "<|im_end|>"


def test_generate_with_an_image_and_batched_left_padding(tiny_model_dir):
    bb = load_backbone(tiny_model_dir)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which tissue?"}]}]
    text = bb.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    inputs = bb.processor(text=[text, text], images=[_image(0), _image(1, 100, 80)], return_tensors="pt",
                          padding=True)
    n_image_tokens = int((inputs["input_ids"] == bb.model.config.image_token_id).sum())
    assert n_image_tokens == int(inputs["image_grid_thw"].prod(-1).sum()) // 4  # 2x2 merge
    with torch.no_grad():
        out = bb.model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert out.shape[0] == 2 and out.shape[1] > inputs["input_ids"].shape[1]


def test_save_and_reload_gives_identical_logits(tiny_model_dir, tmp_path):
    bb = load_backbone(tiny_model_dir)
    bb.model.save_pretrained(tmp_path)
    bb.processor.save_pretrained(tmp_path)
    again = load_backbone(tmp_path)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}]
    text = bb.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = bb.processor(text=[text], images=[_image(3)], return_tensors="pt")
    with torch.no_grad():
        a = bb.model(**inputs).logits
        b = again.model(**inputs).logits
    assert torch.equal(a, b)


def test_pixel_budget_override(tiny_model_dir):
    bb = load_backbone(tiny_model_dir, min_pixels=28 * 28, max_pixels=28 * 28 * 4)
    inputs = bb.processor(text=["<|vision_start|><|image_pad|><|vision_end|>x"], images=[_image(0, 112, 112)],
                          return_tensors="pt")
    assert int(inputs["image_grid_thw"].prod()) <= 16  # 56x56 at most -> 16 patches
    with pytest.raises(ValueError, match="min_pixels"):
        load_backbone(tiny_model_dir, min_pixels=10_000, max_pixels=100)


def test_bad_spec_and_missing_model_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="head_dim"):
        TinySpec(hidden_size=64, num_attention_heads=4)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_backbone(tmp_path)
