"""TRL-style tool functions (plain, typed, with Google-style docstrings), as a user's module would hold them."""


def multiply(a: int, b: int) -> int:
    """Multiply two integers.

    Args:
        a: The first factor.
        b: The second factor.
    """
    return a * b


def lookup(key: str) -> dict:
    """Look a key up.

    Args:
        key: What to look up.
    """
    return {"key": key, "found": True}


def undocumented(x: int) -> int:
    return x
