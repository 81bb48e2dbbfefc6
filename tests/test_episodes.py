"""Multi-turn episodes, token in and token out (rlkit.env.episodes), under real chat templates with tools:
the embedded model's own, and Qwen2.5's and Qwen3's published templates (as TRL ships them)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trl

from rlkit.embedded import model_dir
from rlkit.embedded.build import CHAT_TEMPLATE
from rlkit.env.environments import load_env
from rlkit.env.episodes import reply_text, run_episodes
from rlkit.env.schema import EnvConfig
from rlkit.models import load_tokenizer
from rlkit.rollout import Sample, SamplingParams

TEMPLATES = Path(trl.__file__).parent / "chat_templates"
CALL = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "1234 + 567"}}\n</tool_call>'


def tokenizer(template: str):
    tok = load_tokenizer(str(model_dir()))
    tok.chat_template = CHAT_TEMPLATE if template == "embedded" else (TEMPLATES / f"{template}.jinja").read_text()
    return tok


class Scripted:
    """An engine whose k-th turn is ``turns[k]`` (canonical token ids, then the end-of-turn token) in every
    episode: the chat templates and the tokenizer are real; only the model's choices are fixed."""

    def __init__(self, tok, turns: list[str], stop: str = "<|im_end|>"):
        self.tok, self.turns, self.stop, self.calls = tok, turns, stop, 0

    def generate(self, prompt_ids, params, progress=None):
        text = self.turns[min(self.calls, len(self.turns) - 1)]
        self.calls += 1
        ids = self.tok(text, add_special_tokens=False)["input_ids"] + [self.tok.convert_tokens_to_ids(self.stop)]
        return [[Sample(text, ids, [-0.5] * len(ids), "stop")] for _ in prompt_ids]


def episode(tok, turns, env: dict, rows=None, n=1, max_new_tokens=64):
    cfg = EnvConfig(**env)
    source = load_env(cfg)
    rows = rows or [{"prompt": "What is 1234 + 567?", "answer": "1801"}]
    texts, groups = run_episodes(Scripted(tok, turns), tok, source, cfg, rows,
                                 SamplingParams(n=n, max_new_tokens=max_new_tokens))
    return source, texts, groups


def rendered(tok, source, prompt: str, sample: Sample) -> list[int]:
    messages = [{"role": "user", "content": prompt}] + sample.episode.messages
    text = tok.apply_chat_template(messages, tools=source.schemas or None, tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("template", ["embedded", "qwen2_5", "qwen3"])
def test_trajectory_is_the_conversation_the_template_renders(template):
    tok = tokenizer(template)
    # a Qwen3 model thinks before each turn (its template renders a turn without a <think> block with an empty one)
    think = "<think>\nadd them\n</think>\n\n" if template == "qwen3" else ""
    source, texts, [[s]] = episode(tok, [think + CALL, think + "<answer> 1801 </answer>"],
                                   {"tools": ["rlkit.env.calculator:calculator"]})
    ep = s.episode
    assert [m["role"] for m in ep.messages] == ["assistant", "tool", "assistant"]
    assert ep.messages[1]["content"] == "1801" and ep.turns == 2 and ep.tool_calls == 1 and not ep.truncated
    prompt_ids = tok(texts[0], add_special_tokens=False)["input_ids"]
    trajectory = prompt_ids + s.token_ids
    full = rendered(tok, source, "What is 1234 + 567?", s)
    # equal token for token; the rendering goes on past the sampler's last end-of-turn token with the newline
    # the template writes after every turn (the sampler stops at the end-of-turn token)
    assert full[: len(trajectory)] == trajectory
    assert tok.decode(full[len(trajectory):]) == "\n"
    # the tool's reply carries mask 0 and log-prob 0; the model's two turns mask 1 with the sampler's log-probs
    reply = [t for t, m in zip(s.token_ids, s.mask) if m == 0]
    assert tok.decode(reply) == reply_text(tok, ep.messages[1:2], source.schemas, "<|im_end|>")
    assert "1801" in tok.decode(reply) and sum(s.mask) == len(s.token_ids) - len(reply)
    assert all(lp == 0.0 for lp, m in zip(s.logprobs, s.mask) if m == 0)
    assert all(lp == -0.5 for lp, m in zip(s.logprobs, s.mask) if m == 1)
    assert s.text == think + "<answer> 1801 </answer>"


def test_qwen3_rewrites_history_the_one_allowed_difference():
    """Qwen3's template drops the <think> block of assistant turns before the last user message when it renders
    a conversation again. The trajectory keeps the tokens the model sampled: equal to the rendering except for
    exactly that block."""
    tok = tokenizer("qwen3")
    first, second = "<think>\nplan\n</think>\n\nfirst", "<think>\nmore\n</think>\n\nsecond"
    source, texts, [[s]] = episode(tok, [first, second], {"factory": "trl_env:Chatty"})
    assert [m["role"] for m in s.episode.messages] == ["assistant", "user", "assistant"]
    trajectory = tok.decode(tok(texts[0], add_special_tokens=False)["input_ids"] + s.token_ids)
    full = tok.decode(rendered(tok, source, "What is 1234 + 567?", s))
    assert trajectory != full[: len(trajectory)]
    assert trajectory.replace("<think>\nplan\n</think>\n\n", "", 1) + "\n" == full


def test_tool_faults_are_observations_and_counted():
    tok = tokenizer("embedded")
    calls = ("<tool_call>{not json}</tool_call>"
             '<tool_call>{"name": "nope", "arguments": {}}</tool_call>'
             '<tool_call>{"name": "multiply", "arguments": {"a": 2}}</tool_call>'
             '<tool_call>{"name": "multiply", "arguments": {"a": 2, "b": 3}}</tool_call>')
    _, _, [[s]] = episode(tok, [calls, "<answer> 6 </answer>"], {"tools": ["tool_fns:multiply"]},
                          max_new_tokens=256)
    ep = s.episode
    obs = [m["content"] for m in ep.messages if m["role"] == "tool"]
    assert obs[0].startswith("error: the tool call is not JSON") and obs[1].startswith("error: unknown tool 'nope'")
    assert obs[2].startswith("error: multiply:") and obs[3] == "6"
    assert (ep.tool_calls, ep.tool_errors, ep.turns, ep.truncated) == (4, 3, 2, False)


def test_turn_limit_and_token_budget_truncate():
    tok = tokenizer("embedded")
    _, _, [[s]] = episode(tok, [CALL], {"tools": ["rlkit.env.calculator:calculator"], "max_turns": 3},
                          max_new_tokens=128)
    assert (s.episode.turns, s.episode.tool_calls, s.episode.truncated) == (3, 2, True)
    assert not s.finished  # cut by a limit: rl.overlong_filter and rollout/truncated_frac see it
    assert s.mask[-1] == 1  # it ends on the model's last call, unanswered
    _, _, [[s]] = episode(tok, [CALL], {"tools": ["rlkit.env.calculator:calculator"], "max_tokens": 40})
    assert s.episode.truncated and len(s.token_ids) <= 40


def test_trl_environment_class_unchanged():
    """A class written for TRL's environment_factory: reset gets the row's columns and its text is appended to the
    user turn; its public method is the tool; get_reward reads its state."""
    tok = tokenizer("qwen2_5")
    turn = '<tool_call>\n{"name": "increment", "arguments": {"by": 2}}\n</tool_call>'
    rows = [{"prompt": "Count to 3.", "start": 1, "target": 3, "announce": True}]
    source, texts, [[a, b]] = episode(tok, [turn, "done"], {"factory": "trl_env:CounterEnv"}, rows=rows, n=2)
    assert source.name == "CounterEnv" and source.has_reward
    assert [sc["function"]["name"] for sc in source.schemas] == ["increment"]
    assert "Count to 3. (start at 1)" in tok.decode(a.prompt_ids)
    assert a.episode.env is not b.episode.env  # one instance per rollout
    assert a.episode.messages[1]["content"] == "3" and a.episode.env.get_reward() == 1.0


@pytest.mark.parametrize("spec,needle", [
    ("trl_env:Missing", "env.factory: 'trl_env:Missing'"),
    ("trl_env:NoReset", "has no reset method"),
    ("trl_env:Broken", "could not be built: RuntimeError: no database"),
    ("no_such_module:Env", "No module named 'no_such_module'"),
])
def test_bad_environment_is_one_line(spec, needle):
    from rlkit.env.environments import EnvError

    with pytest.raises(EnvError, match=None) as e:
        load_env(EnvConfig(factory=spec))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_an_environment_whose_reset_raises_is_one_line():
    from rlkit.env.environments import EnvError

    tok = tokenizer("embedded")
    with pytest.raises(EnvError) as e:
        episode(tok, ["x"], {"factory": "trl_env:FailsLater"})
    assert str(e.value) == "env.factory: FailsLater: building it or its reset(**row) raised KeyError: 'start'"


@pytest.mark.parametrize("template, needle", [("gemma", "cannot render a tool turn"),
                                              ("phi3", "drops the text of a tool turn")])
def test_a_template_that_cannot_render_tool_replies_is_one_line(template, needle):
    """Checked before any rollout (rlkit grpo/eval/sample call check_template after loading the tokenizer)."""
    from rlkit.env.episodes import check_template
    from rlkit.templates import TemplateError

    tok = tokenizer(template)
    with pytest.raises(TemplateError) as e:
        check_template(tok, load_env(EnvConfig(tools=["rlkit.env.calculator:calculator"])))
    assert needle in str(e.value) and "\n" not in str(e.value)
    check_template(tokenizer("qwen2_5"), load_env(EnvConfig(tools=["rlkit.env.calculator:calculator"])))


def test_plain_multi_turn_chat_sft_rows_keep_training_on_the_last_turn():
    """Only conversations with tool turns (or tools) are tokenised whole; a plain chat with two assistant turns is
    TRL's conversational prompt/completion as before, even under Qwen3's history-rewriting template."""
    from rlkit.trainers.sft import to_sft_examples

    row = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "<think>\nx\n</think>\n\nb"},
                        {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}
    [ex] = to_sft_examples([row], "chat", tokenizer("qwen3"), "data.jsonl")
    assert ex["completion"] == [{"role": "assistant", "content": "d"}] and len(ex["prompt"]) == 3
