"""The update phase of the RL loop on the embedded model: gradient accumulation over micro-batches is
exact for every loss aggregation, and a huge log-ratio to the reference model keeps the loss finite."""

import copy
import math

import pytest
import torch
from accelerate import Accelerator

from rlkit.algos import AGGREGATIONS
from rlkit.config import RLConfig
from rlkit.models import load_causal_lm, load_tokenizer
from rlkit.rollout import Sample
from rlkit.trainers.batch import build_batch, completion_logprobs
from rlkit.trainers.rl import UpdateStats, run_update


def build_world():
    """The embedded model (fixed seed) and a batch of six ragged completions with advantages, old and
    reference log-probs; the same in every process."""
    torch.manual_seed(0)
    model = load_causal_lm("embedded", "float32").train()
    tok = load_tokenizer("embedded")
    prompts = [tok(f"What is {a} + {a + 3}?", add_special_tokens=False)["input_ids"] for a in range(3)]
    lengths = [5, 9, 2, 12, 7, 1]  # ragged completions: the aggregations weigh rows differently
    g = torch.Generator().manual_seed(1)
    samples = [Sample("", torch.randint(5, 200, (n,), generator=g).tolist()) for n in lengths]
    batch = build_batch([prompts[i // 2] for i in range(6)], samples, [i // 2 for i in range(6)],
                        [1.0, 0.0, 0.5, 0.5, 0.0, 1.0], tok.pad_token_id)
    batch.advantages = torch.randn(batch.loss_mask.shape, generator=g) * batch.loss_mask
    with torch.no_grad():
        logp = completion_logprobs(model, batch)[0]
    batch.old_logp = logp - 0.05 * torch.randn(logp.shape, generator=g)  # ratios != 1, some clipped
    batch.ref_logp = logp + 0.1 * torch.randn(logp.shape, generator=g)
    return model, batch


@pytest.fixture(scope="module")
def world():
    return build_world()


def _step(model, batch, precision: str = "fp32", **rl) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """One SGD step (lr 1, no clipping): the parameter change is minus the accumulated gradient. ``precision``
    bf16: the model prepared by an Accelerator in bf16 mixed precision, as the RL loop prepares it."""
    from accelerate.state import AcceleratorState

    m = copy.deepcopy(model)
    before = {k: v.detach().clone() for k, v in m.named_parameters()}
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    cfg = RLConfig(max_grad_norm=1e9, max_new_tokens=16, **{"kl": {"coef": 0.1}, **rl})
    AcceleratorState._reset_state(reset_partial_state=False)
    acc = Accelerator(cpu=True, mixed_precision="bf16" if precision == "bf16" else "no")
    if precision == "bf16":
        m, opt = acc.prepare(m, opt)
    stats = run_update(m, opt, sched, acc, batch, cfg, beta=0.1)
    assert isinstance(stats, UpdateStats)
    m = acc.unwrap_model(m)
    assert all(p.dtype == torch.float32 for p in m.parameters())  # master weights stay fp32 in either precision
    return {k: before[k] - v.detach() for k, v in m.named_parameters()}, {**stats.metrics(), **stats.max_metrics()}


# How far a gradient made of other micro-batches (or processes) may be from the whole batch's, as
# |a - b| / |b| per parameter: fp32 to rounding (seen: at most 3.7e-6); bf16 matmuls round their outputs to 8
# bits of mantissa, and another micro-batching rounds other partial sums (seen: at most 1.7e-2 over micro-batches,
# 5.9e-2 over two processes of one sample per micro-batch; 8.1e-2 once the LM head's matmuls ran in bf16 too).
# The fp32 runs are the guards of the normaliser (a per-process one would be ~10% off here); the bf16 ones show
# that mixed precision keeps them
TOLERANCE = {"fp32": 2e-5, "bf16": 1.5e-1}


def assert_near(a: torch.Tensor, b: torch.Tensor, rel: float, what: str) -> None:
    err = float((a - b).norm()) / max(float(b.norm()), 1e-12)
    assert err <= rel or float((a - b).abs().max()) < 1e-9, f"{what}: |a - b| / |b| = {err:.2e} > {rel:.0e}"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("aggregation", list(AGGREGATIONS))
def test_micro_batches_accumulate_to_the_full_batch_gradient(world, aggregation, precision):
    model, batch = world
    full, s_full = _step(model, batch, precision, micro_batch_size=6, loss_aggregation=aggregation)
    micro, s_micro = _step(model, batch, precision, micro_batch_size=2, loss_aggregation=aggregation)
    assert max(float(v.abs().max()) for v in full.values()) > 1e-6  # a real gradient
    for k in full:
        assert_near(micro[k], full[k], TOLERANCE[precision], k)
    if precision == "bf16":  # autocast did compute in bf16: the step is not the fp32 one
        fp32, _ = _step(model, batch, "fp32", micro_batch_size=6, loss_aggregation=aggregation)
        assert max(float((fp32[k] - full[k]).abs().max()) for k in full) > 1e-6
        assert s_micro["policy/loss"] == pytest.approx(s_full["policy/loss"], rel=3e-2, abs=1e-4)
        return
    assert s_micro["policy/loss"] == pytest.approx(s_full["policy/loss"], rel=1e-5, abs=1e-7)
    assert s_micro["kl/mean"] == pytest.approx(s_full["kl/mean"], rel=1e-5)
    # every metric the loss computes is logged; token means do not depend on the micro-batching, the max
    # ratio is the largest of any micro-batch
    for k in ("policy/clip_frac", "policy/dual_clip_frac", "policy/approx_kl", "policy/ratio_mean", "policy/ratio_max"):
        assert s_micro[k] == pytest.approx(s_full[k], rel=1e-5, abs=1e-7), k
    assert s_full["policy/ratio_max"] >= s_full["policy/ratio_mean"] > 0


def test_huge_log_ratio_to_the_reference_keeps_the_loss_finite(world):
    """log pi - log pi_ref = -100 (the policy has all but abandoned tokens the reference likes): k3's
    exp(100) overflows float32; the clamped log-ratio does not."""
    model, batch = world
    far = copy.copy(batch)
    far.ref_logp = batch.old_logp + 100.0
    delta, stats = _step(model, far, micro_batch_size=6, kl={"coef": 0.1, "estimator": "k3"})
    assert all(math.isfinite(stats[k]) for k in ("policy/loss", "kl/mean", "optim/grad_norm"))
    assert all(bool(torch.isfinite(v).all()) for v in delta.values())


def test_importance_weights_from_the_update_forward_equal_a_separate_pass(world):
    """Another sampler (vLLM), one pass in one mini-batch: the update takes the old log-probs from its own
    forward and weights tokens by min(pi_old / pi_sampler, cap). The step equals the one made with old
    log-probs and weights from a separate pass, and the batch carries both for the log phase."""
    from rlkit.algos import truncated_is_weights

    model, batch = world
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        exact = completion_logprobs(model, batch)[0]
    sampled = copy.copy(batch)
    sampled.sampler_logp = exact + 0.4 * torch.randn(exact.shape, generator=g)  # some ratios above the cap
    sampled.old_logp = None

    def step(b, cap):
        m = copy.deepcopy(model)
        before = {k: v.detach().clone() for k, v in m.named_parameters()}
        opt = torch.optim.SGD(m.parameters(), lr=1.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        run_update(m, opt, sched, Accelerator(cpu=True), b, RLConfig(max_grad_norm=1e9, micro_batch_size=2, kl={"coef": 0.1}), beta=0.1,
                   tis_cap=cap)
        return {k: before[k] - v.detach() for k, v in m.named_parameters()}

    fused = copy.copy(sampled)
    d_fused = step(fused, 1.5)
    separate = copy.copy(sampled)
    separate.old_logp = exact
    separate.is_weights = truncated_is_weights(exact, sampled.sampler_logp, 1.5)
    d_sep = step(separate, 1.5)
    mask = batch.loss_mask.bool()
    torch.testing.assert_close(fused.old_logp[mask], exact[mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.is_weights[mask], separate.is_weights[mask], rtol=1e-5, atol=1e-5)
    assert 0 < float((fused.is_weights[mask] == 1.5).float().mean()) < 1  # the cap bit somewhere, not everywhere
    for k in d_sep:
        torch.testing.assert_close(d_fused[k], d_sep[k], rtol=1e-4, atol=1e-6, msg=k)
    unweighted = copy.copy(sampled)
    d_plain = step(unweighted, None)  # no correction: a different step
    assert unweighted.is_weights is None
    assert max(float((d_plain[k] - d_sep[k]).abs().max()) for k in d_sep) > 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_two_processes_give_the_one_process_gradient(world, tmp_path, precision):
    """The batch split over 2 processes (gloo, one sample per micro-batch; the halves hold 16 and 20
    completion tokens) gives the gradient of the whole batch in one process, for every aggregation: the
    loss is normalised by the global token or sequence count, not by each process's own."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    out = tmp_path / "deltas.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--multi_gpu",
           "--num_machines", "1", "--mixed_precision", "bf16" if precision == "bf16" else "no", "--dynamo_backend",
           "no", str(Path(__file__).parent / "dist_update.py"), str(out), precision]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    two = load_file(str(out))
    model, batch = world
    for aggregation in AGGREGATIONS:
        one, stats = _step(model, batch, precision, micro_batch_size=6, loss_aggregation=aggregation)
        for k in one:
            assert_near(two[f"{aggregation}/{k}"], one[k], TOLERANCE[precision], f"{aggregation}: {k}")
        # bf16: the loss is a sum of advantage-weighted ratios that nearly cancels, so the rounding of the
        # bf16 LM head's logits in another micro-batching shows in it (seen 5.6e-2)
        rel = 1e-4 if precision == "fp32" else 1e-1
        assert float(two[f"{aggregation}/loss"]) == pytest.approx(stats["policy/loss"], rel=rel, abs=1e-7)
