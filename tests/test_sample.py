import json

from rlkit.data import sft_rows
from rlkit.rewards.format import is_well_formed
from rlkit.rewards.math_answer import is_correct
from rlkit.templates import render_prompt

from conftest import assert_clean_error

FAST = ["--set", "sample.max_prompts=24", "--set", "sample.num_samples=4", "--set", "sample.batch_size=24"]


def test_sample_keeps_only_verified_samples_and_loads_as_sft(cli, tmp_path):
    mix = tmp_path / "chat.jsonl"
    mix.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                            {"role": "assistant", "content": "Hello!"}]}) + "\n")
    out = tmp_path / "rs"
    r = cli("sample", "--output-dir", out, *FAST, "--set", f"sample.mix_data={mix}", "--set", "sample.max_per_prompt=2")
    assert r.exit_code == 0, r.output
    rows = sft_rows(str(out))  # the output directory is an SFT data set
    report = json.loads((out / "report.json").read_text())
    assert report["kept"] + report["mixed_in"] == len(rows) and report["mixed_in"] == 1 and report["kept"] > 0
    assert report["samples"] == 24 * 4 and sum(report["pass_rate_histogram"].values()) == 24
    per_prompt: dict[str, list[str]] = {}
    for row in rows[: report["kept"]]:
        assert row["source_model"] == "embedded" and row["rewards"] == {"accuracy": 1.0, "think_format": 1.0}
        prompt = render_prompt(row["prompt"], "r1_zero")
        assert is_correct(row["completion"], row["answer"]) and is_well_formed(row["completion"], prompt)
        per_prompt.setdefault(row["prompt"], []).append(row["completion"])
    assert all(len(v) <= 2 and len(set(v)) == len(v) for v in per_prompt.values())  # cap and no duplicates
    assert (out / "pass_rate.png").stat().st_size > 0
    # what every stage leaves, so a pipeline with a torn manifest finds this stage finished (reliability 12)
    assert json.loads((out / "rlkit_run.json").read_text())["config"]["kind"] == "sample"
    assert json.loads((out / "rlkit_result.json").read_text())["kept"] == report["kept"]


def test_sample_empty_result_is_a_clean_error(cli, tmp_path):
    assert_clean_error(cli("sample", "--output-dir", tmp_path / "rs", *FAST, "--set", "sample.thresholds={accuracy: 2.0}"),
                       "kept no samples")
    assert not (tmp_path / "rs" / "data.jsonl").exists()
    assert_clean_error(cli("sample", "--set", "sample.thresholds={acuracy: 1}"), "sample.thresholds", "'acuracy'")
