"""KL estimators (``KL_ESTIMATORS``), KL-coefficient controllers, and the ``kl:`` section (``KLConfig``).

Per-token estimators of KL(pi || pi_ref) from samples of pi (Schulman 2020, "Approximating KL
divergence", http://joschu.net/blog/kl-approx.html), with ``d = logp - ref_logp``:

- ``k1``: ``d``. Unbiased, high variance, can be negative per token.
- ``k2``: ``0.5 * d**2``. Biased (low for small d), always >= 0.
- ``k3``: ``exp(-d) - (-d) - 1`` = ``ratio - log(ratio) - 1`` with ``ratio = pi_ref / pi``. Unbiased and
  always >= 0; the estimator GRPO (Shao et al. 2024) puts in the loss.

Every estimator has the signature ``fn(logp, ref_logp, *, clamp=None) -> Tensor[B, T]``. ``clamp``
bounds the log-ratio ``d`` to ``[-clamp, clamp]`` *before* the formula (verl clamps the k3 output to
[-10, 10] instead; clamping the input keeps ``exp`` finite, so the backward pass never sees
``0 * inf = nan``). ``None`` = no clamp; 10 or 20 are sensible for k3 in the loss.

Where the KL goes is the trainer's choice, not this module's: in the reward per token
(InstructGPT, Ouyang et al. 2022: ``token_rewards = -coef * k1``, then GAE / REINFORCE++), or in the
loss (GRPO: ``loss += coef * aggregate(k3, mask)``). As a *loss* term on on-policy samples, k2's
gradient is the gradient of KL(pi || pi_ref) in expectation, k1's expected gradient is zero, and k3's
is not that gradient (it is unbiased as a *value* only); GRPO uses k3 anyway.

Controllers (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences"; TRL's former
``AdaptiveKLController``) hold the coefficient: ``FixedKL(coef)`` never changes;
``AdaptiveKL(init_coef, target, horizon)`` does, per ``update(current_kl, n_steps)``:
``e = clip(current_kl / target - 1, -0.2, 0.2)``; ``coef *= 1 + e * n_steps / horizon``.
``make_kl_controller(KLConfig(...))`` builds either (no KL at all: ``FixedKL(0.0)``). Both have
``state_dict`` / ``load_state_dict`` for exact resume.

``KLConfig`` says all of it in one section: coefficient, estimator, where, controller (and the adaptive
controller's target and horizon); a run without KL has no such section (and no reference model).
"""

from __future__ import annotations

from typing import Any, Literal, Protocol

import torch
from pydantic import Field, model_validator
from torch import Tensor

from rlkit.algos.utils import Registry
from rlkit.sections import Section


class KLEstimatorFn(Protocol):
    def __call__(self, logp: Tensor, ref_logp: Tensor, *, clamp: float | None = None) -> Tensor: ...


KL_ESTIMATORS: Registry[KLEstimatorFn] = Registry("KL estimator")


def _log_ratio(logp: Tensor, ref_logp: Tensor, clamp: float | None) -> Tensor:
    if logp.shape != ref_logp.shape:
        raise ValueError(f"logp {tuple(logp.shape)} and ref_logp {tuple(ref_logp.shape)} must have the same shape")
    d = logp - ref_logp
    return d if clamp is None else d.clamp(-clamp, clamp)


@KL_ESTIMATORS.register("k1")
def k1(logp: Tensor, ref_logp: Tensor, *, clamp: float | None = None) -> Tensor:
    """``logp - ref_logp`` per token.

    Args:
        logp: Tensor[B, T] log-probs of the sampled tokens under the policy.
        ref_logp: Tensor[B, T] log-probs of the same tokens under the reference model.
        clamp: bound on ``|logp - ref_logp|``, or None.
    Returns:
        Tensor[B, T]; padding positions are whatever the inputs give (mask them downstream).
    """
    return _log_ratio(logp, ref_logp, clamp)


@KL_ESTIMATORS.register("k2")
def k2(logp: Tensor, ref_logp: Tensor, *, clamp: float | None = None) -> Tensor:
    """``0.5 * (logp - ref_logp)**2`` per token (>= 0).

    Args:
        logp: Tensor[B, T] policy log-probs of the sampled tokens.
        ref_logp: Tensor[B, T] reference log-probs of the same tokens.
        clamp: bound on ``|logp - ref_logp|``, or None.
    Returns:
        Tensor[B, T].
    """
    return 0.5 * _log_ratio(logp, ref_logp, clamp) ** 2


@KL_ESTIMATORS.register("k3")
def k3(logp: Tensor, ref_logp: Tensor, *, clamp: float | None = None) -> Tensor:
    """``exp(ref_logp - logp) - (ref_logp - logp) - 1`` per token (>= 0, Schulman's k3).

    Args:
        logp: Tensor[B, T] policy log-probs of the sampled tokens.
        ref_logp: Tensor[B, T] reference log-probs of the same tokens.
        clamp: bound on ``|logp - ref_logp|`` before the ``exp``, or None.
    Returns:
        Tensor[B, T].
    """
    x = -_log_ratio(logp, ref_logp, clamp)  # log(pi_ref / pi)
    return torch.expm1(x) - x  # = exp(x) - x - 1, accurate near x = 0


def compute_kl(name: str | KLConfig, logp: Tensor, ref_logp: Tensor, *, clamp: float | None = None) -> Tensor:
    """``KL_ESTIMATORS[name](logp, ref_logp, clamp=clamp)``: per-token KL, Tensor[B, T]; ``name`` may be a
    ``KLConfig`` (its ``estimator``)."""
    if isinstance(name, KLConfig):
        name = name.estimator
    return KL_ESTIMATORS[name](logp, ref_logp, clamp=clamp)


# ------------------------------------------------------------------------------------- controllers


class FixedKL:
    """A constant KL coefficient. ``value`` is the coefficient; ``update`` does nothing."""

    def __init__(self, coef: float):
        if coef < 0:
            raise ValueError(f"KL coefficient must be >= 0, got {coef}")
        self.value = float(coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        """No-op; returns the (unchanged) coefficient."""
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])

    def __repr__(self) -> str:
        return f"FixedKL(coef={self.value})"


class AdaptiveKL:
    """Adaptive KL coefficient (Ziegler et al. 2019), moving the measured KL toward ``target``.

    ``update(current_kl, n_steps)``: ``e = clip(current_kl / target - 1, -0.2, 0.2)``,
    ``value *= 1 + e * n_steps / horizon``. KL above target raises the coefficient, below lowers it;
    the clip bounds the change to ±20% per ``horizon`` steps. ``n_steps`` is the number of samples
    (TRL counted the batch size) or steps since the last update, in the same unit as ``horizon``.
    """

    def __init__(self, init_coef: float, target: float, horizon: float):
        if init_coef < 0:
            raise ValueError(f"KL coefficient must be >= 0, got {init_coef}")
        if target <= 0:
            raise ValueError(f"adaptive KL target must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"adaptive KL horizon must be > 0, got {horizon}")
        self.value = float(init_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Move the coefficient given the KL measured over the last ``n_steps``; returns the new value."""
        current = float(current_kl)
        error = min(max(current / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])

    def __repr__(self) -> str:
        return f"AdaptiveKL(value={self.value}, target={self.target}, horizon={self.horizon})"


KLController = FixedKL | AdaptiveKL


class KLConfig(Section):
    """The KL penalty to the reference model: how much, which estimator, where, and how the coefficient moves."""

    coef: float = Field(gt=0, description="KL coefficient to the reference model (the adaptive controller's initial one).")
    estimator: Literal["k1", "k2", "k3"] = Field("k3", description="KL estimator per token.")
    where: Literal["loss", "reward"] = Field(
        "loss", description="Where the KL goes: added to the loss (GRPO) or subtracted from the reward per token (InstructGPT).")
    controller: Literal["fixed", "adaptive"] = Field("fixed", description="Fixed coef or adaptive toward target.")
    target: float | None = Field(None, gt=0, description="Target KL for the adaptive controller.")
    horizon: int = Field(10000, gt=0, description="Horizon (in samples) of the adaptive controller.")

    @model_validator(mode="after")
    def _controller_keys(self) -> KLConfig:
        if self.controller == "adaptive" and self.target is None:
            raise ValueError("target: the adaptive KL controller needs a target")
        if self.controller == "fixed":
            fields = type(self).model_fields
            for key in ("target", "horizon"):  # a full dump prints them at their defaults: those are fine
                if key in self.model_fields_set and getattr(self, key) != fields[key].default:
                    raise ValueError(f"{key}: only used by the adaptive KL controller (controller: adaptive)")
        return self


def make_kl_controller(kl: KLConfig) -> FixedKL | AdaptiveKL:
    """The coefficient controller of a ``kl:`` section: ``FixedKL(coef)`` or ``AdaptiveKL(coef, target, horizon)``.

    Args:
        kl: the ``KLConfig`` (its ``controller``, ``coef``, and for "adaptive" ``target`` and ``horizon``).
    """
    if not isinstance(kl, KLConfig):
        raise TypeError(f"make_kl_controller takes a KLConfig, got {type(kl).__name__}")
    if kl.controller == "fixed":
        return FixedKL(kl.coef)
    return AdaptiveKL(kl.coef, kl.target, kl.horizon)
