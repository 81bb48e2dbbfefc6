"""The calculator of ``--recipe calculator``: a tool (a typed function, TRL's convention) that evaluates
integer arithmetic, and the same as a TRL ``environment_factory`` class that counts its uses.

    >>> calculator("1234 + 567")
    '1801'
    >>> calculator("2 ** 10")
    'error: only integers with + - * / and parentheses'
"""

from __future__ import annotations

import ast
import operator

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.USub: operator.neg, ast.UAdd: operator.pos}
_MAX_DIGITS = 30


def _eval(node):
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_eval(node.left), _eval(node.right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_eval(node.operand))
    raise ValueError("only integers with + - * / and parentheses")


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression.

    Args:
        expression: Integers with + - * / and parentheses, e.g. "1234 + 567".
    """
    try:
        if len(expression) > 200:
            raise ValueError("expression too long")
        value = _eval(ast.parse(expression.strip(), mode="eval"))
        if isinstance(value, float):
            value = int(value) if value.is_integer() else round(value, 6)
        if len(str(value)) > _MAX_DIGITS:
            raise ValueError("result too large")
        return str(value)
    except ZeroDivisionError:
        return "error: division by zero"
    except (ValueError, SyntaxError, TypeError, RecursionError) as e:
        return f"error: {e}" if isinstance(e, ValueError) else "error: only integers with + - * / and parentheses"


class CalculatorEnv:
    """A TRL-style environment: ``reset`` per rollout, public methods are tools, ``get_reward`` scores the
    episode (here: 1 when the calculator was used at least once; a shaping reward, off in the recipe)."""

    def reset(self, **row) -> str | None:
        self.calls = 0
        return None

    def calculator(self, expression: str) -> str:
        """Evaluate an arithmetic expression.

        Args:
            expression: Integers with + - * / and parentheses, e.g. "1234 + 567".
        """
        self.calls += 1
        return calculator(expression)

    def get_reward(self) -> float:
        return 1.0 if self.calls else 0.0
