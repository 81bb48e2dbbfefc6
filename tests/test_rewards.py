import threading

import pytest

from rlkit.rewards import RewardError, get_reward
from rlkit.rewards.format import is_well_formed
from rlkit.rewards.math_answer import accuracy, extract_answer

FORMAT_TABLE = [
    ("<think> a </think> <answer> 1 </answer>", None, True),
    ("  <think>\nlong\n</think>\n<answer>1</answer>\n", None, True),
    ("<think> a </think>", None, False),
    ("<answer> 1 </answer>", None, False),
    ("<think> a </think> <answer> 1 </answer> trailing", None, False),
    ("<think> a <think> b </think> <answer> 1 </answer>", None, False),
    ("<think> a </think> <answer> 1 </answer> <answer> 2 </answer>", None, False),
    (" reasoning </think> <answer> 1 </answer>", "User: q\nAssistant: <think>", True),
    (" reasoning </think> <answer> 1 </answer>", "User: q\nAssistant:", False),
]


@pytest.mark.parametrize("completion,prompt,expected", FORMAT_TABLE)
def test_think_format(completion, prompt, expected):
    assert is_well_formed(completion, prompt) is expected


ACCURACY_TABLE = [
    ("<think> x </think> <answer> 91 </answer>", "91", 1.0),
    ("<answer> 91.0 </answer>", "91", 1.0),
    ("<answer> $\\frac{1}{2}$ </answer>", "0.5", 1.0),
    ("<answer> 90 </answer>", "91", 0.0),
    ("the answer is 91", "91", 0.0),  # no <answer> tags: not accepted in the default mode
    ("<answer> 1 </answer> <answer> 91 </answer>", "91", 1.0),  # the last answer block counts
    ("\\boxed{91}", "91", 1.0),
    ("<answer></answer>", "91", 0.0),
]


@pytest.mark.parametrize("completion,gold,expected", ACCURACY_TABLE)
def test_accuracy(completion, gold, expected):
    assert accuracy([completion], answer=[gold]) == [expected]


def test_accuracy_any_mode_and_extract():
    assert accuracy(["the answer is 91"], answer=["91"], mode="any") == [1.0]
    assert extract_answer("no tags") is None


def test_accuracy_off_main_thread():
    out = []
    t = threading.Thread(target=lambda: out.append(accuracy(["<answer> 12 </answer>"], answer=["12"])))
    t.start()
    t.join()
    assert out == [[1.0]]


def test_registry_by_name_and_dotted_path():
    assert get_reward("accuracy") is accuracy
    assert get_reward("rlkit.rewards.math_answer:accuracy") is accuracy
    assert get_reward("rlkit.rewards.math_answer.accuracy") is accuracy
    with pytest.raises(RewardError, match="unknown reward 'acuracy'; did you mean 'accuracy'"):
        get_reward("acuracy")
    with pytest.raises(RewardError, match="module 'no_such_module_xyz' failed to import"):
        get_reward("no_such_module_xyz:fn")
