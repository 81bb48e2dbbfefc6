"""The hf engine and the trainer's log-prob computation agree on what was sampled."""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlkit.embedded import model_dir
from rlkit.rollout import SamplingParams, make_engine
from rlkit.templates import render_prompt
from rlkit.trainers.batch import build_batch, completion_logprobs


def _load():
    return AutoModelForCausalLM.from_pretrained(model_dir()).eval(), AutoTokenizer.from_pretrained(model_dir())


def test_sampler_logprobs_match_recomputed_logprobs():
    """Left-padded prompts of different lengths, sampled at temperature 0.7: the engine's log-probs equal a
    fresh forward pass over prompt + completion (positions follow the attention mask)."""
    model, tok = _load()
    prompts = [render_prompt(q, "r1_zero") for q in ("What is 3 + 4?", "What is 12 + 98?")]
    prompts.append(tok.apply_chat_template([{"role": "user", "content": "What is 5 + 5?"}], tokenize=False,
                                           add_generation_prompt=True))
    torch.manual_seed(0)
    engine = make_engine("hf", model, tok, return_logprobs=True)
    groups = engine.generate(prompts, SamplingParams(n=3, max_new_tokens=40, temperature=0.7))
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
    engine = make_engine("hf", model, tok)
    p = [render_prompt("What is 21 + 81?", "r1_zero")]
    a = engine.generate(p, SamplingParams(n=1, max_new_tokens=64, temperature=0))[0][0]
    b = engine.generate(p, SamplingParams(n=1, max_new_tokens=64, temperature=0))[0][0]
    assert a.token_ids == b.token_ids and a.finished
    assert a.token_ids[-1] in engine.stop_ids and "<answer>" in a.text
    cut = engine.generate(p, SamplingParams(n=1, max_new_tokens=5, temperature=0))[0][0]
    assert len(cut.token_ids) == 5 and not cut.finished
