"""9. Weights that do not match config.json are refused in one line, not trained as random layers.

transformers only logs missing, unexpected and mis-shaped weights, and rlkit's quiet logging hides that
log: a config that says 6 layers over a checkpoint of 4 used to train two random layers without a word.
The heads rlkit adds on purpose (the reward model's and the critic's score head) are the only weights that
start new, and the run says so. Real tiny models saved in-process, edited on disk.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlkit.embedded import model_dir
from rlkit.models import ModelError, load_causal_lm
from rlkit.trainers.rm import load_reward_model

from conftest import assert_clean_error

SFT = ["--max-steps", 1, "--set", "train.batch_size=4", "--set", "eval.limit=4"]
RM = ["--max-steps", 1, "--set", "train.batch_size=4", "--set", "data.max_samples=32"]
RL = ["--max-steps", 1, "--set", "rl.prompts_per_step=4", "--set", "rl.num_generations=4", "--set", "eval.limit=4",
      "--set", "rl.reward_check=false", "--set", "rl.max_new_tokens=16", "--set", "rl.log_completions=0"]


def _save(config, root, name: str):
    tok = AutoTokenizer.from_pretrained(model_dir())
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(root / name)
    tok.save_pretrained(root / name)
    return root / name


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """4 layers, hidden 64, an lm_head of its own (not tied), the embedded tokenizer."""
    from transformers import LlamaConfig

    tok = AutoTokenizer.from_pretrained(model_dir())
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return _save(config, tmp_path_factory.mktemp("weights"), "llama4")


def _edited(src, dst, **changes):
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, **changes}))
    return dst


def test_config_with_more_layers_than_the_weights(cli, llama, tmp_path):
    six = _edited(llama, tmp_path / "six-layers", num_hidden_layers=6)
    for cmd, small in (("sft", SFT), ("grpo", RL)):
        r = cli(cmd, "--model", six, "--output-dir", tmp_path / cmd, *small)
        assert r.exit_code == 2, r.output
        assert_clean_error(r, str(six), "config.json describes weights the checkpoint does not have",
                           "model.layers.4.input_layernorm.weight, model.layers.4.mlp.down_proj.weight and 16 more")


def test_extra_tensor_in_the_checkpoint(cli, llama, tmp_path):
    extra = tmp_path / "extra"
    shutil.copytree(llama, extra)
    weights = load_file(extra / "model.safetensors")
    save_file({**weights, "model.layers.0.mlp.extra.weight": torch.zeros(4, 4)}, extra / "model.safetensors",
              metadata={"format": "pt"})
    for cmd, small in (("sft", SFT), ("rm", RM)):  # rm: only the causal LM's lm_head may go unused
        r = cli(cmd, "--model", extra, "--output-dir", tmp_path / cmd, *small)
        assert r.exit_code == 2, r.output
        assert_clean_error(r, str(extra), "the checkpoint has weights config.json does not describe",
                           "model.layers.0.mlp.extra.weight")


def test_wrong_shape(cli, llama, tmp_path):
    narrow = _edited(llama, tmp_path / "narrow", intermediate_size=96)
    r = cli("sft", "--model", narrow, "--output-dir", tmp_path / "sft", *SFT)
    assert r.exit_code == 2, r.output
    assert_clean_error(r, str(narrow), "config.json does not match the checkpoint's shapes",
                       "model.layers.0.mlp.down_proj.weight is 64 × 128 in the checkpoint, 64 × 96 by config.json",
                       "(and 11 more)")


def test_tied_lm_heads_are_not_missing(tmp_path):
    """The embedded model, a GPT-2 and a Qwen2 tie lm_head to the embeddings: the checkpoint has no lm_head."""
    from transformers import GPT2Config, Qwen2Config

    tok = AutoTokenizer.from_pretrained(model_dir())
    gpt2 = _save(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=128), tmp_path, "gpt2")
    qwen2 = _save(Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True), tmp_path, "qwen2")
    for path in (str(model_dir()), str(gpt2), str(qwen2)):
        model = load_causal_lm(path)
        assert model.config.tie_word_embeddings
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    with pytest.raises(ModelError, match="expected a reward model"):
        load_reward_model(str(qwen2))


def test_untied_config_over_a_tied_checkpoint(tmp_path):
    """The same checkpoint with tie_word_embeddings false has no lm_head to load: refused."""
    untied = _edited(model_dir(), tmp_path / "untied", tie_word_embeddings=False)
    with pytest.raises(ModelError, match=r"does not have \(they would start random\): lm_head.weight$"):
        load_causal_lm(str(untied))


@pytest.fixture(scope="module")
def reward_model(llama, tmp_path_factory):
    """`rlkit rm` from the causal LM: the score head starts new and the run says so; the lm_head goes unused."""
    from typer.testing import CliRunner

    from rlkit.cli import app

    out = tmp_path_factory.mktemp("rm") / "rm"
    r = CliRunner().invoke(app, ["rm", "--model", str(llama), "--output-dir", str(out), *map(str, RM)])
    assert r.exit_code == 0, r.output
    return out, r.output


def test_rm_from_a_causal_lm_says_its_head_is_new(reward_model, capsys):
    out, output = reward_model
    assert "reward model: score head initialised new (1 × 64)" in output.splitlines()
    from rlkit.rewards.model import score_texts

    capsys.readouterr()
    assert len(score_texts(str(out), ["a b", "c"])) == 2  # PPO's reward: the trained dir loads strictly
    assert "initialised new" not in capsys.readouterr().out


def test_ppo_critic_from_the_policy_and_resume(cli, llama, reward_model, tmp_path):
    rm_dir, _ = reward_model
    out = tmp_path / "ppo"
    args = ["ppo", "--model", llama, "--output-dir", out, *RL[2:], "--set", "rl.value_model=policy",
            "--set", "train.save_steps=1", "--set", f"rewards=[{{name: reward_model, params: {{path: '{rm_dir}'}}}}]"]
    r = cli(*args, "--max-steps", 1)
    assert r.exit_code == 0, r.output
    assert "critic: value head initialised new (1 × 64)" in r.output.splitlines()
    assert (out / "checkpoint-1" / "critic" / "config.json").is_file()
    # resume: the policy from checkpoint-1 via load_causal_lm, the critic from checkpoint-1/critic, strictly
    r = cli(*args, "--max-steps", 2, "--resume-anyway")
    assert r.exit_code == 0, r.output
    assert "resuming from" in r.output and "initialised new" not in r.output, r.output
    load_reward_model(str(out / "critic"))


def test_reward_model_without_its_score_head(cli, llama, reward_model, tmp_path):
    """A trained reward model must bring its score head: PPO does not start one at random."""
    headless = tmp_path / "headless-rm"
    shutil.copytree(reward_model[0], headless)
    weights = load_file(headless / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("score.")}, headless / "model.safetensors",
              metadata={"format": "pt"})
    r = cli("ppo", "--model", llama, "--output-dir", tmp_path / "ppo", *RL, "--set", "rl.value_model=policy",
            "--set", f"rewards=[{{name: reward_model, params: {{path: '{headless}'}}}}]")
    assert r.exit_code == 2, r.output
    assert_clean_error(r, str(headless), "does not have (they would start random): score.weight")


def test_other_families_heads_and_legacy_buffers(tmp_path):
    """Review: a reward model from GPT-NeoX (its LM head is embed_out, outside the base model) starts its
    score head new like any other family; a GPT-2 checkpoint that still carries the old attn.masked_bias
    buffers loads (transformers recomputes them)."""
    import safetensors.torch as st
    import transformers

    from rlkit.models import load_causal_lm
    from rlkit.trainers.rm import load_reward_model

    neox = tmp_path / "neox"
    transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        tie_word_embeddings=False)).save_pretrained(neox)
    assert "embed_out.weight" in st.load_file(neox / "model.safetensors")
    assert load_reward_model(str(neox), init=True).config.num_labels == 1
    gpt2 = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2)).save_pretrained(gpt2)
    tensors = st.load_file(gpt2 / "model.safetensors")
    tensors["h.0.attn.masked_bias"] = torch.tensor(-1e4)
    st.save_file(tensors, gpt2 / "model.safetensors", metadata={"format": "pt"})
    load_causal_lm(str(gpt2))
