"""DAPO's dynamic sampling on top of TRL's `GRPOTrainer`, readable top to bottom.

TRL 1.16 implements DAPO's clip-higher (`epsilon_high`), token-level loss (`loss_type="dapo"`) and overlong filtering
(`mask_truncated_completions`), and the `soft_overlong` reward (`patho_r1.rewards.length`) gives the overlong reward
shaping.  The fourth DAPO ingredient, **dynamic sampling**, is missing: a group whose G completions are all right or
all wrong carries no accuracy signal, so it only dilutes the batch.  DAPO (Yu et al. 2025, Algorithm 1) drops such
groups and keeps sampling until the batch is full of informative ones.

How it works here, per generation batch (one call of `_generate_and_score_completions` in training):

1. Generate and score the batch TRL handed us, exactly as TRL would.
2. Keep the groups whose `filter_metric` varies: its standard deviation within the group is above `min_std`.  The
   metric is the accuracy reward by default, as in the DAPO paper (prompts whose accuracy is 1 or 0 are filtered
   out) and verl's reference recipe (`filter_groups.metric: acc`): a group whose answers are all right or all wrong
   is dropped even when format or length rewards differ inside it.  `filter_metric: total` filters on the weighted
   sum instead.
3. While some process has fewer than its batch's number of groups and fewer than `max_rounds` extra rounds were
   run, each process draws its missing number of fresh prompts from a seeded refill stream over the training set
   (shared by all processes, each taking its own slice), generates and scores them, and keeps their informative
   groups.  All processes run the same rounds (the shortfalls are all-gathered), because generation and reward
   gathering are collective operations.
4. Assemble a batch of exactly the original size: kept groups first; if the cap was hit, the remaining slots are
   filled with filtered groups from the last round (no accuracy signal; whatever advantage the other rewards give).

Deviations from the paper, on purpose:
* **Soft cap.** The paper samples until full.  A hard cap on extra rounds bounds the step time; when it is hit we
  fill with filtered groups (what plain GRPO would have trained on) and log `dynamic_sampling/cap_hit`
  instead of crashing or stalling the run.
* **Refill prompts** come from an independent seeded permutation of the training set, not from the next batches of
  the main dataloader, so the epoch accounting and resume of TRL's sampler are untouched.  With groups that depend
  only on their prompt, N processes make the same decisions and log the same metrics as one process holding the
  global batch (`tests/test_multiworker.py`).
* **Missing scores.** A completion the filter reward did not score (it returned None) is left out of its group's
  spread; the total uses TRL's own rule (`patho_r1.rewards.weighted_total`).
* **Groups must be process-local** (`per_device_train_batch_size * steps_per_generation` divisible by
  `num_generations`), so each process filters its own groups without moving data between ranks.

Metrics, summed over all processes: `dynamic_sampling/filtered_frac` (share of all generated groups dropped),
`dynamic_sampling/rounds`, `dynamic_sampling/cap_hit`, `dynamic_sampling/extra_groups`, plus `timing/rollout_s`
(generation and scoring) and `timing/reward_s` (scoring) for every generation batch, and `timing/update_s` (the rest
of the optimizer step: log-probabilities, loss, backward, optimizer) for every step.

The trainer also makes TRL's colocated vLLM engine safe for images (rl/vllm_engine.py): vLLM's processor gets the HF
processor's pixel budget, and vLLM's encoder cache is emptied after every rollout.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from typing import Any

import torch
from trl import GRPOTrainer

from patho_r1.rewards.registry import weighted_total
from patho_r1.rl.vllm_engine import clear_vllm_encoder_cache, vllm_engine_kwargs, vllm_processor_kwargs
from patho_r1.training import ResumeWeightsMixin

# ----------------------------------------------------------------------------------------------------------------------
# 1. Which groups carry signal
# ----------------------------------------------------------------------------------------------------------------------


def group_reward_std(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """Per-group standard deviation of a per-row score (NaN rows left out); rows are ordered group by group
    ([B] -> [B/G])."""
    if rewards.numel() % num_generations:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {num_generations}")
    grouped = rewards.view(-1, num_generations)
    valid = ~torch.isnan(grouped)
    filled = torch.where(valid, grouped, torch.zeros_like(grouped))
    count = valid.sum(dim=1).clamp(min=1)
    mean = filled.sum(dim=1) / count
    var = (torch.where(valid, grouped - mean[:, None], torch.zeros_like(grouped)) ** 2).sum(dim=1) / count
    return var.sqrt()


def informative_groups(rewards: torch.Tensor, num_generations: int, min_std: float = 1e-6) -> torch.Tensor:
    """Boolean mask over groups: True where the rewards differ within the group."""
    return group_reward_std(rewards, num_generations) > min_std


@dataclass
class Selection:
    """The outcome of dynamic sampling for one generation batch (all counts are groups)."""

    kept: int
    generated: int
    rounds: int
    cap_hit: bool

    @property
    def filtered_frac(self) -> float:
        return 1.0 - self.kept / self.generated if self.generated else 0.0


def fill_batch(rounds: list[tuple[Any, torch.Tensor]], target_groups: int) -> tuple[list[tuple[Any, list[int]]], int]:
    """Choose which groups of which round make up the batch.

    `rounds` holds `(batch, informative_mask)` per round.  Informative groups are taken in order until
    `target_groups`; if there are too few, the shortfall is filled with uninformative groups, latest round first.
    Returns `[(batch, group_indices)]` and the number of informative groups used.
    """
    picks: list[tuple[Any, list[int]]] = []
    taken = 0
    for batch, mask in rounds:
        idx = [i for i, ok in enumerate(mask.tolist()) if ok][: target_groups - taken]
        if idx:
            picks.append((batch, idx))
            taken += len(idx)
    informative = taken
    for batch, mask in reversed(rounds):
        if taken >= target_groups:
            break
        idx = [i for i, ok in enumerate(mask.tolist()) if not ok][: target_groups - taken]
        if idx:
            picks.append((batch, idx))
            taken += len(idx)
    if taken < target_groups:
        raise RuntimeError(f"only {taken} groups available for a batch of {target_groups}")
    return picks, informative


# ----------------------------------------------------------------------------------------------------------------------
# 2. Cutting and joining TRL's generation batches
# ----------------------------------------------------------------------------------------------------------------------

# Per-row tensors padded on the left (prompt side) or on the right (completion side), with their padding values.
_LEFT = {"prompt_ids": None, "prompt_mask": 0}
_RIGHT = {"completion_ids": None, "completion_mask": 0, "old_per_token_logps": 0.0, "ref_per_token_logps": 0.0,
          "sampling_per_token_logps": 0.0, "importance_sampling_ratio": 1.0, "tool_mask": 1}
_SPLIT_PROMPT_COMPLETION = ("mm_token_type_ids", "token_type_ids")  # cover prompt + completion
_PER_ROW = ("advantages",)
_IMAGES = ("pixel_values", "image_grid_thw", "num_images")  # per image / per patch, cut by each row's image grid
_RECOMPUTED = ("num_items_in_batch",)  # a batch total, recomputed for the joined batch
# Every key of TRL 1.16's generation batch that this module knows how to cut and join.  Anything else (a key a newer
# TRL adds, or another model's image layout such as `image_sizes` or `num_tiles`) is an error, never a silent copy.
KNOWN_BATCH_KEYS = frozenset((*_LEFT, *_RIGHT, *_SPLIT_PROMPT_COMPLETION, *_PER_ROW, *_IMAGES, *_RECOMPUTED))


def check_batch_keys(batch: dict) -> None:
    unknown = sorted(set(batch) - KNOWN_BATCH_KEYS)
    if unknown:
        raise ValueError(f"dynamic sampling does not know how to cut or join the generation-batch key(s) {unknown}: "
                         "TRL or the model's processor produced a field patho_r1.rl.dapo was not written for; add it "
                         "to the key tables in rl/dapo.py (or turn dynamic_sampling off)")


def _rows_for_groups(group_idx: list[int], num_generations: int) -> list[int]:
    return [g * num_generations + j for g in group_idx for j in range(num_generations)]


def _pad(t: torch.Tensor, length: int, value, left: bool) -> torch.Tensor:
    missing = length - t.size(1)
    if missing <= 0:
        return t
    pad = torch.full((t.size(0), missing, *t.shape[2:]), value, dtype=t.dtype, device=t.device)
    return torch.cat([pad, t] if left else [t, pad], dim=1)


def select_rows(batch: dict, rows: list[int]) -> dict:
    """The sub-batch of `rows`, images included (pixel rows follow each sample's image grid)."""
    check_batch_keys(batch)
    out = {}
    index = torch.tensor(rows, dtype=torch.long)
    n_rows = batch["prompt_ids"].size(0)
    for key, value in batch.items():
        if key in _IMAGES or key in _RECOMPUTED:
            continue
        if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.size(0) == n_rows:
            out[key] = value.index_select(0, index.to(value.device))
        elif isinstance(value, list) and len(value) == n_rows:
            out[key] = [value[i] for i in rows]
        else:
            raise ValueError(f"generation-batch key {key!r} is not one value per row ({n_rows} rows)")
    if "image_grid_thw" in batch:
        num_images = batch["num_images"]
        grid = batch["image_grid_thw"]
        patches = grid.prod(dim=-1).tolist()
        img_start = [0]
        for n in num_images:
            img_start.append(img_start[-1] + n)
        pix_start = [0]
        for p in patches:
            pix_start.append(pix_start[-1] + p)
        img_idx = [k for r in rows for k in range(img_start[r], img_start[r + 1])]
        out["image_grid_thw"] = grid[img_idx]
        out["pixel_values"] = torch.cat([batch["pixel_values"][pix_start[k]:pix_start[k + 1]] for k in img_idx]) \
            if img_idx else batch["pixel_values"][:0]
        out["num_images"] = [num_images[r] for r in rows]
    return out


def concat_batches(parts: list[dict], pad_token_id: int) -> dict:
    """Join sub-batches from different generation rounds, re-padding prompts left and completions right."""
    for part in parts:
        check_batch_keys(part)
    if len(parts) == 1:
        return parts[0]
    p_len = max(p["prompt_ids"].size(1) for p in parts)
    c_len = max(p["completion_ids"].size(1) for p in parts)
    out: dict[str, Any] = {}
    for key in parts[0]:
        values = [p[key] for p in parts]
        if key in _LEFT:
            fill = pad_token_id if _LEFT[key] is None else _LEFT[key]
            out[key] = torch.cat([_pad(v, p_len, fill, left=True) for v in values])
        elif key in _RIGHT and values[0].dim() >= 2 and values[0].size(1) > 1:
            fill = pad_token_id if _RIGHT[key] is None else _RIGHT[key]
            out[key] = torch.cat([_pad(v, c_len, fill, left=False) for v in values])
        elif key in _SPLIT_PROMPT_COMPLETION:
            joined = []
            for p, v in zip(parts, values, strict=True):
                cut = p["prompt_ids"].size(1)
                joined.append(torch.cat([_pad(v[:, :cut], p_len, 0, left=True),
                                         _pad(v[:, cut:], c_len, 0, left=False)], dim=1))
            out[key] = torch.cat(joined)
        elif isinstance(values[0], torch.Tensor):  # per row (advantages, per-sequence ratios) or per image
            out[key] = torch.cat(values)
        else:  # lists: num_images
            out[key] = [x for v in values for x in v]
    return out


# ----------------------------------------------------------------------------------------------------------------------
# 3. The trainer
# ----------------------------------------------------------------------------------------------------------------------


class DynamicSamplingGRPOTrainer(ResumeWeightsMixin, GRPOTrainer):
    """`GRPOTrainer` + DAPO dynamic sampling (optional) + rollout/reward timing metrics (+ correct resume) + a colocated
    vLLM engine with the HF processor's pixel budget and no encoder cache left after a rollout."""

    def __init__(self, *args, dynamic_sampling: bool = False, max_rounds: int = 3, min_std: float = 1e-6,
                 filter_metric: str = "accuracy", refill_seed: int = 0, **kwargs):
        bound = inspect.signature(GRPOTrainer.__init__).bind_partial(self, *args, **kwargs).arguments
        mm_kwargs = vllm_processor_kwargs(bound.get("processing_class"))
        with vllm_engine_kwargs(**({"mm_processor_kwargs": mm_kwargs} if mm_kwargs else {})):
            super().__init__(*args, **kwargs)
        self.dynamic_sampling = dynamic_sampling
        self.max_rounds = max_rounds
        self.min_std = min_std
        if dynamic_sampling and filter_metric != "total" and filter_metric not in self.reward_func_names:
            raise ValueError(f"filter_metric: {filter_metric!r} is not one of the rewards "
                             f"({', '.join(self.reward_func_names)}) or 'total'")
        self.filter_metric = filter_metric
        self._refill_seed = refill_seed
        self._refill_order: list[int] = []
        self._refill_epoch = 0
        self._last_rewards: torch.Tensor | None = None
        self._rollout_clock = 0.0  # seconds spent generating and scoring, summed over the whole run
        self._update_s = 0.0  # this optimizer step's time outside generation and scoring
        if dynamic_sampling:
            local_rows = self.args.per_device_train_batch_size * self.args.steps_per_generation
            if local_rows % self.num_generations:
                raise ValueError(
                    "dynamic_sampling: per_device_train_batch_size * steps_per_generation "
                    f"({local_rows}) must be a multiple of num_generations ({self.num_generations}) so that every "
                    "group lives on one process")

    # -- the colocated engine: its encoder cache emptied after every rollout -------------------------------------------
    def _generate(self, prompts):
        out = super()._generate(prompts)
        if self.use_vllm and self.vllm_mode == "colocate":
            clear_vllm_encoder_cache(self.vllm_generation.llm)
        return out

    # -- rewards: remember the filter metric per row so groups can be judged -----------------------------------------
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        t0 = time.perf_counter()
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        if self.dynamic_sampling:
            rank = self.accelerator.process_index
            local = rewards_per_func[rank * len(prompts):(rank + 1) * len(prompts)].detach().cpu()
            if self.filter_metric == "total":
                self._last_rewards = torch.tensor(weighted_total(local.tolist(), self.reward_weights.tolist()))
            else:
                self._last_rewards = local[:, self.reward_func_names.index(self.filter_metric)]
        self._metrics["train" if self.model.training else "eval"]["timing/reward_s"].append(time.perf_counter() - t0)
        return rewards_per_func

    def _score(self, inputs) -> tuple[dict, torch.Tensor | None]:
        """TRL's generation and scoring, timed; with dynamic sampling also the mask of informative groups."""
        t0 = time.perf_counter()
        batch = super()._generate_and_score_completions(inputs)
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["timing/rollout_s"].append(time.perf_counter() - t0)
        self._rollout_clock += time.perf_counter() - t0
        if not self.dynamic_sampling:
            return batch, None
        return batch, informative_groups(self._last_rewards, self.num_generations, self.min_std)

    def training_step(self, model, inputs, num_items_in_batch):
        """TRL's step, timed: `timing/update_s` is the optimizer step's time less its generation and scoring."""
        t0, rollout0 = time.perf_counter(), self._rollout_clock
        output = super().training_step(model, inputs, num_items_in_batch)
        self._update_s += (time.perf_counter() - t0) - (self._rollout_clock - rollout0)
        if self._step % self.current_gradient_accumulation_steps == 0:
            self._metrics["train"]["timing/update_s"].append(self._update_s)
            self._update_s = 0.0
        return output

    # -- refill prompts ---------------------------------------------------------------------------------------------
    def _refill_prompts(self, missing: list[int]) -> list[dict]:
        """This rank's refill prompts, `missing[rank]` groups, from one refill stream all ranks share.

        The stream is a seeded sequence of permutations of the training set, the same on every rank; each round,
        rank r takes the `missing[r]` prompts after those of ranks 0..r-1, and the stream moves on by their sum.  So
        the prompts drawn depend on the global shortfall only: one process holding the whole global batch draws the
        same prompts, in the same order, as two ranks holding half of it each.
        """
        rank = self.accelerator.process_index
        total = sum(missing)
        while len(self._refill_order) < total:
            g = torch.Generator().manual_seed(self._refill_seed + 7919 * self._refill_epoch)
            self._refill_order += torch.randperm(len(self.train_dataset), generator=g).tolist()
            self._refill_epoch += 1
        start = sum(missing[:rank])
        rows = [self.train_dataset[i] for i in self._refill_order[start:start + missing[rank]]]
        del self._refill_order[:total]
        return [dict(row) for row in rows for _ in range(self.num_generations)]

    # -- the loop ---------------------------------------------------------------------------------------------------
    def _generate_and_score_completions(self, inputs):
        if not (self.dynamic_sampling and self.model.training):
            return self._score(inputs)[0]
        target = len(inputs) // self.num_generations
        batch, mask = self._score(inputs)
        rounds = [(batch, mask)]
        kept, generated, extra_rounds = int(mask.sum()), target, 0
        while extra_rounds < self.max_rounds:
            # Every rank learns every rank's shortfall: the decision to refill, and which prompts each rank draws,
            # are global (all processes run the same rounds, because generation and reward gathering are collective).
            missing = self.accelerator.gather(torch.tensor([max(target - kept, 0)], device=self.accelerator.device))
            missing = [int(m) for m in missing.tolist()]
            if max(missing) == 0:
                break
            mine = missing[self.accelerator.process_index]
            if mine:
                batch, mask = self._score(self._refill_prompts(missing))
                rounds.append((batch, mask))
                kept += int(mask.sum())
                generated += mine
            else:
                # A full rank still takes part in the round's collectives, with one group it then throws away; its
                # prompt is one it already has, so the shared refill stream is not consumed.
                self._refill_prompts(missing)
                self._score(inputs[: self.num_generations])
            extra_rounds += 1
        picks, informative = fill_batch(rounds, target)
        pad_id = self.processing_class.tokenizer.pad_token_id if hasattr(self.processing_class, "tokenizer") \
            else self.processing_class.pad_token_id
        parts = [select_rows(b, _rows_for_groups(idx, self.num_generations)) for b, idx in picks]
        out = concat_batches(parts, pad_id)
        out["num_items_in_batch"] = self.accelerator.gather(out["completion_mask"].sum()).sum()
        # Logged over all ranks (the main process logs), so a 2-rank run reports what one process holding the whole
        # global batch would.
        counts = self.accelerator.gather(torch.tensor([[informative, generated, target]],
                                                      device=self.accelerator.device)).sum(dim=0).tolist()
        selection = Selection(kept=int(counts[0]), generated=int(counts[1]), rounds=1 + extra_rounds,
                              cap_hit=counts[0] < counts[2])
        metrics = self._metrics["train"]
        metrics["dynamic_sampling/filtered_frac"].append(selection.filtered_frac)
        metrics["dynamic_sampling/rounds"].append(float(selection.rounds))
        metrics["dynamic_sampling/cap_hit"].append(float(selection.cap_hit))
        metrics["dynamic_sampling/extra_groups"].append(float(counts[1] - counts[2]))
        return out
