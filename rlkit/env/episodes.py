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
    sampler_logprobs: bool = True            # every model turn came with the sampler's log-probs
    done: bool = False
    last_text: str = ""
    finish_reason: str = "stop"
    prompt_messages: list[dict] = field(default_factory=list)  # the prompt as the model saw it (after reset)

    def add(self, ids: list[int], model: bool, logprobs: list[float] | None = None) -> None:
        self.ids += ids
        self.mask += [1 if model else 0] * len(ids)
        self.logprobs += list(logprobs) if logprobs is not None else [0.0] * len(ids)
        if model and logprobs is None:
            self.sampler_logprobs = False

    def cut(self) -> None:
        """A limit ended the episode: counted as truncated, and as cut off at the length limit."""
        self.done, self.truncated, self.finish_reason = True, True, "length"


def reply_text(tokenizer, messages: list[dict], tools: list[dict] | None, stop_text: str | None) -> str:
    """What the chat template writes after a model turn that ended on ``stop_text`` (its end-of-turn token, as
    text), for the reply ``messages`` and the next generation prompt."""
    dummy = [{"role": "user", "content": _USER_MARK}, {"role": "assistant", "content": _MODEL_MARK}]
    full = apply_chat(tokenizer, dummy + messages, tools=tools)
    if _MODEL_MARK not in full:
        raise ValueError("the template does not render the assistant turn's text")
    after = full[full.rindex(_MODEL_MARK) + len(_MODEL_MARK):]
    if stop_text and after.startswith(stop_text):  # the sampler wrote the template's end-of-turn token itself
        after = after[len(stop_text):]
    return after


def check_template(tokenizer, source: EnvSource) -> None:
    """Before any rollout: the chat template must render a tool's reply (and a user message, for an environment
    with ``respond``) after a model turn, with the reply's text in it; else one TemplateError line. Gemma's refuses
    a tool turn, Phi-3's drops its text, GPT-OSS's wants the call as structured ``tool_calls``."""
    from rlkit.errors import first_line
    from rlkit.templates import TemplateError

    name = getattr(tokenizer, "name_or_path", "") or "the model"
    probes = [[{"role": "tool", "name": "probe", "content": "rlkit-tool-reply"}]]
    if source.factory is not None and callable(getattr(source.factory, "respond", None)):
        probes.append([{"role": "user", "content": "rlkit-tool-reply"}])
    for reply in probes:
        try:
            text = reply_text(tokenizer, reply, source.schemas, None)
        except Exception as e:  # jinja2's TemplateError from the template's raise_exception(), a missing marker
            raise TemplateError(f"env: the chat template of {name} cannot render a {reply[0]['role']} turn after the "
                                f"model's ({first_line(e)}); multi-turn episodes need one that can (Qwen2.5's, "
                                "the embedded model's)") from None
        if "rlkit-tool-reply" not in text:
            raise TemplateError(f"env: the chat template of {name} drops the text of a {reply[0]['role']} turn; "
                                "multi-turn episodes need one that renders it (Qwen2.5's, the embedded model's)")


def messages_of(prompt: str | list[dict]) -> list[dict]:
    """A row's prompt as chat messages (a text is one user turn)."""
    return [dict(m) for m in prompt] if isinstance(prompt, list) else [{"role": "user", "content": prompt}]


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
        text = apply_chat(tokenizer, messages, tools=source.schemas)
        rendered.append(text)
        base = tokenizer(text, add_special_tokens=False)["input_ids"]
        for _ in range(params.n):
            env, obs = _start(source, row)
            ids, own, seen = base, None, messages
            if obs is not None:  # TRL: the observation is appended to the last user message
                seen = messages[:-1] + [{**messages[-1], "content": messages[-1]["content"] + str(obs)}]
                ids = own = tokenizer(apply_chat(tokenizer, seen, tools=source.schemas),
                                      add_special_tokens=False)["input_ids"]
            episodes.append(Episode(env, prompt_messages=seen))
            starts.append(ids)
            own_prompt.append(own)
    turn_params = dataclasses.replace(params, n=1)
    for turn in range(env_cfg.max_turns):
        active = [i for i, e in enumerate(episodes) if not e.done]
        if not active:
            break
        if params.seed is not None:
            turn_params = dataclasses.replace(turn_params, seed=params.seed + turn)
        # each episode generates at most the room its budget has left (one generate call per distinct room)
        rooms: dict[int, list[int]] = {}
        for i in active:
            rooms.setdefault(min(params.max_new_tokens, budget - len(episodes[i].ids)), []).append(i)
        for room, group in sorted(rooms.items(), reverse=True):
            outs = engine.generate([starts[i] + episodes[i].ids for i in group],
                                   dataclasses.replace(turn_params, max_new_tokens=room),
                                   progress=progress if turn == 0 else None)
            for i, [s] in zip(group, outs):
                _model_turn(episodes[i], s, tokenizer, source, budget, last_turn=turn == env_cfg.max_turns - 1)
    samples = []
    for k, e in enumerate(episodes):
        samples.append(Sample(e.last_text, e.ids, e.logprobs if e.sampler_logprobs else None, e.finish_reason,
                              mask=e.mask, prompt_ids=own_prompt[k], episode=e))
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


def _model_turn(e: Episode, s: Sample, tokenizer, source: EnvSource, budget: int, last_turn: bool) -> None:
    ids, lps = list(s.token_ids), s.logprobs
    room = budget - len(e.ids)
    finished = s.finished
    if len(ids) > room:
        ids, finished = ids[:room], False
        lps = lps[:room] if lps is not None else None
    e.add(ids, True, lps)
    e.turns += 1
    # the turn's text with special tokens kept (some tokenizers mark <tool_call> itself as special), without
    # the end-of-turn token the sampler stopped on (the chat template writes that itself)
    text = tokenizer.decode(ids[:-1] if finished and ids else ids, skip_special_tokens=False)
    e.last_text = text
    e.messages.append({"role": "assistant", "content": text})
    if not finished:
        e.cut()
        return
    calls = parse_tool_calls(text)
    if calls:
        if last_turn:
            e.cut()
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
        e.cut()
        return
    e.add(reply_ids, False)
    e.messages.extend(replies)
