import json


def test_bench_runs_on_cpu_side_by_side_with_trl(cli, tmp_path):
    out = tmp_path / "bench.json"
    r = cli("bench", "--batch-sizes", "2", "--gen-len", 6, "--prompts", 2, "--generations", 2, "--steps", 2,
            "--output", out)
    assert r.exit_code == 0, r.output
    report = json.loads(out.read_text())
    assert [row["engine"] for row in report["rollout"]] == ["hf", "hf_static", "vllm", "vllm_raw"]
    assert all(row["tokens"] == 2 * 6 and row["tokens_per_s"] > 0 for row in report["rollout"])
    ours_hf, ours_vllm, trl = report["step"]
    assert [ours_hf["engine"], ours_vllm["engine"]] == ["hf", "vllm"] and trl["trainer"].startswith("TRL")
    for ours in (ours_hf, ours_vllm):
        assert {"rollout", "reward", "reference", "advantage", "update", "sync"} <= set(ours["phases"])
        assert ours["completion_tokens_per_s"] > 0
    assert trl["completion_tokens_per_s"] > 0
    assert "GRPO step" in r.output


def test_bench_bad_engine(cli):
    r = cli("bench", "--engines", "warp")
    assert r.exit_code != 0 and "unknown engine 'warp'" in r.output
    r = cli("bench", "--step-engines", "vllm_raw")
    assert r.exit_code != 0 and "--step-engines: unknown engine 'vllm_raw'" in r.output
