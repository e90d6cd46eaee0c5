"""A tiny random-init Qwen2.5-VL with a locally trained tokenizer and processor, built from config with no network.

The result is an ordinary `save_pretrained` directory: `patho.models.load_backbone(dir)` loads it exactly as it loads
`Qwen/Qwen2.5-VL-7B-Instruct`.  It keeps the real model's structure (vision tower with window attention and patch
merger, mRoPE language model, chat template, vision special tokens) at a size that trains on a 2-core CPU in minutes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,  # the PIL backend; `Qwen2VLImageProcessor` is the torchvision one in transformers 5.x
)

from patho.models import Qwen2_5_VLImageOnlyProcessor, register_processor
from patho.synth import text_corpus

# Qwen2.5-VL's own special tokens (our ids differ from the real vocabulary; names and roles are the same).
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
# Reasoning tags are ordinary added tokens, not special ones, so `skip_special_tokens=True` keeps them in decoded text.
REASONING_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")

# The official Qwen2-VL / Qwen2.5-VL chat template (byte-identical to trl/chat_templates/qwen2_5_vl.jinja).
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class TinySpec:
    """Sizes of the tiny model.  head_dim = hidden / heads must be >= 32 (vLLM's CPU attention minimum)."""

    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vision_hidden_size: int = 64
    vision_depth: int = 2
    vision_heads: int = 2
    rope_theta: float = 1e6  # the real model's value
    min_pixels: int = 28 * 28 * 4  # 56x56 -> 4 merged visual tokens
    max_pixels: int = 28 * 28 * 16  # 112x112 -> 16 merged visual tokens
    seed: int = 0

    def __post_init__(self):
        head_dim = self.hidden_size // self.num_attention_heads
        if head_dim < 32 or head_dim % 4:
            raise ValueError(f"head_dim = hidden_size / num_attention_heads = {head_dim}; it must be >= 32 and a multiple of 4")
        if self.vision_hidden_size // self.vision_heads < 32:
            raise ValueError("vision head_dim must be >= 32")

    @property
    def mrope_section(self) -> list[int]:
        # Qwen2.5-VL splits half the head dim into (temporal, height, width) in the ratio 16:24:24.
        half = self.hidden_size // self.num_attention_heads // 2
        t = half // 4
        h = (half - t) // 2
        return [t, h, half - t - h]


def _generic_corpus() -> list[str]:
    words = ("the a of and is with in shows image patch answer think question which option tissue cell nucleus "
             "yes no normal abnormal high low 0 1 2 3 4 5 6 7 8 9 . , ? : ( ) / \\boxed{ } $ = + - * ^ x").split()
    return [" ".join(words[i:] + words[:i]) for i in range(len(words))]


def build_tokenizer(spec: TinySpec = TinySpec()) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the synthetic world's text: every byte is in the alphabet, so nothing is OOV."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size - len(REASONING_TOKENS),
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = text_corpus() * 4 + _generic_corpus()
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in REASONING_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        additional_special_tokens=list(SPECIAL_TOKENS[3:]),
        chat_template=QWEN2_5_VL_CHAT_TEMPLATE,
        padding_side="left",
        model_max_length=4096,
    )


def build_processor(tokenizer, spec: TinySpec = TinySpec()) -> Qwen2_5_VLImageOnlyProcessor:
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=spec.min_pixels, max_pixels=spec.max_pixels, patch_size=14, temporal_patch_size=2, merge_size=2,
    )
    return Qwen2_5_VLImageOnlyProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN2_5_VL_CHAT_TEMPLATE
    )


def build_model(tokenizer, spec: TinySpec = TinySpec()) -> Qwen2_5_VLForConditionalGeneration:
    ids = tokenizer.convert_tokens_to_ids
    vocab = ((len(tokenizer) + 63) // 64) * 64
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab,
            hidden_size=spec.hidden_size,
            intermediate_size=spec.intermediate_size,
            num_hidden_layers=spec.num_hidden_layers,
            num_attention_heads=spec.num_attention_heads,
            num_key_value_heads=spec.num_key_value_heads,
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta, "mrope_section": spec.mrope_section},
            bos_token_id=ids("<|endoftext|>"),
            eos_token_id=ids("<|im_end|>"),
            pad_token_id=ids("<|endoftext|>"),
        ),
        vision_config=dict(
            depth=spec.vision_depth,
            hidden_size=spec.vision_hidden_size,
            intermediate_size=spec.vision_hidden_size * 2,
            num_heads=spec.vision_heads,
            out_hidden_size=spec.hidden_size,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=56,
            fullatt_block_indexes=[spec.vision_depth - 1],
            in_channels=3,
        ),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    torch.manual_seed(spec.seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = ids("<|im_end|>")
    model.generation_config.pad_token_id = ids("<|endoftext|>")
    model.generation_config.bos_token_id = ids("<|endoftext|>")
    return model


def build_tiny_model(out_dir: str | Path, spec: TinySpec = TinySpec()) -> Path:
    """Build and save tokenizer + processor + random-init model to `out_dir` (written atomically)."""
    from patho.checkpoint import atomic_directory

    register_processor()
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(spec)
    processor = build_processor(tokenizer, spec)
    model = build_model(tokenizer, spec)
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / "tiny_spec.json").write_text(json.dumps(asdict(spec), indent=2) + "\n")
    return out_dir
