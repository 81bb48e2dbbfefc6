"""Masked reductions and the name registry shared by every module in ``rlkit.algos``.

Conventions used throughout ``rlkit.algos``:

- ``mask`` is a 0/1 tensor (bool, int or float) marking valid (generated, non-padding) tokens. Any
  value under a 0 in the mask is ignored, even ``nan`` or ``inf``: padding never leaks into a result.
- A reduction over zero valid elements gives 0, never ``nan`` (the denominator is floored at a tiny
  positive number, so the answer is ``0 / tiny = 0``).
- ``eps`` is always added to the standard deviation, outside the square root: ``x / (std + eps)``.
- Pure tensor maths only: no model, no I/O, no ``torch.distributed``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

import torch
from torch import Tensor

F = TypeVar("F", bound=Callable)

_TINY = 1e-12  # floor for counts in denominators: 0 valid elements -> 0 / _TINY = 0


class Registry(Generic[F]):
    """A small name -> function table that fails loudly on an unknown name.

    ``REG[name]`` returns the function or raises ``ValueError("unknown <kind> 'x'; known: a, b")``;
    ``name in REG``, ``list(REG)`` (sorted names) and ``len(REG)`` work as for a dict.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._fns: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator adding a function under ``name`` (a duplicate name is an error)."""

        def deco(fn: F) -> F:
            if name in self._fns:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._fns[name] = fn
            return fn

        return deco

    def names(self) -> tuple[str, ...]:
        """The known names, sorted."""
        return tuple(sorted(self._fns))

    def check(self, name: str) -> str:
        """Return ``name`` if known, else raise the same ``ValueError`` as ``REG[name]``."""
        self[name]
        return name

    def __getitem__(self, name: str) -> F:
        try:
            return self._fns[name]
        except (KeyError, TypeError):
            raise ValueError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._fns

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._fns)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self.names())})"


def _as_float_mask(mask: Tensor, like: Tensor) -> Tensor:
    dtype = like.dtype if like.is_floating_point() else torch.float32
    return mask.to(dtype)


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``x`` over valid entries.

    Args:
        x: Tensor[...], any shape.
        mask: Tensor[...], same shape as ``x`` (0/1). Entries under 0 are ignored even if nan/inf.
        dim: reduce over this dimension only; ``None`` reduces over everything (0-dim result).
    Returns:
        Tensor[] if ``dim is None`` else ``x``'s shape without ``dim``.
    """
    m = _as_float_mask(mask, x)
    xm = torch.where(m != 0, x, torch.zeros((), dtype=x.dtype, device=x.device)) * m
    return xm.sum() if dim is None else xm.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over valid entries; 0 where there are none.

    Args:
        x: Tensor[...], any shape.
        mask: Tensor[...], same shape as ``x`` (0/1).
        dim: reduce over this dimension only; ``None`` reduces over everything (0-dim result).
    Returns:
        Tensor[] if ``dim is None`` else ``x``'s shape without ``dim``.
    """
    m = _as_float_mask(mask, x)
    count = m.sum() if dim is None else m.sum(dim)
    return masked_sum(x, m, dim) / count.clamp_min(_TINY)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``x`` over all valid entries (one number for the whole tensor).

    ``unbiased=True`` applies Bessel's correction ``n / (n - 1)`` (as ``torch.var`` and TRL's
    ``masked_var`` do). With ``n <= 1`` valid entries the variance is defined as 0 (TRL raises
    instead; a training step should not crash on a tiny batch).

    Args:
        x: Tensor[...], any shape.
        mask: Tensor[...], same shape as ``x`` (0/1).
        unbiased: divide by ``n - 1`` instead of ``n``.
    Returns:
        Tensor[] (0-dim).
    """
    m = _as_float_mask(mask, x)
    mean = masked_mean(x, m)
    var = masked_mean((x - mean) ** 2, m)
    if unbiased:
        n = m.sum()
        var = torch.where(n > 1, var * n / (n - 1).clamp_min(_TINY), torch.zeros_like(var))
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Whiten ``x`` with the mean and (unbiased) std of its valid entries: ``(x - mean) / (std + eps)``.

    With ``shift_mean=False`` the mean is added back (only the scale changes). Padding positions
    come out as 0.

    Args:
        x: Tensor[...], any shape.
        mask: Tensor[...], same shape as ``x`` (0/1).
        shift_mean: subtract the mean (True) or keep it (False).
        eps: added to the std (outside the square root).
    Returns:
        Tensor[...], the shape of ``x``; zeros where ``mask`` is 0.
    """
    m = _as_float_mask(mask, x)
    mean = masked_mean(x, m)
    std = masked_var(x, m, unbiased=True).sqrt()
    denom = std + eps
    out = torch.where(denom > 0, (x - mean) / denom.clamp_min(1e-30), torch.zeros_like(x))  # constant x, eps=0 -> 0
    if not shift_mean:
        out = out + mean
    return torch.where(m != 0, out, torch.zeros((), dtype=out.dtype, device=out.device))


def check_bt(mask: Tensor, **named: Tensor | None) -> None:
    """Raise unless ``mask`` is Tensor[B, T] and every named tensor given has its shape."""
    if mask.dim() != 2:
        raise ValueError(f"mask must be Tensor[B, T], got shape {tuple(mask.shape)}")
    for name, t in named.items():
        if t is not None and t.shape != mask.shape:
            raise ValueError(f"{name} must be Tensor[B, T] like mask {tuple(mask.shape)}, got {tuple(t.shape)}")


def all_finite(tensors) -> bool:
    """Whether every element of every tensor is finite, with one host sync (True for none).

    >>> all_finite([torch.ones(2), torch.tensor([1.0, float("inf")])])
    False
    """
    flags = [torch.isfinite(t).all() for t in tensors]
    return bool(torch.stack(flags).all()) if flags else True


def last_token_onehot(mask: Tensor) -> Tensor:
    """One-hot of the last valid token of each row (all zeros for a row with no valid token).

    Args:
        mask: Tensor[B, T] (0/1); need not be contiguous (right padding, or holes in the middle).
    Returns:
        Tensor[B, T] float32, 1 at the last index ``t`` with ``mask[b, t] != 0``.
    """
    valid = mask != 0
    T = mask.shape[-1]
    pos = torch.arange(T, device=mask.device).expand_as(mask)
    last = torch.where(valid, pos, torch.full_like(pos, -1)).max(dim=-1).values  # [B], -1 if none
    return (pos == last.unsqueeze(-1)).to(torch.float32)
