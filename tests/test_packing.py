"""Packed VLM batches (sft/packing.py): each sample in a packed row gets the loss and gradients it gets alone, the
assistant-only labels hold at the sample boundaries, and a packed optimizer step equals the padded one."""

from __future__ import annotations

import json

import torch

from patho_r1.models import load_backbone
from patho_r1.sft.collator import PathoVLMCollator
from patho_r1.sft.data import caption_rows, conversation_rows, to_dataset
from patho_r1.sft.packing import padding_fraction

IGNORE = -100


def _collator(backbone, packing: bool, system_prompt: str | None = "You are a pathologist."):
    return PathoVLMCollator(processor=backbone.processor, max_length=512, completion_only_loss=True,
                            system_prompt=system_prompt, model_config=backbone.model.config, packing=packing)


def _token_losses(model, batch) -> torch.Tensor:
    """Per-token cross-entropy of the next-token targets, [rows, length - 1] (0 where the label is ignored)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")


def _examples(world_dir, n=4):
    rows = to_dataset(conversation_rows, source=str(world_dir / "sft/train.jsonl"))
    # Samples of different lengths, so that the padded batch has padding and the packed boundaries fall unevenly.
    return [rows[i] for i in range(n)]


def test_each_packed_sample_has_its_own_loss_and_gradients(tiny_model_dir, world_dir):
    backbone = load_backbone(tiny_model_dir, dtype="float32", padding_side="right")
    model = backbone.model.train()
    examples = _examples(world_dir)

    alone_losses, alone_grads = [], None
    for example in examples:
        model.zero_grad()
        loss = _token_losses(model, _collator(backbone, packing=False)([example])).sum()
        loss.backward()
        alone_losses.append(loss.detach())
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        alone_grads = grads if alone_grads is None else {n: alone_grads[n] + g for n, g in grads.items()}

    packed = _collator(backbone, packing=True)(examples)
    assert "attention_mask" not in packed and packed["input_ids"].shape[0] == 1
    assert packed["position_ids"].shape == (4, 1, packed["input_ids"].shape[1])
    model.zero_grad()
    per_token = _token_losses(model, packed)[0]
    cu = packed["cu_seq_lens_q"].tolist()
    # Target t+1 is scored at position t, so sample i's targets sit at positions cu[i]-1 .. cu[i+1]-2.
    packed_losses = [per_token[max(cu[i] - 1, 0): cu[i + 1] - 1].sum() for i in range(len(examples))]
    torch.testing.assert_close(torch.stack(packed_losses).detach(), torch.stack(alone_losses), atol=1e-4, rtol=1e-5)
    torch.stack(packed_losses).sum().backward()
    for name, param in model.named_parameters():
        if name in alone_grads:
            torch.testing.assert_close(param.grad, alone_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    # The vision tower is trained through the packed row too (its gradients came from the images).
    assert any(alone_grads[n].abs().sum() > 0 for n in alone_grads if ".visual." in n)


def test_labels_at_sample_boundaries(tiny_model_dir, world_dir):
    """The packed labels are each sample's own labels end to end, except that every sample's first token is never a
    target (so no sample learns to predict the next one's start), and nothing is padding."""
    backbone = load_backbone(tiny_model_dir, dtype="float32", padding_side="right")
    examples = _examples(world_dir)
    padded = _collator(backbone, packing=False)(examples)
    packed = _collator(backbone, packing=True)(examples)
    mask = padded["attention_mask"].bool()
    assert padding_fraction(padded) > 0 and padding_fraction(packed) == 0
    expected = torch.cat([padded["labels"][row][mask[row]] for row in range(len(examples))])
    starts = packed["cu_seq_lens_q"][:-1]
    assert (packed["labels"][0, starts] == IGNORE).all()
    keep = torch.ones_like(expected, dtype=torch.bool)
    keep[starts] = False
    assert torch.equal(packed["labels"][0][keep], expected[keep])
    assert torch.equal(packed["input_ids"][0], torch.cat([padded["input_ids"][r][mask[r]] for r in range(4)]))
    # Assistant-only: every target is inside an assistant turn; the text positions restart at each boundary.
    assert (packed["position_ids"][0, 0, starts] == 0).all()
    decoded = backbone.tokenizer.decode(packed["labels"][0][packed["labels"][0] != IGNORE])
    assert decoded.count("<|im_end|>") == sum(json.loads(e["conversation"])[-1]["role"] == "assistant"
                                              for e in examples)
    assert "You are a pathologist." not in decoded


def test_cpt_rows_pack_too(tiny_model_dir, world_dir):
    backbone = load_backbone(tiny_model_dir, dtype="float32", padding_side="right")
    rows = [dict(r) for r in list(caption_rows(str(world_dir / "cpt/train.jsonl"), "Describe this image."))[:3]]
    padded = _collator(backbone, packing=False, system_prompt=None)(rows)
    packed = _collator(backbone, packing=True, system_prompt=None)(rows)
    model = backbone.model.eval()
    with torch.no_grad():
        total_padded = _token_losses(model, padded).sum()
        total_packed = _token_losses(model, packed).sum()
    torch.testing.assert_close(total_packed, total_padded, atol=1e-3, rtol=1e-5)


def test_a_packed_optimizer_step_equals_the_padded_one(tiny_model_dir, world_dir, tmp_path):
    """Through TRL's SFTTrainer (its loss and token counting): the same weights after two steps.  Plain SGD, so that
    the weights move by the gradients themselves (Adam's first steps move each weight by about lr * sign(gradient),
    which would hide a wrong gradient)."""
    from patho_r1.sft.config import SFTPhaseConfig
    from patho_r1.sft.trainer import build_sft_trainer

    data = world_dir / "sft/train.jsonl"
    weights, tokens = {}, {}
    for packing in (False, True):
        cfg = SFTPhaseConfig(model=str(tiny_model_dir), data=str(data), output_dir=str(tmp_path / str(packing)),
                             max_steps=2, per_device_train_batch_size=4, learning_rate=0.5, warmup_ratio=0.0,
                             lr_scheduler_type="constant", max_length=512, save_steps=1000,
                             wandb={"mode": "disabled"}, packing=packing, trl={"optim": "sgd"})
        trainer, _ = build_sft_trainer(cfg, "sft", to_dataset(conversation_rows, source=str(data)), system_prompt=None)
        result = trainer.train()
        weights[packing] = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        logged = [row for row in trainer.state.log_history if "loss" in row]
        assert result.global_step == 2 and len(logged) == 2
        tokens[packing] = logged[-1]["num_tokens"]
    # TRL's token count: the padded batches' real tokens, and every token of the packed rows (the same number).
    assert tokens[True] == tokens[False] > 0
    initial = dict(load_backbone(tiny_model_dir, dtype="float32").model.named_parameters())
    assert max(float((weights[True][n] - initial[n].detach()).abs().max()) for n in weights[True]) > 1e-3
    for name, value in weights[False].items():
        torch.testing.assert_close(weights[True][name], value, atol=2e-5, rtol=1e-4, msg=name)
