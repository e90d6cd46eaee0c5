"""The vision tower's attention in a few calls per layer (patho_r1.attention), against transformers' own per-window
loop: equal outputs and gradients, the call counts, and no host reads once the indices are precomputed."""

from __future__ import annotations

import sys
from collections import Counter

import pytest
import torch
from torch.overrides import TorchFunctionMode

from patho_r1.attention import (
    REGISTERED_NAMES,
    apply_vision_attention,
    attention_problems,
    register_vision_attention,
    resolve_text_attention,
    resolve_vision_attention,
    vision_index_kwargs,
)

HOST_READS = ("tolist", "item", "__bool__", "__int__", "__float__", "__index__")


class CallCounter(TorchFunctionMode):
    """Counts torch function calls by name, and where each host read (a device sync on a GPU) comes from."""

    def __init__(self):
        super().__init__()
        self.calls: Counter = Counter()
        self.host_reads: Counter = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        self.calls[name] += 1
        if name in HOST_READS:
            frame = sys._getframe(1)
            self.host_reads[(frame.f_code.co_filename.rsplit("/", 1)[-1], frame.f_code.co_name)] += 1
        return func(*args, **(kwargs or {}))


def geometry_3b_tower():
    """A vision tower with Qwen2.5-VL-3B/7B's geometry (32 blocks, window 112 px, patch 14, merge 2, full attention in
    blocks 7/15/23/31) at reduced width, in fp32."""
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    config = Qwen2_5_VLConfig(vision_config=dict(
        depth=32, hidden_size=64, intermediate_size=96, num_heads=2, patch_size=14, spatial_merge_size=2,
        temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31], out_hidden_size=64))
    torch.manual_seed(0)
    tower = Qwen2_5_VisionTransformerPretrainedModel(config.vision_config).float()
    return tower, config.vision_config


def patches(sizes: list[tuple[int, int]], seed: int = 1):
    grid = torch.tensor([[1, h // 14, w // 14] for h, w in sizes])
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 14 * 14, generator=gen), grid


def run_tower(tower, config, implementation, x, grid, precomputed=False):
    """Output, input gradient and parameter gradients of a fixed scalar of the merged output."""
    config._attn_implementation_internal = implementation
    tower.zero_grad()
    x = x.clone().requires_grad_(True)
    kwargs = {}
    if precomputed:
        kwargs = {k.removeprefix("image_"): v.to(x.device) if torch.is_tensor(v) else v
                  for k, v in vision_index_kwargs(grid, config).items()}
    out = tower(x, grid_thw=grid, **kwargs).pooler_output
    weight = torch.linspace(-1, 1, out.numel(), device=out.device, dtype=out.dtype).reshape(out.shape)
    (out * weight).sum().backward()
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in tower.named_parameters()}


SIZES = {
    "one 448-px image": [(448, 448)],
    "not a multiple of the window": [(196, 308)],
    "a batch of mixed sizes": [(448, 448), (196, 308), (56, 84), (112, 224)],
}


@pytest.mark.parametrize("sizes", SIZES.values(), ids=SIZES.keys())
@pytest.mark.parametrize("precomputed", [False, True], ids=["indices on the fly", "indices precomputed"])
def test_batched_vision_attention_equals_transformers_loop(sizes, precomputed):
    register_vision_attention()
    tower, config = geometry_3b_tower()
    x, grid = patches(sizes)
    ref_out, ref_dx, ref_grads = run_tower(tower, config, "eager", x, grid)
    out, dx, grads = run_tower(tower, config, REGISTERED_NAMES["batched"], x, grid, precomputed)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dx, ref_dx, atol=1e-5, rtol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-5, rtol=1e-5, msg=name)


def attention_calls_per_forward(tower, config, implementation, sizes, precomputed=False):
    x, grid = patches(sizes)
    config._attn_implementation_internal = implementation
    kwargs = {k.removeprefix("image_"): v for k, v in vision_index_kwargs(grid, config).items()} if precomputed else {}
    with torch.no_grad(), CallCounter() as counter:
        tower(x, grid_thw=grid, **kwargs)
    return counter


def test_one_attention_call_per_layer_for_a_448px_image():
    """transformers' loop: 28 window layers x 16 windows + 4 full layers = 452 SDPA calls for one 448-px image (the
    issue's count); ours: one per layer."""
    register_vision_attention()
    tower, config = geometry_3b_tower()
    loop = attention_calls_per_forward(tower, config, "sdpa", [(448, 448)])
    ours = attention_calls_per_forward(tower, config, REGISTERED_NAMES["batched"], [(448, 448)])
    assert loop.calls["scaled_dot_product_attention"] == 28 * 4 * 4 + 4 == 452
    assert ours.calls["scaled_dot_product_attention"] == 32
    # Edge windows of a size that is not a multiple of the window add one call per distinct length, not per window.
    odd = attention_calls_per_forward(tower, config, REGISTERED_NAMES["batched"], [(196, 308)])
    assert odd.calls["scaled_dot_product_attention"] <= 3 * 32


def test_no_host_reads_in_the_vision_forward_with_precomputed_indices():
    register_vision_attention()
    tower, config = geometry_3b_tower()
    sizes = SIZES["a batch of mixed sizes"]
    loop = attention_calls_per_forward(tower, config, "sdpa", sizes)
    on_the_fly = attention_calls_per_forward(tower, config, REGISTERED_NAMES["batched"], sizes)
    precomputed = attention_calls_per_forward(tower, config, REGISTERED_NAMES["batched"], sizes, precomputed=True)
    assert sum(loop.host_reads.values()) >= 32  # transformers reads the window lengths back in every layer
    # Computed on the fly, our path reads each cu_seqlens once per forward (2), plus transformers' index helpers.
    assert on_the_fly.host_reads[("attention.py", "_groups_for")] == 2
    assert sum(precomputed.host_reads.values()) == 0, precomputed.host_reads


def test_tiny_model_logits_equal_with_our_vision_attention(tiny_model_dir, world_dir):
    """The whole tiny model, through the SFT collator's precomputed indices, against transformers' own SDPA loop."""
    from patho_r1.models import load_backbone
    from patho_r1.sft.collator import PathoVLMCollator
    from patho_r1.sft.data import conversation_rows, to_dataset

    ours = load_backbone(tiny_model_dir, dtype="float32", padding_side="right")
    theirs = load_backbone(tiny_model_dir, dtype="float32", padding_side="right", vision_attention="transformers")
    assert ours.model.config.vision_config._attn_implementation == REGISTERED_NAMES["batched"]
    assert theirs.model.config.vision_config._attn_implementation == "sdpa"
    rows = to_dataset(conversation_rows, source=str(world_dir / "sft/train.jsonl"))
    examples = [rows[i] for i in range(3)]
    batch = PathoVLMCollator(processor=ours.processor, max_length=512, model_config=ours.model.config)(examples)
    plain = {k: v for k, v in batch.items() if not k.startswith("image_") or k == "image_grid_thw"}
    plain.pop("position_ids")
    with torch.no_grad():
        a = ours.model.eval()(**batch).logits
        b = theirs.model.eval()(**plain).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_saved_checkpoint_does_not_name_our_attention(tiny_model_dir, tmp_path):
    """Our registered name lives only in the loaded model; a saved config must load anywhere."""
    from patho_r1.models import load_backbone

    backbone = load_backbone(tiny_model_dir, dtype="float32")
    backbone.model.save_pretrained(tmp_path)
    assert "flash_patho" not in (tmp_path / "config.json").read_text()


def test_auto_choices_and_refusals_on_this_machine():
    assert resolve_vision_attention("auto", on_gpu=False) == "batched"
    assert resolve_text_attention("auto", on_gpu=False) == "sdpa"
    assert resolve_text_attention(None, on_gpu=False) == "sdpa"
    assert resolve_text_attention("eager", on_gpu=False) == "eager"
    assert attention_problems(None, "auto", on_gpu=False) == []
    problems = attention_problems("flash_attention_2", "varlen", on_gpu=False)
    assert len(problems) == 2
    assert problems[0].startswith("attn_implementation: flash_attention_2 needs a CUDA GPU")
    assert problems[1].startswith("vision_attention: varlen needs a CUDA GPU")
    with pytest.raises(ValueError, match="vision_attention: 'fast'"):
        resolve_vision_attention("fast", on_gpu=False)


def test_transformers_choice_leaves_the_model_alone(tiny_model_dir):
    from patho_r1.models import load_backbone

    backbone = load_backbone(tiny_model_dir, dtype="float32", vision_attention="transformers")
    assert apply_vision_attention(backbone.model, "transformers", on_gpu=False) == "transformers"
    assert backbone.model.config.vision_config._attn_implementation == "sdpa"


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["varlen", "flash_attn"])
def test_gpu_vision_kernels_equal_the_loop(kernel):
    if kernel == "flash_attn":
        pytest.importorskip("flash_attn")
    register_vision_attention()
    tower, config = geometry_3b_tower()
    tower = tower.cuda().to(torch.bfloat16)
    x, grid = patches(SIZES["a batch of mixed sizes"])
    x, grid = x.cuda().to(torch.bfloat16), grid.cuda()
    ref, ref_dx, _ = run_tower(tower, config, "sdpa", x, grid)
    out, dx, _ = run_tower(tower, config, REGISTERED_NAMES[kernel], x, grid, precomputed=True)
    torch.testing.assert_close(out.float(), ref.float(), atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(dx.float(), ref_dx.float(), atol=3e-2, rtol=3e-2)


def test_a_transformers_that_loops_over_windows_itself_still_gets_right_answers():
    """Were a transformers version to route only its own flash names to the variable-length call, our function would
    be called once per window without `cu_seqlens`: each call is then one segment, and the result is still exact."""
    from patho_r1.attention import batched_vision_attention

    register_vision_attention()
    tower, config = geometry_3b_tower()
    x, grid = patches(SIZES["a batch of mixed sizes"])
    ref, _, _ = run_tower(tower, config, "eager", x, grid)
    from transformers import AttentionInterface

    AttentionInterface.register("patho_loop_test", batched_vision_attention)  # no "flash": transformers loops
    out, _, _ = run_tower(tower, config, "patho_loop_test", x, grid)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
