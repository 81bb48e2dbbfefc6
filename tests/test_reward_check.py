import pytest
from rich.console import Console

from rlkit.config import RewardSpec
from rlkit.data import DataError
from rlkit.recipe import load_config
from rlkit.reward_check import PROBES, format_table, run_reward_check, run_reward_check_cli, summary_line
from rlkit.scoring import RewardSet

ROW = {"prompt": "What is 3 + 4?", "answer": "7"}


def test_r1_zero_rewards_let_an_empty_think_and_padding_score_as_high_as_honest():
    report = run_reward_check_cli(load_config("r1_zero", default_recipe="r1_zero"))  # accuracy 1 + think_format 0.2
    assert [p.name for p in report.probes] == list(PROBES) and report.rewards == ["accuracy", "think_format"]
    totals = {p.name: round(p.total, 6) for p in report.probes}
    assert totals == {"honest": 1.2, "wrong": 0.2, "no_think": 1.0, "empty_think": 1.2, "repeated_answer": 1.0,
                      "answer_outside_tags": 0.0, "long_padded": 1.2}
    assert [p.name for p in report.hacks] == ["empty_think", "long_padded"]
    assert report.probe("long_padded").length > 20 * report.probe("honest").length  # counted in tokens
    assert summary_line(report) == ("reward check: honest 1.20, wrong 0.20; 2 hacks score as high as honest: "
                                    "empty_think (1.20), long_padded (1.20)")
    table = format_table(report)
    assert [c.header for c in table.columns][:5] == ["probe", "tokens", "accuracy", "think_format", "total"]
    console = Console(record=True, width=160)
    console.print(table)
    text = console.export_text()
    assert text.count("hack") == 2 and "long_padded" in text


def test_tag_count_and_overlong_penalise_repeated_blocks_and_padding():
    rewards = RewardSet([RewardSpec(name="accuracy"), RewardSpec(name="think_format", weight=0.2),
                         RewardSpec(name="tag_count", weight=0.2),
                         RewardSpec(name="soft_overlong", params={"max_len": 512, "cache": 128})])
    report = run_reward_check(rewards, ROW, "User: What is 3 + 4?\nAssistant:", "r1_zero")  # lengths in words
    repeated, honest = report.probe("repeated_answer"), report.probe("honest")
    assert repeated.scores["tag_count"] == 0.5 and honest.scores["tag_count"] == 1.0
    assert repeated.scores["accuracy"] == 1.0 and repeated.total < honest.total  # the last block is right
    assert report.probe("long_padded").scores["soft_overlong"] == -1.0
    assert [p.name for p in report.hacks] == ["empty_think"]
    assert summary_line(report) == ("reward check: honest 1.40, wrong 0.40; 1 hack scores as high as honest: "
                                    "empty_think (1.40)")


def _reasons(completions, **_):
    """A plug-in reward: 0.1 for at least five words of reasoning."""
    return [0.1 * (len(c.split("</think>")[0].split()) >= 6) for c in completions]


def test_a_prompt_that_opens_think_and_a_reward_set_without_hacks():
    rewards = RewardSet([RewardSpec(name="accuracy"), RewardSpec(name="think_format", weight=0.5)])
    report = run_reward_check(rewards, {**ROW, "answer": "x^2+1"}, "Assistant: <think>", "plain")
    honest = report.probe("honest")
    assert honest.completion.startswith(" Let me") and honest.scores == {"accuracy": 1.0, "think_format": 1.0}
    assert report.probe("empty_think").completion == "</think> <answer> x^2+1 </answer>"
    assert report.probe("wrong").scores["accuracy"] == 0.0
    guarded = RewardSet([RewardSpec(name="accuracy"), RewardSpec(name="tag_count", weight=0.2),
                         RewardSpec(name="soft_overlong", params={"max_len": 512, "cache": 128}),
                         RewardSpec(name="test_reward_check:_reasons")])
    ok = run_reward_check(guarded, ROW, "Assistant:", "r1_zero")
    assert not ok.hacks and summary_line(ok) == "reward check: ok, every hack scores below the honest answer (1.30)"
    with pytest.raises(DataError, match="no 'answer' column"):
        run_reward_check(rewards, {"prompt": "hi"}, "hi", "plain")


def test_reward_check_needs_a_row_with_an_answer(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "hi"}\n')
    cfg = load_config("r1_zero", default_recipe="r1_zero", sets=[f"data.train={data}", "rewards=[{name: think_format}]"])
    with pytest.raises(DataError, match=rf"^{data}: no row has an 'answer' column; the reward check needs a gold answer"):
        run_reward_check_cli(cfg)


def test_rewards_check_cli(cli):
    """`rlkit rewards check`: the table and the summary line; --strict fails when a hack pays."""
    r = cli("rewards", "check", "--recipe", "r1_zero")
    assert r.exit_code == 0, r.output
    assert "empty_think" in r.output and "2 hacks score as high as honest" in " ".join(r.output.split())
    assert cli("rewards", "check", "--recipe", "r1_zero", "--strict").exit_code == 1
    shielded = "rewards=[{name: accuracy}, {name: think_format, weight: 0.2}, {name: tag_count, weight: 0.2}]"
    r = cli("rewards", "check", "--recipe", "r1_zero", "--set", shielded)
    assert r.exit_code == 0 and "tag_count" in r.output
