"""The engine registry and the rollout config variants; the hf engine and the trainer's log-prob computation
agree on what was sampled."""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlkit.embedded import model_dir
from rlkit.rollout import SamplingParams, make_engine, rollout_config
from rlkit.templates import render_prompt
from rlkit.trainers.batch import build_batch, completion_logprobs


def _load():
    return AutoModelForCausalLM.from_pretrained(model_dir()).eval(), AutoTokenizer.from_pretrained(model_dir())


def _hf(model, tok, **kw):
    return make_engine(rollout_config(**kw), tok, model=model, return_logprobs=True)


def _ids(tok, prompts):
    return tok(prompts, add_special_tokens=False)["input_ids"]


def test_sampler_logprobs_match_recomputed_logprobs():
    """Left-padded prompts of different lengths, sampled at temperature 0.7: the engine's log-probs equal a
    fresh forward pass over prompt + completion (positions follow the attention mask)."""
    model, tok = _load()
    prompts = [render_prompt(q, "r1_zero") for q in ("What is 3 + 4?", "What is 12 + 98?")]
    prompts.append(tok.apply_chat_template([{"role": "user", "content": "What is 5 + 5?"}], tokenize=False,
                                           add_generation_prompt=True))
    torch.manual_seed(0)
    engine = _hf(model, tok)
    groups = engine.generate(_ids(tok, prompts), SamplingParams(n=3, max_new_tokens=40, temperature=0.7))
    samples = [s for g in groups for s in g]
    assert all(len(s.logprobs) == len(s.token_ids) for s in samples)
    prompt_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts for _ in range(3)]
    batch = build_batch(prompt_ids, samples, [i // 3 for i in range(9)], [0.0] * 9, tok.pad_token_id)
    with torch.no_grad():
        logp, ent = completion_logprobs(model, batch, temperature=0.7, with_entropy=True)
    mask = batch.completion_mask.bool()
    assert torch.allclose(logp[mask], batch.sampler_logp[mask], atol=1e-3), (logp[mask] - batch.sampler_logp[mask]).abs().max()
    assert (ent[mask] >= 0).all()


def test_greedy_is_deterministic_and_stops_at_eos():
    model, tok = _load()
    engine = _hf(model, tok)
    p = _ids(tok, [render_prompt("What is 21 + 81?", "r1_zero")])
    a = engine.generate(p, SamplingParams(n=1, max_new_tokens=64, temperature=0))[0][0]
    b = engine.generate(p, SamplingParams(n=1, max_new_tokens=64, temperature=0))[0][0]
    assert a.token_ids == b.token_ids and a.finished
    assert a.token_ids[-1] in engine.stop_ids and "<answer>" in a.text
    cut = engine.generate(p, SamplingParams(n=1, max_new_tokens=5, temperature=0))[0][0]
    assert len(cut.token_ids) == 5 and not cut.finished


def test_chunked_logprobs_match_plain_values_and_gradients():
    """Chunked LM-head log-probs (never the full-vocabulary logits of the batch at once) equal the plain
    computation, values and gradients alike."""
    model, tok = _load()
    model.train()
    prompts = [render_prompt(q, "r1_zero") for q in ("What is 3 + 4?", "What is 12 + 98?", "What is 7 + 70?")]
    torch.manual_seed(1)
    groups = _hf(model, tok).generate(_ids(tok, prompts), SamplingParams(n=2, max_new_tokens=24, temperature=1.0))
    samples = [s for g in groups for s in g]
    prompt_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts for _ in range(2)]
    batch = build_batch(prompt_ids, samples, [i // 2 for i in range(6)], [0.0] * 6, tok.pad_token_id)
    mask = batch.completion_mask

    def run(chunk):
        model.zero_grad()
        lp, ent = completion_logprobs(model, batch, temperature=0.9, with_entropy=True, chunk_tokens=chunk)
        ((lp * mask).sum() / mask.sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return lp.detach(), ent, grads

    lp_a, ent_a, g_a = run(None)
    lp_b, ent_b, g_b = run(7)  # an odd chunk size that splits sequences
    m = mask.bool()
    assert torch.allclose(lp_a[m], lp_b[m], atol=1e-5) and torch.allclose(ent_a[m], ent_b[m], atol=1e-4)
    assert g_a.keys() == g_b.keys()
    for k in g_a:
        assert torch.allclose(g_a[k], g_b[k], atol=1e-5, rtol=1e-4), k


def test_static_cache_matches_dynamic_cache():
    """The static-cache path (bucketed prompt lengths) generates what the default dynamic cache does."""
    model, tok = _load()
    prompts = [render_prompt(q, "r1_zero") for q in ("What is 3 + 4?", "What is 12 + 98?", "What is 50 + 49?")]
    params = SamplingParams(n=1, max_new_tokens=48, temperature=0)
    dyn = _hf(model, tok).generate(_ids(tok, prompts), params)
    static = _hf(model, tok, hf_cache="static")
    static.bucket = 32
    sta = static.generate(_ids(tok, prompts), params)
    assert [g[0].token_ids for g in dyn] == [g[0].token_ids for g in sta]


# ------------------------------------------------------------------------------ registry and config


def test_each_rollout_section_is_its_engines_variant_with_its_capabilities():
    """The tag comes from engine (missing: hf) and mode (missing: colocate); each variant maps to one registry
    entry whose flags callers ask instead of comparing names; the old single class maps the same way."""
    from rlkit.rollout import ENGINES, engine_spec
    from rlkit.rollout.schema import HFRollout, VLLMColocateRollout, VLLMServerRollout

    cases = [({}, HFRollout, "hf"), ({"hf_cache": "static"}, HFRollout, "hf"),
             ({"engine": "vllm"}, VLLMColocateRollout, "vllm-colocate"),
             ({"engine": "vllm", "mode": "server", "server_url": "http://h:1/v1"}, VLLMServerRollout, "vllm-server")]
    for kw, schema, name in cases:
        cfg = rollout_config(**kw)
        assert type(cfg) is schema and engine_spec(cfg) is ENGINES[name] and ENGINES[name].schema is schema
    flags = {n: (s.samples_itself, s.needs_gathered_weights, s.shared_across_processes, s.returns_logprobs,
                 s.loads_model_path) for n, s in ENGINES.items()}
    assert flags == {"hf": (True, True, False, False, False), "vllm-colocate": (False, False, False, True, True),
                     "vllm-server": (False, False, True, True, False)}

    from rlkit import config

    if hasattr(config, "RolloutConfig"):  # TODO(transition): the single class engine_spec still understands
        assert engine_spec(config.RolloutConfig(engine="vllm", mode="server")) is ENGINES["vllm-server"]
        assert engine_spec(config.RolloutConfig()) is ENGINES["hf"]


def test_rollout_keys_of_another_engine_and_unknown_engines_are_one_line():
    import pytest
    from pydantic import ValidationError

    def error(**kw):
        with pytest.raises(ValidationError) as e:
            rollout_config(**kw)
        return e.value.errors()[0]["msg"]

    assert "unknown engine 'sglang'; expected one of hf, vllm" in error(engine="sglang")
    assert "unknown vllm mode 'shared'; expected one of colocate, server" in error(engine="vllm", mode="shared")
    assert "rollout.hf_cache: only used with rollout.engine hf" in error(engine="vllm", hf_cache="static")
    assert "rollout.mode: only used with rollout.engine vllm" in error(mode="server")
    assert "with rollout.mode server" in error(engine="vllm", sync_dir="/tmp/x")
    assert "with rollout.mode colocate" in error(engine="vllm", mode="server", kv_cache_gib=1)
    assert "expected http://HOST:PORT" in error(engine="vllm", mode="server", server_url="ftp://h")
    # a key of another engine at its default (an older rlkit recorded every key) is dropped, not an error
    assert rollout_config(engine="vllm", hf_cache="dynamic", server_url="http://127.0.0.1:8000") == \
        rollout_config(engine="vllm")


def test_rollout_does_not_import_the_trainers():
    """The engines get a model's weights from rlkit.weights; nothing in rlkit/rollout reaches into trainers/."""
    import pathlib

    import rlkit.rollout

    root = pathlib.Path(rlkit.rollout.__file__).parent
    offenders = [p.name for p in root.glob("*.py") if "rlkit.trainers" in p.read_text()]
    assert offenders == []
