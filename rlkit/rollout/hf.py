"""The ``hf`` engine: batched transformers ``generate`` on the training model itself, with left padding.

Greedy when ``temperature == 0``; otherwise ``rlkit.rollout.sampler`` draws each token (temperature and top-p,
an inverse-CDF draw: transformers' multinomial costs 27 ms a step on a CPU). With ``return_logprobs`` each
sample carries the sampler's log-probs (temperature and top-p applied; greedy: of the processed scores).

``cache="static"`` pre-allocates the KV cache (transformers' StaticCache); on CUDA transformers then
compiles the decode step. Prompt lengths are padded up to a multiple of ``bucket`` tokens so that the
compiled shapes repeat and recompiles are rare. On CPU the static cache runs uncompiled (correct, not
faster).
"""

from __future__ import annotations

import torch

from transformers import LogitsProcessorList

from rlkit.rollout.base import Sample, SamplingParams
from rlkit.rollout.sampler import InverseCdfSampler


class HFEngine:
    """Samples from ``model`` as it is: the trainer is the sampler, so weights need no sync."""

    def __init__(self, model, tokenizer, batch_size: int = 64, return_logprobs: bool = False,
                 cache: str = "dynamic", bucket: int = 64):
        if cache not in ("dynamic", "static"):
            raise ValueError(f"hf engine: unknown cache {cache!r}; expected dynamic or static")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.return_logprobs = return_logprobs
        self.cache = cache
        self.bucket = bucket
        self.stop_ids = set(_eos_ids(model, tokenizer))

    def sync_weights(self, model) -> None:
        self.model = model  # the same module the trainer updates: nothing to copy

    def sleep(self) -> None:
        pass

    def close(self) -> None:
        pass

    def wake(self) -> None:
        pass

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], params: SamplingParams, progress=None) -> list[list[Sample]]:
        tok, model = self.tokenizer, self.model
        was_training = model.training
        model.eval()
        expanded = [p for p in prompt_ids for _ in range(params.n)]
        out: list[Sample] = []
        greedy = params.temperature == 0
        if params.seed is not None:
            torch.manual_seed(params.seed)
        for i in range(0, len(expanded), self.batch_size):
            chunk = expanded[i : i + self.batch_size]
            enc = tok.pad({"input_ids": chunk}, padding=True, return_tensors="pt",
                          pad_to_multiple_of=self.bucket if self.cache == "static" else None).to(model.device)
            extra = {"cache_implementation": "static"} if self.cache == "static" else {}
            # sampling: our own sampler (rlkit.rollout.sampler) behind generate's greedy argmax
            sampler = None if greedy else InverseCdfSampler(params.temperature, params.top_p)
            gen = model.generate(
                **extra,
                **enc,
                max_new_tokens=params.max_new_tokens,
                min_new_tokens=params.max_new_tokens if params.ignore_eos else None,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                logits_processor=LogitsProcessorList([sampler] if sampler else []),
                pad_token_id=tok.pad_token_id,
                eos_token_id=sorted(self.stop_ids),
                return_dict_in_generate=True,
                output_scores=self.return_logprobs and greedy,
                **_synced(model),
                **_no_router_loss(model),
            )
            seqs = gen.sequences[:, enc["input_ids"].shape[1] :]
            lps = None
            if self.return_logprobs and sampler is not None:
                lps = sampler.logprobs()
            elif self.return_logprobs:
                scores = torch.stack(gen.scores, dim=1).float().log_softmax(-1)
                lps = scores.gather(-1, seqs.unsqueeze(-1)).squeeze(-1)
            for j, row in enumerate(seqs.tolist()):
                ids, finished = [], False
                for t in row:
                    ids.append(t)
                    if t in self.stop_ids:
                        finished = True
                        break
                text = tok.decode(ids, skip_special_tokens=True)
                out.append(Sample(text, ids, lps[j, : len(ids)].tolist() if lps is not None else None,
                                  "stop" if finished else "length"))
            if progress is not None:
                progress(len(chunk))
        model.train(was_training)
        return [out[k * params.n : (k + 1) * params.n] for k in range(len(prompt_ids))]


def _synced(model) -> dict:
    """An FSDP2 model whose weights the RL loop has gathered (``rlkit.weights.gathered``) runs plain forwards:
    no per-token synchronisation between processes. Otherwise transformers decides (it syncs sharded models)."""
    from rlkit.weights import is_sharded

    if is_sharded(model) and not hasattr(next(model.parameters()), "to_local"):
        return {"synced_gpus": False}
    return {}


def _eos_ids(model, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))


def _no_router_loss(model) -> dict:
    """An MoE whose config has ``output_router_logits`` on computes its load-balancing loss in every forward,
    in generation too, where transformers compares each decode step's router logits with the whole sequence's
    attention mask and fails on a padded batch ("size of tensor a (64) must match ... b (1216)"): off here."""
    config = model.config.get_text_config() if hasattr(model, "config") else None
    return {"output_router_logits": False} if getattr(config, "output_router_logits", False) else {}

