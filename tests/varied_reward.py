"""A plug-in reward for tests on random-weight models, whose completions no built-in reward tells apart."""


def distinct_chars(completions, **_):
    """The share of distinct characters: it differs between any two random completions, so GRPO's
    advantages are not all zero.

    >>> distinct_chars(["aab", "abc"])
    [0.6666666666666666, 1.0]
    """
    return [len(set(c)) / max(len(c), 1) for c in completions]
