"""Multi-turn rollouts, token in and token out.

An episode is one token sequence: the prompt (rendered by the chat template with ``tools=``), then for each
turn the sampler's own token ids, then the environment's reply (tool results, or a ``respond`` message) as
token ids appended. The reply's tokens are what the chat template writes for those messages after the
model's turn, cut from a rendering of a fixed two-turn conversation followed by them (TRL's
``_get_tool_suffix_ids`` does the same), so earlier turns are never rendered again and the model's text is
never re-tokenised: the trainer sees exactly the tokens the sampler produced, with their log-probs.

Reply tokens have mask 0 (they carry log-prob 0 and never enter the loss); the model's have mask 1. Every
turn is a ``engine.generate`` of token ids (``n=1`` per open episode, all episodes of a batch together), so
the hf and vLLM engines (colocated or a server) run episodes alike, and vLLM's prefix cache serves the
growing context.

An episode ends when the model's turn has no tool call (and the environment has no ``respond``, or it
returns None), when the turn hits the generation limit, at ``env.max_turns`` model turns, or when the next
reply would not fit in the episode's token budget (``env.max_tokens``); the last three are ``truncated``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from rlkit.env.environments import EnvSource
from rlkit.env.tools import parse_tool_calls, run_tool_call
from rlkit.rollout.base import Sample, SamplingParams
from rlkit.templates import apply_chat

_USER_MARK, _MODEL_MARK = "rlkit-user-turn", "rlkit-model-turn"


@dataclass
class Episode:
    """One rollout of several turns, beyond its tokens: the conversation and what happened in it."""

    env: object | None                       # the environment instance (reward functions read it)
    messages: list[dict] = field(default_factory=list)  # the turns after the prompt: assistant, tool, user
    turns: int = 0                           # model turns
    tool_calls: int = 0
    tool_errors: int = 0                     # calls answered with an error observation
    truncated: bool = False                  # cut by the turn limit, the generation limit or the token budget
    # the token sequence after the prompt
    ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    done: bool = False
    last_text: str = ""
    finish_reason: str = "stop"

    def add(self, ids: list[int], model: bool, logprobs: list[float] | None = None) -> None:
        self.ids += ids
        self.mask += [1 if model else 0] * len(ids)
        self.logprobs += list(logprobs) if logprobs is not None else [0.0] * len(ids)


def _render(tokenizer, messages: list[dict], tools: list[dict] | None, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                         add_generation_prompt=generation_prompt)


def reply_text(tokenizer, messages: list[dict], tools: list[dict] | None, stop_text: str | None) -> str:
    """What the chat template writes after a model turn that ended on ``stop_text`` (its end-of-turn token, as
    text), for the reply ``messages`` and the next generation prompt."""
    dummy = [{"role": "user", "content": _USER_MARK}, {"role": "assistant", "content": _MODEL_MARK}]
    full = _render(tokenizer, dummy + messages, tools, True)
    after = full[full.rindex(_MODEL_MARK) + len(_MODEL_MARK):]
    if stop_text and after.startswith(stop_text):  # the sampler wrote the template's end-of-turn token itself
        after = after[len(stop_text):]
    return after


def messages_of(prompt: str | list[dict]) -> list[dict]:
    """A row's prompt as chat messages (a text is one user turn)."""
    return [dict(m) for m in prompt] if isinstance(prompt, list) else [{"role": "user", "content": prompt}]


def render_prompt_messages(tokenizer, messages: list[dict], tools: list[dict] | None) -> str:
    return apply_chat(tokenizer, messages, tools=tools)


def run_episodes(engine, tokenizer, source: EnvSource, env_cfg, rows: list[dict], params: SamplingParams,
                 progress=None) -> tuple[list[str], list[list[Sample]]]:
    """``params.n`` episodes for each row (``{prompt, ...}``; the columns go to ``reset``): the rendered prompt of
    each row and, per row, its n episodes as Samples (``mask``, ``episode``; ``prompt_ids`` when ``reset``
    changed the prompt). Tools run on this thread, one call at a time, each under ``env.tool_timeout``."""
    budget = env_cfg.budget(params.max_new_tokens)
    episodes: list[Episode] = []
    starts: list[list[int]] = []  # each episode's prompt ids
    own_prompt: list[list[int] | None] = []
    rendered: list[str] = []
    for row in rows:
        messages = messages_of(row["prompt"])
        text = render_prompt_messages(tokenizer, messages, source.schemas)
        rendered.append(text)
        base = tokenizer(text, add_special_tokens=False)["input_ids"]
        for _ in range(params.n):
            env, obs = _start(source, row)
            ids, own = base, None
            if obs is not None:  # TRL: the observation is appended to the last user message
                changed = messages[:-1] + [{**messages[-1], "content": messages[-1]["content"] + str(obs)}]
                ids = own = tokenizer(render_prompt_messages(tokenizer, changed, source.schemas),
                                      add_special_tokens=False)["input_ids"]
            episodes.append(Episode(env))
            starts.append(ids)
            own_prompt.append(own)
    turn_params = dataclasses.replace(params, n=1)
    for turn in range(env_cfg.max_turns):
        active = [i for i, e in enumerate(episodes) if not e.done]
        if not active:
            break
        if params.seed is not None:
            turn_params = dataclasses.replace(turn_params, seed=params.seed + turn)
        outs = engine.generate([starts[i] + episodes[i].ids for i in active], turn_params,
                               progress=progress if turn == 0 else None)
        for i, [s] in zip(active, outs):
            _model_turn(episodes[i], s, tokenizer, source, env_cfg, budget, last_turn=turn == env_cfg.max_turns - 1)
    samples = []
    for k, e in enumerate(episodes):
        samples.append(Sample(e.last_text, e.ids, e.logprobs, e.finish_reason, mask=e.mask, prompt_ids=own_prompt[k],
                              episode=e))
    n = params.n
    return rendered, [samples[r * n : (r + 1) * n] for r in range(len(rows))]


def _start(source: EnvSource, row: dict):
    """A fresh environment and its first observation; an environment that fails to build or reset ends the run
    in one line (its bug, not the model's)."""
    from rlkit.env.environments import EnvError
    from rlkit.errors import first_line

    try:
        env = source.new()
        return env, (env.reset(**row) if env is not None else None)
    except (Exception, SystemExit) as e:
        raise EnvError(f"env.factory: {source.name}: building it or its reset(**row) raised {type(e).__name__}: "
                       f"{first_line(e)}") from None


def _model_turn(e: Episode, s: Sample, tokenizer, source: EnvSource, env_cfg, budget: int, last_turn: bool) -> None:
    ids, lps = list(s.token_ids), s.logprobs
    room = budget - len(e.ids)
    finished = s.finished
    if len(ids) > room:
        ids, finished = ids[:room], False
        lps = lps[:room] if lps is not None else None
    e.add(ids, True, lps)
    e.turns += 1
    text = tokenizer.decode(ids, skip_special_tokens=True)
    e.last_text = text
    e.messages.append({"role": "assistant", "content": text})
    if not finished:
        e.done, e.truncated, e.finish_reason = True, True, "length"
        return
    # read calls from the text with special tokens kept: some tokenizers mark <tool_call> itself as special
    calls = parse_tool_calls(tokenizer.decode(ids, skip_special_tokens=False))
    if calls:
        if last_turn:
            e.done, e.truncated = True, True
            return
        tools = source.tools_of(e.env)
        replies = []
        for call in calls:
            obs, ok = run_tool_call(tools, call, source.tool_timeout)
            e.tool_calls += 1
            e.tool_errors += 0 if ok else 1
            replies.append({"role": "tool", "name": call.name or "unknown", "content": obs})
    else:
        respond = getattr(e.env, "respond", None)
        try:
            reply = respond(text) if callable(respond) and not last_turn else None
        except (Exception, SystemExit):  # the environment's fault: the episode ends there, counted
            e.tool_errors += 1
            reply = None
        if reply is None:
            e.done = True
            return
        replies = [{"role": "user", "content": str(reply)}]
    stop_text = tokenizer.decode(ids[-1:], skip_special_tokens=False) if ids else None
    reply_ids = tokenizer(reply_text(tokenizer, replies, source.schemas, stop_text),
                          add_special_tokens=False)["input_ids"]
    if len(e.ids) + len(reply_ids) >= budget:  # no room for the reply and a turn after it
        e.done, e.truncated = True, True
        return
    e.add(reply_ids, False)
    e.messages.extend(replies)
