"""Length shaping: DAPO's soft overlong punishment (Yu et al. 2025, eq. 13).

With ``max_len`` L and ``cache`` C (in tokens): 0 when the completion has at most L − C tokens, a linear
penalty down to −1 between L − C and L, and −1 beyond L.

>>> soft_overlong(["a", "b", "c"], completion_lengths=[10, 56, 80], max_len=64, cache=16)
[0.0, -0.5, -1.0]
"""

from __future__ import annotations

from rlkit.rewards import RewardError, register


@register("soft_overlong")
def soft_overlong(completions: list[str], completion_lengths: list[int], max_len: int = 512, cache: int = 128,
                  **_) -> list[float]:
    """0 up to ``max_len - cache`` tokens, then a linear penalty down to -1 at ``max_len``, -1 beyond it.

    >>> soft_overlong(["a", "b"], completion_lengths=[100, 600], max_len=512, cache=128)
    [0.0, -1.0]
    """
    if not 0 < cache <= max_len:
        raise ValueError(f"soft_overlong: need 0 < cache <= max_len, got cache={cache}, max_len={max_len}")
    out = []
    for n in completion_lengths:
        if n <= max_len - cache:
            out.append(0.0)
        elif n <= max_len:
            out.append(((max_len - cache) - n) / cache)
        else:
            out.append(-1.0)
    return out


def _prepare(max_len: int = 512, cache: int = 128, **_) -> None:
    if not (isinstance(max_len, int) and isinstance(cache, int) and 0 < cache <= max_len):
        raise RewardError(f"reward 'soft_overlong': need whole numbers 0 < params.cache <= params.max_len, got "
                          f"cache={cache!r}, max_len={max_len!r}")


soft_overlong.prepare = _prepare

