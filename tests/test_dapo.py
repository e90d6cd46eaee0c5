"""DAPO dynamic sampling on hand-built reward groups: which groups stay, the refill loop, and the cap."""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from patho_r1.rl.dapo import (
    DynamicSamplingGRPOTrainer,
    concat_batches,
    fill_batch,
    group_reward_std,
    informative_groups,
    select_rows,
)

G = 4


def test_groups_are_judged_by_reward_std_not_mean():
    rewards = torch.tensor([
        1, 1, 1, 1,  # all right: dropped
        0, 0, 0, 0,  # all wrong: dropped
        0, 1, 0, 0,  # mixed: kept
        2, 2, 2, 2.000001,  # equal up to float noise (std ~4e-7): dropped at the default threshold
        float("nan"), 1, 0, 1,  # one unscorable completion: std over the rest, kept
    ], dtype=torch.float32)
    std = group_reward_std(rewards, G)
    assert std[0] == 0 and std[1] == 0 and std[2] > 0.4
    assert informative_groups(rewards, G).tolist() == [False, False, True, False, True]
    assert informative_groups(rewards, G, min_std=0.5).tolist() == [False, False, False, False, False]
    with pytest.raises(ValueError):
        group_reward_std(torch.zeros(6), 4)


def test_fill_batch_prefers_informative_and_fills_from_the_last_round():
    a, b = "round0", "round1"
    picks, informative = fill_batch([(a, torch.tensor([True, False, True])),
                                     (b, torch.tensor([False, True, False]))], 3)
    assert informative == 3 and picks == [(a, [0, 2]), (b, [1])]
    picks, informative = fill_batch([(a, torch.tensor([False, False])), (b, torch.tensor([True, False]))], 2)
    assert informative == 1 and picks == [(b, [0]), (b, [1])]


def _batch(n_groups, prompt_len, completion_len, tag):
    n = n_groups * G
    return {
        "prompt_ids": torch.full((n, prompt_len), tag, dtype=torch.long),
        "prompt_mask": torch.ones(n, prompt_len, dtype=torch.long),
        "completion_ids": torch.arange(n).repeat_interleave(completion_len).view(n, completion_len) + 100 * tag,
        "completion_mask": torch.ones(n, completion_len, dtype=torch.long),
        "advantages": torch.arange(n, dtype=torch.float32) + 100 * tag,
        "mm_token_type_ids": torch.cat([torch.ones(n, prompt_len), torch.zeros(n, completion_len)], 1).long(),
        "image_grid_thw": torch.tensor([[1, 2, 2]] * n),
        "pixel_values": torch.arange(n * 4, dtype=torch.float32).view(n * 4, 1) + 1000 * tag,
        "num_images": [1] * n,
        "num_items_in_batch": torch.tensor(n * completion_len),
    }


def test_select_and_concat_keep_rows_images_and_padding_aligned():
    first, second = _batch(2, 5, 3, tag=1), _batch(2, 7, 6, tag=2)
    part1 = select_rows(first, [4, 5, 6, 7])  # group 1 of round 0
    part2 = select_rows(second, [0, 1, 2, 3])  # group 0 of round 1
    assert part1["pixel_values"][:, 0].tolist() == [1000 + i for i in range(16, 32)]
    out = concat_batches([part1, part2], pad_token_id=0)
    assert out["prompt_ids"].shape == (8, 7) and out["completion_ids"].shape == (8, 6)
    assert out["prompt_mask"][0].tolist() == [0, 0, 1, 1, 1, 1, 1]  # left padded
    assert out["completion_mask"][0].tolist() == [1, 1, 1, 0, 0, 0]  # right padded
    assert out["mm_token_type_ids"][0].tolist() == [0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    assert out["advantages"].tolist() == [104, 105, 106, 107, 200, 201, 202, 203]
    assert out["pixel_values"].shape == (32, 1) and out["image_grid_thw"].shape == (8, 3)
    assert out["num_images"] == [1] * 8


class _FakeTrainer(DynamicSamplingGRPOTrainer):
    """The dynamic-sampling loop with generation replaced by scripted reward groups."""

    def __init__(self, scripted_masks, max_rounds):
        self.dynamic_sampling, self.max_rounds, self.min_std = True, max_rounds, 1e-6
        self.num_generations = G
        self.model = SimpleNamespace(training=True)
        self.accelerator = SimpleNamespace(device="cpu", process_index=0, gather=lambda t: t)
        self.processing_class = SimpleNamespace(tokenizer=SimpleNamespace(pad_token_id=0))
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._script = list(scripted_masks)
        self.refill_requests = []
        self.calls = 0

    def _score(self, inputs):
        n_groups = len(inputs) // G
        mask = torch.tensor(self._script.pop(0), dtype=torch.bool)
        assert len(mask) == n_groups
        self.calls += 1
        return _batch(n_groups, 3 + self.calls, 2 + self.calls, tag=self.calls), mask

    def _refill_prompts(self, missing):
        self.refill_requests.append(missing[0])
        return [{}] * (missing[0] * G)


def test_refill_loop_collects_informative_groups_until_the_batch_is_full():
    trainer = _FakeTrainer([[True, False, False], [False, True], [True]], max_rounds=5)
    out = trainer._generate_and_score_completions([{}] * (3 * G))
    assert trainer.refill_requests == [2, 1]  # asks for exactly the missing groups
    assert out["advantages"].shape[0] == 3 * G
    assert out["advantages"][:G].tolist() == [100 + i for i in range(G)]  # round 0, group 0
    assert out["advantages"][G:2 * G].tolist() == [200 + G + i for i in range(G)]  # round 1, group 1
    m = trainer._metrics["train"]
    assert m["dynamic_sampling/rounds"] == [3.0] and m["dynamic_sampling/cap_hit"] == [0.0]
    assert m["dynamic_sampling/filtered_frac"] == [pytest.approx(1 - 3 / 6)]
    assert int(out["num_items_in_batch"]) == int(out["completion_mask"].sum())


def test_cap_stops_refilling_and_fills_with_zero_advantage_groups():
    trainer = _FakeTrainer([[False, False], [False, True], [False]], max_rounds=2)
    out = trainer._generate_and_score_completions([{}] * (2 * G))
    assert trainer.refill_requests == [2, 1]
    assert out["advantages"].shape[0] == 2 * G  # the batch keeps its size
    m = trainer._metrics["train"]
    assert m["dynamic_sampling/cap_hit"] == [1.0] and m["dynamic_sampling/rounds"] == [3.0]


def test_nothing_filtered_means_no_extra_round():
    trainer = _FakeTrainer([[True, True]], max_rounds=3)
    trainer._generate_and_score_completions([{}] * (2 * G))
    assert trainer.refill_requests == [] and trainer._metrics["train"]["dynamic_sampling/filtered_frac"] == [0.0]


def _refill_rank(rank, dataset):
    trainer = DynamicSamplingGRPOTrainer.__new__(DynamicSamplingGRPOTrainer)
    trainer.accelerator = SimpleNamespace(process_index=rank)
    trainer.num_generations, trainer.train_dataset = 1, dataset
    trainer._refill_seed, trainer._refill_order, trainer._refill_epoch = 3, [], 0
    return trainer


def test_ranks_draw_disjoint_slices_of_one_refill_stream_that_one_process_draws_whole():
    dataset = [{"id": i} for i in range(7)]
    one = _refill_rank(0, dataset)
    two = [_refill_rank(0, dataset), _refill_rank(1, dataset)]
    for missing in ([2, 3], [0, 4], [3, 3]):  # 14 prompts: the stream runs into its second permutation
        whole = [r["id"] for r in one._refill_prompts([sum(missing)])]
        halves = [[r["id"] for r in t._refill_prompts(missing)] for t in two]
        assert halves[0] + halves[1] == whole
        assert [len(h) for h in halves] == missing
    assert one._refill_epoch == 3 and sorted(whole) != whole  # shuffled, and fresh permutations were started


def _real_trainer(tiny_model_dir, world_dir, tmp_path, **over):
    from patho_r1.rl.config import RLPhaseConfig
    from patho_r1.rl.grpo import build_rl_trainer

    cfg = dict(model=str(tiny_model_dir), data=str(world_dir / "rl/train.jsonl"), output_dir=str(tmp_path / "rl"),
               per_device_train_batch_size=8, num_generations=G, max_completion_length=12, max_steps=1,
               wandb={"mode": "disabled"}, temperature=1.0, seed=0)
    cfg.update(over)
    trainer = build_rl_trainer(RLPhaseConfig(**cfg))
    trainer.model.train()
    return trainer


def _prompts(trainer, n_groups=2):
    return [dict(trainer.train_dataset[i]) for i in range(n_groups) for _ in range(G)]


def test_a_real_trl_generation_batch_is_cut_and_joined_exactly(tiny_model_dir, world_dir, tmp_path):
    trainer = _real_trainer(tiny_model_dir, world_dir, tmp_path, dynamic_sampling={"enabled": False})
    batch = trainer._generate_and_score_completions(_prompts(trainer))
    assert {"prompt_ids", "completion_ids", "advantages", "pixel_values", "image_grid_thw"} <= set(batch)
    halves = [select_rows(batch, list(range(0, G))), select_rows(batch, list(range(G, 2 * G)))]
    joined = concat_batches(halves, pad_token_id=trainer.processing_class.tokenizer.pad_token_id)
    whole = select_rows(batch, list(range(2 * G)))
    assert set(joined) == set(whole)
    for key, value in whole.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(joined[key], value), key
        else:
            assert joined[key] == value, key
    with pytest.raises(ValueError, match=r"\['image_sizes'\]"):
        select_rows({**batch, "image_sizes": torch.ones(2 * G, 2)}, [0])
    with pytest.raises(ValueError, match=r"\['new_trl_field'\]"):
        concat_batches([{**h, "new_trl_field": torch.zeros(G)} for h in halves], 0)


def test_our_weighted_total_is_the_sum_trl_trains_on(tiny_model_dir, world_dir, tmp_path, monkeypatch):
    from trl import GRPOTrainer

    from patho_r1.rewards import weighted_total

    trainer = _real_trainer(tiny_model_dir, world_dir, tmp_path, dynamic_sampling={"enabled": False},
                            rewards=[{"name": "format", "weight": 0.5}, {"name": "reward_plugins:varied", "weight": 2}])
    seen = []
    original = GRPOTrainer._calculate_rewards
    monkeypatch.setattr(GRPOTrainer, "_calculate_rewards",
                        lambda self, *a: seen.append(original(self, *a)) or seen[-1])
    trainer._generate_and_score_completions(_prompts(trainer))
    per_func = seen[0]
    assert torch.isnan(per_func[:, 1]).sum() == 3  # every third completion unscored by `varied`
    ours = torch.tensor(weighted_total(per_func.tolist(), [0.5, 2.0]))
    assert trainer._metrics["train"]["reward"][-1] == pytest.approx(float(torch.nanmean(ours)), rel=1e-6)
    assert float(ours.std()) > 0


def test_dapo_filters_groups_on_accuracy_by_default(tiny_model_dir, world_dir, tmp_path):
    """Two groups, every answer right: accuracy has no spread, format does.  DAPO drops both groups; `total` keeps
    the group whose format varies."""
    def judge(filter_metric):
        trainer = _real_trainer(tiny_model_dir, world_dir, tmp_path / filter_metric, rewards="grpo",
                                dynamic_sampling={"filter_metric": filter_metric})
        inputs = _prompts(trainer)
        golds = [row["answer"] for row in inputs]
        completions = [[{"role": "assistant", "content": f"<think>x</think><answer>{g}</answer>"
                         if i % G else f"<answer>{g}</answer>"}] for i, g in enumerate(golds[:G])]
        completions += [[{"role": "assistant", "content": f"<think>y</think><answer>{g}</answer>"}]
                        for g in golds[G:]]
        prompts = [row["prompt"] for row in inputs]
        trainer._calculate_rewards(inputs, prompts, completions, [[1, 2]] * len(inputs))
        return informative_groups(trainer._last_rewards, G).tolist()

    assert judge("accuracy") == [False, False]
    assert judge("total") == [True, False]
