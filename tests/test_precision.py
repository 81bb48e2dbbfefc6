"""train.precision: one key for the compute precision; fp32 master weights under bf16; model.dtype exports."""

import json

import pytest
import torch
from safetensors import safe_open

from rlkit import precision
from rlkit.config import build_config

SMALL = ["--set", "rl.prompts_per_step=4", "--set", "rl.num_generations=4", "--set", "eval.limit=8",
         "--set", "rl.eval_steps=1000", "--set", "rl.log_completions=0", "--set", "rl.reward_check=false"]


def _dtypes(path) -> set:
    with safe_open(str(path), "pt") as f:
        return {f.get_slice(k).get_dtype() for k in f.keys()}


def test_auto_resolves_by_hardware_and_model_size():
    # this machine (and CI's) has AVX-512 BF16; the probe says so, and auto follows it
    assert precision.cpu_has_bf16() == ("avx512_bf16" in open("/proc/cpuinfo").read()
                                        or "amx_bf16" in open("/proc/cpuinfo").read())
    if torch.cuda.is_available():
        pytest.skip("the CPU rules below are for a machine without CUDA")
    expect = "bf16" if precision.cpu_has_bf16() else "fp32"
    assert precision.resolve("auto", hidden_size=576) == expect  # SmolLM2-135M
    assert precision.resolve("auto", hidden_size=128) == "fp32"  # the embedded model: casts cost more than they save
    assert precision.for_model("auto", "embedded") == "fp32"
    assert precision.resolve("bf16", hidden_size=128) == "bf16" and precision.resolve("fp32") == "fp32"


def test_train_bf16_is_read_as_train_precision(tmp_path):
    for old, new in ((True, "bf16"), (False, "fp32"), (None, "auto")):
        cfg = build_config([("recipe.yaml", {"kind": "sft", "output_dir": str(tmp_path), "train": {"bf16": old}})])
        assert cfg.train.precision == new


def test_bad_precision_is_one_line(cli):
    r = cli("grpo", "--max-steps", 1, "--set", "train.precision=fp16")
    assert r.exit_code != 0 and "train.precision" in r.output and "Traceback" not in r.output


def test_bf16_run_keeps_fp32_master_weights_and_exports_in_model_dtype(cli, tmp_path):
    """GRPO in bf16 on the embedded model: the checkpoint (what resume reads) holds fp32 weights, the exported
    model is in model.dtype (bfloat16 here), the card says what ran, and the run learned something finite."""
    out = tmp_path / "bf16"
    r = cli("grpo", "--output-dir", out, "--max-steps", 2, "--set", "train.save_steps=2", "--set",
            "train.precision=bf16", "--set", "model.dtype=bfloat16", *SMALL)
    assert r.exit_code == 0, r.output
    assert _dtypes(out / "checkpoint-2" / "model.safetensors") == {"F32"}
    assert _dtypes(out / "model.safetensors") == {"BF16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    card = (out / "README.md").read_text()
    assert "train.precision bf16: bf16 compute (autocast), fp32 master weights" in card and "bfloat16" in card
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "policy/loss" in r] == [1, 2]
    assert all(abs(r["policy/loss"]) < 1e3 and r["kl/mean"] >= 0 for r in rows if "policy/loss" in r)


def test_sft_in_bf16_exports_in_model_dtype(cli, tmp_path):
    out = tmp_path / "sft"
    r = cli("sft", "--output-dir", out, "--max-steps", 2, "--set", "train.batch_size=8", "--set", "eval.limit=4",
            "--set", "train.precision=bf16")
    assert r.exit_code == 0, r.output
    assert _dtypes(out / "model.safetensors") == {"F32"}  # model.dtype auto on a CPU: float32
    assert "train.precision bf16: bf16 compute" in (out / "README.md").read_text()
