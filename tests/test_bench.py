import json


def test_bench_runs_on_cpu_side_by_side_with_trl(cli, tmp_path):
    out = tmp_path / "bench.json"
    r = cli("bench", "--batch-sizes", "2", "--gen-len", 6, "--prompts", 2, "--generations", 2, "--steps", 3,
            "--staleness", "0,1", "--output", out)
    assert r.exit_code == 0, r.output
    report = json.loads(out.read_text())
    assert [row["engine"] for row in report["rollout"]] == ["hf", "hf_static", "vllm", "vllm_raw"]
    assert all(row["tokens"] == 2 * 6 and row["tokens_per_s"] > 0 for row in report["rollout"])
    ours_hf, ours_vllm, ours_async, *trl = report["step"]
    assert [ours_hf["engine"], ours_vllm["engine"], ours_async["engine"]] == ["hf", "vllm", "vllm"]
    # TRL in fp32 and, on a CPU with bf16 instructions (this one), with bf16=True
    assert [t["precision"] for t in trl] == ["fp32", "bf16"] and all(t["trainer"].startswith("TRL") for t in trl)
    # the roofline: this machine's matmul peaks, measured in the run; the update's achieved FLOP/s against the
    # peak of the precision it ran in (the embedded model: fp32, too small for bf16 to pay on a CPU)
    peaks = report["machine"]["matmul_peak_gflops"]
    assert peaks["bf16"] > peaks["fp32"] > 1
    for ours in (ours_hf, ours_vllm, ours_async):
        roof = ours["roofline"]
        assert ours["precision"] == "fp32" and roof["matmul_peak_gflops"] == peaks["fp32"]
        assert 0 < roof["update"]["of_peak"] < 1 and roof["update"]["gflops"] > 0 and 0 <= roof["padding_frac"] < 1
        assert roof["tokens"] > 2 * 2 * 6 and ours["peak_gib"] > 0.1  # prompts + completions; RSS of the process
    # --staleness 0,1: the vllm step in sequence, then overlapped (after the fresh first batch, every batch
    # the timed steps train on was sampled one update earlier)
    assert [r["staleness"] for r in report["step"][:3]] == [0, 0, 1] and report["settings"]["staleness"] == [0, 1]
    assert ours_vllm["staleness_seen"] == 0 and ours_async["staleness_seen"] == 1
    assert "max_staleness 1" in ours_async["trainer"] and "rollout_wait" in ours_async["phases"]
    for ours in (ours_hf, ours_vllm, ours_async):
        assert {"rollout", "reward", "reference", "advantage", "update", "sync"} <= set(ours["phases"])
        assert ours["completion_tokens_per_s"] > 0
    assert all(t["completion_tokens_per_s"] > 0 and t["peak_gib"] > 0.1 for t in trl)
    assert "GRPO step" in r.output


def test_bench_bad_engine(cli):
    r = cli("bench", "--engines", "warp")
    assert r.exit_code != 0 and "unknown engine 'warp'" in r.output
    r = cli("bench", "--step-engines", "vllm_raw")
    assert r.exit_code != 0 and "--step-engines: unknown engine 'vllm_raw'" in r.output
    r = cli("bench", "--staleness", "2")
    assert r.exit_code != 0 and "--staleness '2': expected comma-separated rollout.max_staleness values" in r.output
    r = cli("bench", "--step-engines", "hf", "--staleness", "0,1")
    assert r.exit_code != 0 and "only the vllm GRPO step overlaps" in r.output
