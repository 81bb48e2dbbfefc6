"""The code-execution reward and its sandbox (issue 20, item 7): tests pass or fail, and hostile completions
score 0 and harm nothing."""

from __future__ import annotations

import os
import time

import pytest

from rlkit.rewards.code import code, humaneval_tests, last_code_block, mbpp_tests
from rlkit.sandbox import run_python

ADD = "Here it is:\n```python\ndef add(a, b):\n    return a + b\n```\n"
TESTS = ["assert add(2, 3) == 5", "assert add(-1, 1) == 0"]


def _block(src: str) -> str:
    return f"```python\n{src}\n```"


def test_passing_failing_and_missing_code():
    wrong = ADD.replace("a + b", "a - b")
    assert code([ADD, wrong, "no code at all", _block("def add(a, b):\n    raise ValueError")],
                tests=[TESTS] * 4) == [1.0, 0.0, 0.0, 0.0]
    # the last block counts; tests as one string of asserts
    assert code([_block("def add(a, b): return 0") + "\nbetter:\n" + ADD], tests=["\n".join(TESTS)]) == [1.0]
    assert last_code_block("```py\nx = 1\n```") == "x = 1\n" and last_code_block("none") is None


def test_mbpp_and_humaneval_rows_map_onto_tests():
    mbpp = {"text": "Write a function to add.", "test_list": TESTS, "test_setup_code": ""}
    assert code([ADD], tests=[mbpp_tests(mbpp)]) == [1.0]
    humaneval = {"entry_point": "add", "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n"}
    assert code([ADD, ADD.replace("a + b", "a * b")], tests=[humaneval_tests(humaneval)] * 2) == [1.0, 0.0]


@pytest.mark.parametrize("src", [
    "import os\nos._exit(0)",                             # leave before the tests run
    "import sys\nsys.exit(0)",
    "print('all tests passed')\nimport os\nos._exit(0)",  # a guessed success line
    "while True:\n    pass",                              # an infinite loop: the wall-clock limit
    "x = bytearray(8 * 2**30)",                           # a huge allocation: the memory limit
    pytest.param("import os\nwhile True:\n    os.fork()",  # a fork bomb: nobody's process limit (as root only)
                 marks=pytest.mark.skipif(os.geteuid() != 0, reason="the process limit needs the child to be nobody")),
])
def test_hostile_completions_score_zero_quickly(src):
    t0 = time.time()
    assert code([_block(src + "\ndef add(a, b):\n    return a + b")], tests=[TESTS], timeout=3.0) == [0.0]
    assert time.time() - t0 < 10


def test_the_sandbox_writes_nothing_outside_and_sees_no_secrets(tmp_path, monkeypatch):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    monkeypatch.setenv("RLKIT_TEST_SECRET", "hunter2")
    hostile = (f"import os, shutil\nos.system('rm -f {victim}; echo owned > {tmp_path}/new.txt')\n"
               f"open('{victim}', 'w').write('owned')\n")
    r = run_python(hostile, timeout=5.0)
    assert victim.read_text() == "keep me" and not (tmp_path / "new.txt").exists()
    r = run_python("import os; print(os.environ.get('RLKIT_TEST_SECRET'), sorted(os.environ))")
    assert r.ok and "hunter2" not in r.stdout and r.stdout.startswith("None")
    if os.geteuid() == 0:  # as CI runs: nobody, private scratch, no network
        assert {"user nobody", "private /tmp", "no network"} <= set(r.protections), r.protections
        r = run_python("open('/tmp/left-behind', 'w').write('x')")
        assert r.ok and not os.path.exists("/tmp/left-behind")  # written to a private tmpfs, gone with it
        r = run_python("import socket; socket.create_connection(('1.1.1.1', 53), timeout=2)")
        assert not r.ok and "unreachable" in r.stderr, r.stderr
    assert "rlimits" in r.protections and "new session" in r.protections


def test_a_reward_row_without_tests_is_refused_before_training():
    from rlkit.config import RewardSpec
    from rlkit.data import DataError
    from rlkit.scoring import RewardSet

    rs = RewardSet([RewardSpec(name="code")])
    rs.check_rows([{"prompt": "p", "tests": TESTS}], "data.jsonl")
    with pytest.raises(DataError, match="tests"):
        rs.check_rows([{"prompt": "p", "tests": TESTS}, {"prompt": "q"}], "data.jsonl")
