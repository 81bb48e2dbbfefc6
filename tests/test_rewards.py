import threading
import time
from decimal import Decimal
from fractions import Fraction

import numpy as np
import pytest
import torch

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


# --- time limits, value types, first errors, gold answers ------------------------------------------------------

def _hang_on(completions, **_):
    if any("hang" in c for c in completions):
        threading.Event().wait()  # never returns
    return [1.0] * len(completions)


def _in_thread(fn):
    box = []
    t = threading.Thread(target=lambda: box.append(fn()), daemon=True)
    t.start()
    t.join(60)
    assert box, "score() did not return"
    return box[0]


@pytest.mark.parametrize("thread", ["main", "other"])
def test_hung_reward_times_out_scores_zero_and_says_so(thread, capsys):
    from rlkit.config import RewardSpec
    from rlkit.scoring import RewardSet

    key = "test_rewards:_hang_on"
    rs = RewardSet([RewardSpec(name=key, timeout=0.5), RewardSpec(name="think_format", weight=0.5)])
    batch = ["<think> a </think> <answer> 1 </answer>", "hang"]
    t0 = time.monotonic()
    out = rs.score(batch, {}) if thread == "main" else _in_thread(lambda: rs.score(batch, {}))
    assert time.monotonic() - t0 < 3
    # the batch call timed out: every sample of it fails (no per-sample retry that would multiply the wait)
    assert out.per_reward[key] == [0.0, 0.0] and out.failures[key] == 2 and out.total == [0.5, 0.0]
    assert out.errors == {key: "sample 1: timed out after 0.5 s"} and rs.first_errors[key] == out.errors[key]
    err = capsys.readouterr().err
    assert f"reward '{key}' failed on sample 1: timed out after 0.5 s (further failures are counted in " \
           f"reward/{key}/failures)" in err
    assert f"reward '{key}' failed on all 2 samples" in err
    again = rs.score(batch[:1], {})  # a fresh worker for the next call; the hung one is abandoned
    assert again.per_reward[key] == [1.0] and again.failures[key] == 0


def test_accuracy_in_a_reward_set_off_the_main_thread():
    from rlkit.config import RewardSpec
    from rlkit.rewards.math_answer import accuracy
    from rlkit.scoring import RewardSet

    assert accuracy.self_timed  # bounds its own time, so the set calls it directly (here: via the process pool)
    rs = RewardSet([RewardSpec(name="rlkit.rewards.math_answer:accuracy", timeout=0.5)])
    out = _in_thread(lambda: rs.score(["<answer> 12 </answer>", "<answer> 13 </answer>"], {"answer": ["12", "12"]}))
    assert out.per_reward["rlkit.rewards.math_answer:accuracy"] == [1.0, 0.0] and not out.errors


def _echo(completions, value, **_):
    return list(value)


def _whole(completions, batch, **_):
    return batch[0]


NAN = float("nan")
VALUE_TABLE = [  # what a reward returns for one sample -> its score, or the error text when it is a failure
    (3, 3.0), (True, 1.0), (0.5, 0.5), (Decimal("0.5"), 0.5), (Fraction(1, 4), 0.25), (None, None),
    (np.float32(0.5), 0.5), (np.float64(0.25), 0.25), (np.int64(2), 2.0), (np.bool_(True), 1.0), (np.array(0.75), 0.75),
    (torch.tensor(1.5), 1.5), (torch.tensor([0.5]), 0.5), (torch.tensor(2), 2.0), (torch.tensor(0.5, dtype=torch.bfloat16), 0.5),
    (NAN, "returned nan, expected a finite number or None"),
    (float("inf"), "returned inf, expected a finite number or None"),
    (np.float32("nan"), "returned nan, expected a finite number or None"),
    (torch.tensor(float("-inf")), "returned -inf, expected a finite number or None"),
    (Decimal("NaN"), "returned nan, expected a finite number or None"),
    ("1.0", "returned '1.0' (str), expected a finite number or None"),
    ([1.0], "returned [1.0] (list), expected a finite number or None"),
    (1j, "returned 1j (complex), expected a finite number or None"),
    (np.array([1.0, 2.0]), "returned an array of 2 values for one sample, expected a number or None"),
    (torch.tensor([1.0, 2.0]), "returned an array of 2 values for one sample, expected a number or None"),
]


@pytest.mark.parametrize("value,expected", VALUE_TABLE, ids=[f"{type(v).__name__}-{i}" for i, (v, _) in enumerate(VALUE_TABLE)])
def test_reward_values_of_any_numeric_type(value, expected):
    from rlkit.config import RewardSpec
    from rlkit.scoring import RewardSet

    key = "test_rewards:_echo"
    out = RewardSet([RewardSpec(name=key)]).score(["a", "b"], {"value": [value, 1.0]})
    if isinstance(expected, str):
        assert out.per_reward[key] == [0.0, 1.0] and out.failures[key] == 1
        assert out.errors[key] == f"sample 1: {expected}"
    else:
        assert out.per_reward[key] == [expected, 1.0] and out.failures[key] == 0 and not out.errors


BATCH_TABLE = [  # what a reward returns for a whole batch of two -> scores (failures score 0)
    ([0.5, 1], [0.5, 1.0], 0),
    ((0.5, 1), [0.5, 1.0], 0),
    (np.array([0.5, 1.0], dtype=np.float32), [0.5, 1.0], 0),
    (torch.tensor([0.5, 1.0]), [0.5, 1.0], 0),
    (torch.tensor([1, 0]), [1.0, 0.0], 0),
    ("0.5 1", [0.0, 0.0], 2),           # not a list of numbers: every sample fails, the run goes on
    (np.zeros((2, 1)), [0.0, 0.0], 2),
    (torch.tensor(0.5), [0.0, 0.0], 2),
]


@pytest.mark.parametrize("batch,expected,failed", BATCH_TABLE)
def test_reward_batch_of_any_array_type(batch, expected, failed):
    from rlkit.config import RewardSpec
    from rlkit.scoring import RewardSet

    out = RewardSet([RewardSpec(name="test_rewards:_whole")]).score(["a", "b"], {"batch": [batch, batch]})
    assert out.per_reward["test_rewards:_whole"] == expected and out.failures["test_rewards:_whole"] == failed


def test_first_failure_of_each_reward_is_shown_once(capsys):
    from rlkit.config import RewardSpec
    from rlkit.scoring import RewardSet

    rs = RewardSet([RewardSpec(name="test_rewards:_boom"), RewardSpec(name="test_rewards:_flaky")])
    first = rs.score(["ok", "boom", "bad"], {})
    second = rs.score(["boom", "bad", "ok"], {})
    assert first.errors == {"test_rewards:_boom": "sample 2: RuntimeError: boom",
                            "test_rewards:_flaky": "sample 3: returned nan, expected a finite number or None"}
    assert second.errors["test_rewards:_boom"] == "sample 1: RuntimeError: boom"  # each batch keeps its own first
    assert rs.first_errors == first.errors
    err = capsys.readouterr().err
    line = ("reward 'test_rewards:_boom' failed on sample 2: RuntimeError: boom "
            "(further failures are counted in reward/test_rewards:_boom/failures)")
    assert line in err.splitlines() and err.count("reward 'test_rewards:_boom' failed on sample") == 1
    assert err.count("reward 'test_rewards:_flaky' failed on sample 3: returned nan") == 1


GOLD_TABLE = [  # gold answer -> None (math-verify can check against it) or the start of the error
    ("42", None), ("-3.5", None), (r"\frac{1}{2}", None), (r"$\sqrt{2}$", None), (r"\sqrt{2}", None), ("1/2", None),
    ("x^2+1", None), (r"\boxed{7}", None), ("(1, 2)", None), ("[1, 2]", None), (r"2\pi", None), (r"10\%", None),
    (r"\infty", None), (r"\text{(C)}", None), ("7 apples", None),
    ("[7]", "gold answer '[7]' looks like a list, not an answer"),
    ("['7', '8']", "gold answer \"['7', '8']\" looks like a list"),
    ("true", "gold answer 'true' cannot be parsed by math-verify as a number or expression"),
    ("banana", "gold answer 'banana' is read by math-verify as a product of one-letter symbols (a*a*a*b*n*n)"),
    ("False", "gold answer 'False' is read by math-verify as a product of one-letter symbols"),
    ("yes", "gold answer 'yes' is read by math-verify as a product of one-letter symbols"),
    ("sin(x)", "gold answer 'sin(x)' is read by math-verify as a product of one-letter symbols"),
    ("  ", "empty gold answer"),
]


@pytest.mark.parametrize("gold,error", GOLD_TABLE)
def test_gold_answer_check(gold, error):
    from rlkit.rewards.math_answer import gold_error

    if error is None:
        assert gold_error(gold) is None
    else:
        assert gold_error(gold).startswith(error)


def test_gold_answers_are_read_as_latex():
    # without $...$ math-verify read the gold 2\pi as 2, so "2" scored 1 and "2\pi" scored 1 as well
    assert accuracy(["<answer> 2 </answer>", r"<answer> 2\pi </answer>", r"<answer> $2\pi$ </answer>"],
                    answer=[r"2\pi"] * 3) == [0.0, 1.0, 1.0]
    assert accuracy([r"<answer> \sqrt{2} </answer>", "<answer> 1+x^2 </answer>"], answer=[r"\sqrt{2}", "x^2+1"]) == [1.0, 1.0]


def test_check_rows_names_the_first_bad_row_and_the_reward():
    from rlkit.config import RewardSpec
    from rlkit.data import DataError
    from rlkit.scoring import RewardSet

    acc = "rlkit.rewards.math_answer:accuracy"  # by dotted path too, not only by the name 'accuracy'
    rs = RewardSet([RewardSpec(name=acc), RewardSpec(name="think_format")])
    rs.check_rows([{"prompt": "q", "answer": "42"}, {"prompt": "q", "answer": r"\frac{1}{2}"}], "d.jsonl")
    with pytest.raises(DataError, match=r"^d\.jsonl: row 2: gold answer '\[7\]' looks like a list, not an answer "
                                        r".* \(reward 'rlkit\.rewards\.math_answer:accuracy'\)$"):
        rs.check_rows([{"prompt": "q", "answer": "42"}, {"prompt": "q", "answer": "[7]"}], "d.jsonl")
    with pytest.raises(DataError, match=r"^d\.jsonl: row 1 has no 'answer' column, which reward '.*accuracy' needs$"):
        rs.check_rows([{"prompt": "q"}], "d.jsonl")
    routed = RewardSet([RewardSpec(name="accuracy", routes=["math"]), RewardSpec(name="think_format")])
    rows = [{"prompt": "hi", "route": "chat"}, {"prompt": "q", "answer": "7", "route": "math"},
            {"prompt": "q", "answer": "banana", "route": "math"}]
    with pytest.raises(DataError, match=r"^d\.jsonl: row 3 \(route 'math'\): gold answer 'banana' is read by "
                                        r"math-verify as a product of one-letter symbols \(a\*a\*a\*b\*n\*n\), "
                                        r"not as a word \(reward 'accuracy'\)$"):
        routed.check_rows(rows, "d.jsonl")
    routed.check_rows(rows[:2], "d.jsonl")  # the chat row needs no answer
    RewardSet([RewardSpec(name="think_format")]).check_rows([{"prompt": "q", "answer": "banana"}], "d.jsonl")


def test_sample_checks_gold_answers_before_loading_the_model(tmp_path):
    from rlkit.data import DataError
    from rlkit.recipe import load_config
    from rlkit.trainers.sample import run_sample

    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1 + 1?", "answer": "2"}\n{"prompt": "fruit?", "answer": "banana"}\n')
    cfg = load_config("sample", default_recipe="sample", sets=[f"data.train={data}", f"output_dir={tmp_path / 'out'}",
                                                                "model.path=no/such/model"])
    with pytest.raises(DataError, match=rf"^{data}: row 2: gold answer 'banana' .* \(reward 'accuracy'\)$"):
        run_sample(cfg)
