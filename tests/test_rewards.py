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


def test_tag_count_language_and_overlong():
    from rlkit.rewards.format import language_consistency, tag_count
    from rlkit.rewards.length import soft_overlong

    assert tag_count(["<think> a </think> <answer> 1 </answer>", "<think><think></think>", "plain"]) == [1.0, 0.25, 0.0]
    assert tag_count([" a </think> <answer> 1 </answer>"], prompts=["Assistant: <think>"]) == [1.0]
    assert language_consistency(["<think> add the digits </think> <answer> 3 </answer>",
                                 "<think> 先 add 数字 </think>", "<think> 1 + 2 </think>"]) == [1.0, pytest.approx(1 / 3), None]
    assert language_consistency(["<think> 先加 digits </think>"], language="zh") == [0.5]
    assert soft_overlong(["x"] * 4, completion_lengths=[48, 50, 64, 70], max_len=64, cache=16) == [0.0, -0.125, -1.0, -1.0]
    with pytest.raises(ValueError, match="cache"):
        soft_overlong(["x"], completion_lengths=[1], max_len=8, cache=16)


def _boom(completions, **_):
    if any("boom" in c for c in completions):
        raise RuntimeError("boom")
    return [1.0] * len(completions)


def _flaky(completions, **_):
    return [float("nan") if "bad" in c else None if "skip" in c else 0.5 for c in completions]


def test_reward_set_failures_never_crash():
    from rlkit.config import RewardSpec
    from rlkit.scoring import RewardSet

    rs = RewardSet([RewardSpec(name="test_rewards._boom", weight=2.0), RewardSpec(name="test_rewards:_flaky")])
    out = rs.score(["ok", "boom here", "bad", "skip"], {"answer": ["1", "2", "3", "4"]})
    # _boom raised on the batch: retried per sample, only the raising sample scores 0 and counts as a failure
    assert out.per_reward["test_rewards._boom"] == [1.0, 0.0, 1.0, 1.0]
    assert out.failures == {"test_rewards._boom": 1, "test_rewards:_flaky": 1}
    assert out.per_reward["test_rewards:_flaky"] == [0.5, 0.5, 0.0, None]
    assert out.total == [2.5, 0.5, 2.0, 2.0]
    m = out.metrics()
    assert m["reward/test_rewards._boom/failures"] == 1.0 and m["reward/test_rewards:_flaky"] == pytest.approx(1 / 3)
    with pytest.raises(RewardError, match="listed twice"):
        RewardSet([RewardSpec(name="accuracy"), RewardSpec(name="accuracy")])
