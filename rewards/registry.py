"""Rewards by name: registration, third-party loading, weighted composition, and failure isolation.

A recipe names rewards with weights and parameters:

    rewards:
      - {name: format, weight: 1.0}
      - {name: accuracy, weight: 1.0, mcq_mode: strict}
      - {name: soft_overlong, weight: 1.0, max_completion_length: 2048, cache_length: 512}
      - {name: my_pkg.rewards:brevity, weight: 0.1}        # any importable callable, no edit to patho-r1

or a preset: `rewards: dapo`.  Names resolve in this order: the built-in registry, the `patho_r1.rewards` entry-point
group (a third-party package declares `[project.entry-points."patho_r1.rewards"] my_reward = "pkg.mod:factory"`),
then `package.module:attribute` import strings.

What a name points at:
* a registered name is always a **factory** (a class or a function): it is called with the spec's parameters,
  none included, and must return the reward function;
* an entry point or an import string may point at a factory or at the reward itself: a class is instantiated, a
  function whose signature takes `completions` is the reward (the spec may then give it no parameters), any other
  function is called as a factory.

The weighted sum of several rewards is `weighted_total`, with TRL's rule for missing scores, and is the one sum that
training (TRL, DAPO's group filter) and offline scoring (`RewardSet.score`) use.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

from pydantic import BaseModel, ConfigDict

from patho_r1.rewards.accuracy import AccuracyReward
from patho_r1.rewards.format import FormatReward
from patho_r1.rewards.length import SoftOverlongReward

logger = logging.getLogger(__name__)

RewardFn = Callable[..., list]
ENTRY_POINT_GROUP = "patho_r1.rewards"


@dataclass
class RewardRegistry:
    """Name -> factory.  A factory takes the spec's parameters and returns a TRL-signature reward function."""

    factories: dict[str, Callable[..., RewardFn]] = field(default_factory=dict)

    def register(self, name: str, factory: Callable[..., RewardFn] | None = None, *, overwrite: bool = False):
        def add(f):
            if name in self.factories and not overwrite:
                raise ValueError(f"reward {name!r} is already registered")
            self.factories[name] = f
            return f

        return add(factory) if factory is not None else add

    def names(self) -> list[str]:
        return sorted(set(self.factories) | {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})

    def describe(self) -> dict[str, str]:
        out = {}
        for name in self.names():
            try:
                target = self.factories.get(name) or _load_entry_point(name)
                doc = inspect.getdoc(target) or ""
            except Exception as exc:  # a broken third-party entry point must not hide the others
                doc = f"(failed to load: {exc})"
            out[name] = doc.splitlines()[0] if doc else ""
        return out

    def build(self, name: str, **params) -> RewardFn:
        if name in self.factories:
            return _call_factory(self.factories[name], params, name)
        if any(ep.name == name for ep in entry_points(group=ENTRY_POINT_GROUP)):
            target = _load_entry_point(name)
        elif ":" in name:
            target = _import_string(name)
        else:
            raise KeyError(f"unknown reward {name!r}; registered: {', '.join(self.names())}; "
                           "or give an import string 'package.module:function'")
        if not inspect.isclass(target) and _is_reward_function(target):
            if params:
                raise TypeError(f"reward {name!r} is a reward function, not a factory: it takes no parameters "
                                f"(got {', '.join(sorted(params))})")
            return target
        return _call_factory(target, params, name)


def _load_entry_point(name: str):
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            return ep.load()
    raise KeyError(name)


def _import_string(path: str):
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise KeyError(f"reward {path!r}: cannot import module {module_name!r} ({exc})") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise KeyError(f"reward {path!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def _is_reward_function(fn) -> bool:
    """TRL's reward signature names `completions`; a factory's does not."""
    try:
        return "completions" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return False


def _call_factory(factory, params: dict, name: str) -> RewardFn:
    if not callable(factory):
        raise TypeError(f"reward {name!r} resolved to a non-callable {type(factory).__name__}")
    fn = factory(**params)
    if not callable(fn):
        raise TypeError(f"reward {name!r}: its factory returned a non-callable {type(fn).__name__}")
    return fn


REGISTRY = RewardRegistry()
REGISTRY.register("format", FormatReward)
REGISTRY.register("accuracy", AccuracyReward)
REGISTRY.register("soft_overlong", SoftOverlongReward)


def register_reward(name: str, factory: Callable[..., RewardFn] | None = None, *, overwrite: bool = False):
    """Register a reward factory (or class) under `name` in the default registry.  Usable as a decorator."""
    return REGISTRY.register(name, factory, overwrite=overwrite)


class RewardSpec(BaseModel):
    """One reward in a recipe: its name, its weight in the sum, and any parameters for its factory."""

    model_config = ConfigDict(extra="allow")
    name: str
    weight: float = 1.0

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


PRESETS: dict[str, list[dict]] = {
    "grpo": [{"name": "format", "weight": 1.0}, {"name": "accuracy", "weight": 1.0}],
    "dapo": [{"name": "format", "weight": 1.0}, {"name": "accuracy", "weight": 1.0},
             {"name": "soft_overlong", "weight": 1.0}],
}


def expand_preset(specs: str | Iterable[dict | RewardSpec]) -> list[RewardSpec]:
    if isinstance(specs, str):
        if specs not in PRESETS:
            raise KeyError(f"unknown reward preset {specs!r}; presets: {', '.join(PRESETS)}")
        specs = PRESETS[specs]
    return [s if isinstance(s, RewardSpec) else RewardSpec.model_validate(s) for s in specs]


def weighted_total(rows: Iterable[Sequence[float | None]], weights: Sequence[float]) -> list[float]:
    """The weighted sum of each row's scores (one score per reward), with TRL's `GRPOTrainer` rule for missing
    scores: a None or NaN score is left out of its row's sum, and a row with no score at all is NaN (unscorable: TRL
    excludes it from the group baseline and gives it zero advantage)."""
    out = []
    for row in rows:
        present = [(w, v) for w, v in zip(weights, row, strict=True) if v is not None and not math.isnan(v)]
        out.append(math.fsum(w * v for w, v in present) if present else math.nan)
    return out


class RewardFailure(RuntimeError):
    """A reward failed on every sample of a batch for the same reason: a bug or a missing column, not noise."""


class SafeReward:
    """Wraps a reward so that one bad sample never stops training.

    When the batch call raises, each sample is re-scored alone: samples that still raise get `fallback` (0.0), the
    others keep their real score.  Failures are counted, logged with the reward's name, and reported to TRL through
    its `log_metric` hook as `<name>/failures`.  When every sample of a batch (of two or more) fails with the same
    error, that is a bug, and `RewardFailure` is raised naming the reward and the error.  A wrong-length result is a
    bug in the reward and is raised too.
    """

    def __init__(self, fn: RewardFn, name: str, fallback: float = 0.0, log_every: int = 100):
        self.fn = fn
        self.__name__ = name
        self.fallback = fallback
        self.failures = 0
        self.log_every = log_every

    def __call__(self, prompts=None, completions=None, completion_ids=None, **columns) -> list:
        n = len(completions)
        try:
            out = list(self.fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns))
        except Exception as exc:
            out = self._per_sample(prompts, completions, completion_ids, columns, exc)
        if len(out) != n:
            raise ValueError(f"reward {self.__name__!r} returned {len(out)} values for {n} completions")
        out = [None if v is None else (self.fallback if not math.isfinite(float(v)) else float(v)) for v in out]
        log_metric = columns.get("log_metric")
        if callable(log_metric):
            log_metric(f"{self.__name__}/failures", float(self.failures))
        return out

    def _per_sample(self, prompts, completions, completion_ids, columns, batch_exc) -> list:
        n = len(completions)
        out, errors = [], []
        for i in range(n):
            one = {k: (v[i:i + 1] if isinstance(v, list) and len(v) == n else v) for k, v in columns.items()}
            try:
                value = self.fn(prompts=prompts[i:i + 1] if prompts is not None else None,
                                completions=completions[i:i + 1],
                                completion_ids=completion_ids[i:i + 1] if completion_ids is not None else None, **one)
                out.append(list(value)[0])
            except Exception as exc:
                errors.append(exc)
                out.append(self.fallback)
        reasons = {f"{type(e).__name__}: {e}" for e in errors}
        if n > 1 and len(errors) == n and len(reasons) == 1:
            raise RewardFailure(f"reward {self.__name__!r} failed on all {n} samples of a batch with the same error: "
                                f"{reasons.pop()}") from errors[0]
        for exc in errors:
            self.failures += 1
            if self.failures == 1 or self.failures % self.log_every == 0:
                logger.warning("reward %r failed on a sample (%d failures so far): %s: %s", self.__name__,
                               self.failures, type(exc).__name__, exc)
        if not errors:  # the batch failed but every sample alone succeeded: count the batch failure once
            self.failures += 1
            logger.warning("reward %r failed on a batch but not per sample: %s", self.__name__, batch_exc)
        return out


@dataclass
class RewardSet:
    funcs: list[SafeReward]
    weights: list[float]
    specs: list[RewardSpec]

    @property
    def names(self) -> list[str]:
        return [f.__name__ for f in self.funcs]

    def score(self, completions: list, **columns) -> dict[str, list]:
        """Offline scoring: each reward's values plus the weighted `total`, summed exactly as training sums them
        (`weighted_total`); an unscorable row's total is None."""
        prompts = columns.pop("prompts", None) or [""] * len(completions)
        completion_ids = columns.pop("completion_ids", None)
        out: dict[str, list] = {}
        for fn in self.funcs:
            out[fn.__name__] = fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
        totals = weighted_total(zip(*out.values(), strict=True), self.weights)
        out["total"] = [None if math.isnan(t) else t for t in totals]
        return out

    def close(self) -> None:
        for fn in self.funcs:
            close = getattr(fn.fn, "close", None)
            if callable(close):
                close()


def reward_labels(specs: Iterable[RewardSpec]) -> list[str]:
    """The name each reward is logged and filtered under: the last part of its name, made unique."""
    labels: list[str] = []
    for spec in specs:
        label = spec.name.split(":")[-1].split(".")[-1]
        labels.append(label if label not in labels else f"{label}_{len(labels)}")
    return labels


def build_rewards(specs: str | Iterable[dict | RewardSpec], *, registry: RewardRegistry = REGISTRY,
                  max_completion_length: int | None = None) -> RewardSet:
    """Build the reward functions and weights for `GRPOTrainer(reward_funcs=..., args.reward_weights=...)`.

    `max_completion_length`, when given, is passed to `soft_overlong` unless its spec sets it, so the penalty always
    matches the rollout's real limit.
    """
    specs = expand_preset(specs)
    funcs, weights = [], []
    for spec, label in zip(specs, reward_labels(specs), strict=True):
        params = spec.params
        if spec.name == "soft_overlong" and max_completion_length is not None:
            given = params.setdefault("max_completion_length", max_completion_length)
            if given != max_completion_length:
                raise ValueError(f"soft_overlong: max_completion_length {given} disagrees with the rollout's "
                                 f"{max_completion_length}")
            if "cache_length" not in params:  # DAPO uses a quarter of the limit (4096 of 16384); cap at 512
                params["cache_length"] = max(1, min(512, params["max_completion_length"] // 4))
        fn = registry.build(spec.name, **params)
        funcs.append(SafeReward(fn, label))
        weights.append(spec.weight)
    if not funcs:
        raise ValueError("at least one reward is needed")
    return RewardSet(funcs=funcs, weights=weights, specs=specs)
