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
import numbers
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from patho_r1.rewards.accuracy import AccuracyReward
from patho_r1.rewards.format import FormatReward
from patho_r1.rewards.grounding import GroundingReward
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

    def resolve(self, name: str) -> tuple[Callable, bool]:
        """What `name` points at, and whether that is the reward itself (else a factory); nothing is called.
        Raises KeyError for a name that resolves to nothing, TypeError for something that is not reward-shaped."""
        if name in self.factories:
            return self.factories[name], False
        if any(ep.name == name for ep in entry_points(group=ENTRY_POINT_GROUP)):
            target = _load_entry_point(name)
        elif ":" in name:
            target = _import_string(name)
        else:
            raise KeyError(f"unknown reward {name!r}; registered: {', '.join(self.names())}; "
                           "or give an import string 'package.module:function'")
        if not callable(target) or inspect.isbuiltin(target) or _from_stdlib(target):
            raise TypeError(f"reward {name!r} resolves to {target!r}, which is neither a reward "
                            "(a function taking `completions`) nor a factory of one")
        return target, not inspect.isclass(target) and _is_reward_function(target)

    def check(self, name: str, params: dict) -> None:
        """Fail as `build` would, without calling anything: unknown names, unknown or missing parameters."""
        _check_params(name, *self.resolve(name), params)

    def build(self, name: str, **params) -> RewardFn:
        target, is_reward = self.resolve(name)
        _check_params(name, target, is_reward, params)
        return target if is_reward else _call_factory(target, params, name)


def _check_params(name: str, target: Callable, is_reward: bool, params: dict) -> None:
    """The spec's parameters against what `target` takes: none for a reward function, its signature for a factory."""
    if is_reward:
        if params:
            raise TypeError(f"reward {name!r} is a reward function, not a factory: it takes no parameters "
                            f"(got {', '.join(sorted(params))})")
        return
    try:
        inspect.signature(target).bind(**params)
    except TypeError as exc:
        raise TypeError(f"reward {name!r}: {exc} (its parameters: {inspect.signature(target)})") from None
    except ValueError:  # no signature to read (a C-level class): leave it to the call
        pass


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


def _from_stdlib(obj) -> bool:
    """`os:system` and its kind: importable, callable, and never a reward."""
    module = (getattr(obj, "__module__", None) or "").split(".")[0]
    return module in sys.stdlib_module_names


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
REGISTRY.register("grounding", GroundingReward)


def register_reward(name: str, factory: Callable[..., RewardFn] | None = None, *, overwrite: bool = False):
    """Register a reward factory (or class) under `name` in the default registry.  Usable as a decorator."""
    return REGISTRY.register(name, factory, overwrite=overwrite)


class RewardSpec(BaseModel):
    """One reward in a recipe: its name, its weight in the sum, its time limit per call, and any parameters for its
    factory."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    name: str
    weight: float = Field(1.0, ge=0, description="its weight in the sum; a penalty is a reward that returns "
                          "negative values")
    call_timeout: float | None = Field(60.0, gt=0, description="seconds one call may take; past it the batch "
                                       "scores `fallback` and the step goes on (None: no limit)")

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


class RewardTimeout(RuntimeError):
    """One call of a reward ran past its time limit."""


class SafeReward:
    """Wraps a reward so that a fault costs at most the samples it touches, never the step or the run.

    * **Time.** Each call runs under a hard limit (`timeout` seconds, the spec's `call_timeout`).  Past it the whole
      batch scores `fallback`, the failures are counted, and training goes on.  The stuck call is left behind in a
      daemon thread: Python cannot stop a thread, but the step no longer waits for it.  (math-verify, which can hang
      inside C code, runs in the verifier's process pool, whose workers are killed at their limit.)
    * **Exceptions.** When the batch call raises, each sample is re-scored alone: samples that still raise get
      `fallback` (0.0), the others keep their real score.
    * **Return values.** The result must be one value per completion: None (TRL's "not applicable") or a finite
      real number.  A string, a dict or a wrong length for the whole batch, or a NaN, an inf or an object for one
      sample, costs those samples `fallback`, is counted, and is logged once with an example.
    * **Bugs.** When every sample of a batch (of two or more) fails for the same reason, `RewardFailure` is raised
      naming the reward and the reason: that is a bug or a missing column, not noise.

    Failures are reported to TRL through its `log_metric` hook as `<name>/failures` (a running count).
    """

    def __init__(self, fn: RewardFn, name: str, fallback: float = 0.0, log_every: int = 100,
                 timeout: float | None = 60.0):
        self.fn = fn
        self.__name__ = name
        self.fallback = fallback
        self.failures = 0
        self.log_every = log_every
        self.timeout = timeout
        self._logged: set[str] = set()

    def __call__(self, prompts=None, completions=None, completion_ids=None, **columns) -> list:
        n = len(completions)
        try:
            out = self._values(self._call(prompts, completions, completion_ids, columns), n)
        except RewardTimeout as exc:
            self._count(n, str(exc), example=None)
            out = [self.fallback] * n
        except Exception as exc:  # raised, or returned no list of n values: find the samples at fault
            out = self._per_sample(prompts, completions, completion_ids, columns, exc)
        out = self._checked(out)
        log_metric = columns.get("log_metric")
        if callable(log_metric):
            log_metric(f"{self.__name__}/failures", float(self.failures))
        return out

    def _call(self, prompts, completions, completion_ids, columns):
        kwargs = dict(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
        if not self.timeout:
            return self.fn(**kwargs)
        box: dict[str, Any] = {}

        def run():
            try:
                box["value"] = self.fn(**kwargs)
            except BaseException as exc:  # handed to the caller below
                box["error"] = exc

        worker = threading.Thread(target=run, name=f"reward-{self.__name__}", daemon=True)
        worker.start()
        worker.join(self.timeout)
        if worker.is_alive():
            raise RewardTimeout(f"reward {self.__name__!r} took longer than its {self.timeout:g} s limit "
                                f"(call_timeout) on a batch of {len(completions)}")
        if "error" in box:
            raise box["error"]
        return box["value"]

    def _values(self, result, n: int) -> list:
        if isinstance(result, (str, bytes, dict)) or not hasattr(result, "__len__"):
            raise TypeError(f"returned a {type(result).__name__}, not a list of {n} scores")
        values = result.tolist() if hasattr(result, "tolist") else list(result)
        if len(values) != n:
            raise TypeError(f"returned {len(values)} values for {n} completions")
        return values

    def _per_sample(self, prompts, completions, completion_ids, columns, batch_exc) -> list:
        n = len(completions)
        out, errors = [], []
        for i in range(n):
            one = {k: (v[i:i + 1] if isinstance(v, list) and len(v) == n else v) for k, v in columns.items()}
            try:
                value = self._values(self._call(prompts[i:i + 1] if prompts is not None else None,
                                                completions[i:i + 1],
                                                completion_ids[i:i + 1] if completion_ids is not None else None,
                                                one), 1)
                out.append(value[0])
            except RewardTimeout as exc:  # one sample hung: the rest would too; score them all as failed
                self._count(n - len(out), str(exc), example=None)
                return out + [self.fallback] * (n - len(out))
            except Exception as exc:
                errors.append(exc)
                out.append(self.fallback)
        reasons = {f"{type(e).__name__}: {e}" for e in errors}
        if n > 1 and len(errors) == n and len(reasons) == 1:
            raise RewardFailure(f"reward {self.__name__!r} failed on all {n} samples of a batch with the same error: "
                                f"{reasons.pop()}") from errors[0]
        for exc in errors:
            self._count(1, f"{type(exc).__name__}: {exc}", example=None)
        if not errors:  # the batch failed but every sample alone succeeded: count the batch failure once
            self._count(1, f"failed on a batch but not per sample: {batch_exc}", example=None)
        return out

    def _checked(self, values: list) -> list:
        """None or a finite real number per sample; anything else is that sample's failure."""
        out, bad = [], []
        for v in values:
            if v is None:
                out.append(None)
            elif isinstance(v, numbers.Real) and math.isfinite(v):
                out.append(float(v))
            else:
                bad.append(v)
                out.append(self.fallback)
        if not bad:
            return out
        reasons = {_bad_value_reason(v) for v in bad}
        if len(values) > 1 and len(bad) == len(values) and len(reasons) == 1:
            raise RewardFailure(f"reward {self.__name__!r} returned {reasons.pop()} for all {len(values)} samples "
                                f"of a batch, e.g. {bad[0]!r}")
        for v in bad:
            self._count(1, f"returned {_bad_value_reason(v)}", example=v)
        return out

    def _count(self, k: int, reason: str, example) -> None:
        self.failures += k
        kind = reason.split(":")[0]
        if kind not in self._logged or self.failures % self.log_every < k:
            self._logged.add(kind)
            logger.warning("reward %r failed (%d failures so far): %s%s", self.__name__, self.failures, reason,
                           "" if example is None else f" (example: {example!r:.200})")


def _bad_value_reason(v) -> str:
    if isinstance(v, numbers.Real):
        return "a non-finite number (NaN or inf)"
    return f"a {type(v).__name__} instead of a number"


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


def check_reward_specs(specs: Iterable[RewardSpec], registry: RewardRegistry | None = None) -> list[str]:
    """Every problem of a reward list that `build_rewards` would hit, as `rewards.I...: message` lines, found
    without building anything (recipes run this at validation, before any model loads)."""
    registry = registry or REGISTRY
    problems = []
    for i, spec in enumerate(specs):
        try:
            registry.check(spec.name, spec.params)
        except (KeyError, TypeError) as exc:
            problems.append(f"rewards.{i}.name: {exc.args[0] if exc.args else exc}")
    return problems


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
        funcs.append(SafeReward(fn, label, timeout=spec.call_timeout))
        weights.append(spec.weight)
    if not funcs:
        raise ValueError("at least one reward is needed")
    return RewardSet(funcs=funcs, weights=weights, specs=specs)
