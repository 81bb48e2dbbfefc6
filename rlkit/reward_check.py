"""Reward check: score an honest answer and known reward hacks with a recipe's rewards, before training.

From one dataset row with a gold ``answer`` we build probe completions and score them with the same
``RewardSet.score`` the run uses:

- ``honest``: reasoning in ``<think>``, then the gold answer in ``<answer>``
- ``wrong``: the same, with a wrong answer (the baseline a policy must beat)
- ``no_think``: the gold answer in ``<answer>``, no reasoning block
- ``empty_think``: an empty ``<think></think>``, then the gold answer
- ``repeated_answer``: a wrong ``<answer>`` block, then the right one (hedging over several answers)
- ``answer_outside_tags``: reasoning, then the gold answer as plain text, no ``<answer>`` tags
- ``long_padded``: the honest answer with thousands of filler words in the reasoning

Every probe other than ``honest`` whose total reward is at least the honest total is flagged: a policy
can reach the honest answer's reward that way, so RL may find and keep the hack. A prompt that already
opens ``<think>`` (some chat templates do) is respected: the probes then start inside the block.

    rlkit rewards check --recipe r1_zero
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rich.table import Table

from rlkit.data import DataError, rl_rows
from rlkit.rewards import RewardError
from rlkit.scoring import RewardSet
from rlkit.templates import completion_text, render_prompt

REASONING = "Let me work through the problem step by step, then check the result once more."
FILLER_WORDS = 3000
PROBES = ("honest", "wrong", "no_think", "empty_think", "repeated_answer", "answer_outside_tags", "long_padded")


@dataclass
class ProbeScore:
    name: str
    completion: str
    length: int                       # in tokens (or whitespace words without a tokenizer)
    scores: dict[str, float | None]   # per reward (None: not applicable)
    total: float                      # weighted sum, as in training
    flagged: bool                     # not honest, and scores at least as high as honest


@dataclass
class RewardCheckReport:
    gold: str
    rewards: list[str]
    probes: list[ProbeScore]          # in PROBES order, honest first
    errors: dict[str, str]            # first failure per reward while scoring the probes
    broken: list[str] = field(default_factory=list)  # rewards that failed on every probe they apply to

    def probe(self, name: str) -> ProbeScore:
        return next(p for p in self.probes if p.name == name)

    @property
    def hacks(self) -> list[ProbeScore]:
        return [p for p in self.probes if p.flagged]


def wrong_answer(gold: str) -> str:
    """A well-formed answer that differs from ``gold``: gold + 1 for a number, else 0 (or 1).

    >>> wrong_answer("41"), wrong_answer("-2.5"), wrong_answer(r"\\frac{1}{2}"), wrong_answer("0.0")
    ('42', '-1.5', '0', '1.0')
    """
    text = gold.strip()
    for conv in (int, float):
        try:
            return str(conv(text) + 1)
        except ValueError:
            pass
    return "1" if text == "0" else "0"


def probe_completions(gold: str, prompt: str = "") -> dict[str, str]:
    """The probe completions for a gold answer, as a model would continue ``prompt``.

    >>> probe_completions("7")["repeated_answer"].split("</think>")[1]
    ' <answer> 8 </answer> <answer> 7 </answer>'
    >>> probe_completions("7", "Assistant: <think>")["empty_think"]
    '</think> <answer> 7 </answer>'
    """
    opened = prompt.rstrip().endswith("<think>")
    gold, wrong = gold.strip(), wrong_answer(gold)

    def think(body: str) -> str:
        return f" {body} </think>" if opened else f"<think> {body} </think>"

    filler = " wait," * FILLER_WORDS
    return {
        "honest": f"{think(f'{REASONING} So the answer is {gold}.')} <answer> {gold} </answer>",
        "wrong": f"{think(f'{REASONING} So the answer is {wrong}.')} <answer> {wrong} </answer>",
        "no_think": f"<answer> {gold} </answer>",
        "empty_think": f"{'' if opened else '<think>'}</think> <answer> {gold} </answer>",
        "repeated_answer": f"{think(REASONING)} <answer> {wrong} </answer> <answer> {gold} </answer>",
        "answer_outside_tags": f"{think(REASONING)} The answer is {gold}.",
        "long_padded": f"{think(f'{REASONING}{filler} So the answer is {gold}.')} <answer> {gold} </answer>",
    }


def run_reward_check(rewards: RewardSet, row: dict, prompt: str, template: str, tokenizer=None) -> RewardCheckReport:
    """Score the probes for ``row`` (which needs a gold ``answer``) with ``rewards``. ``prompt`` is the
    rendered prompt, ``template`` its template name; lengths are counted with ``tokenizer`` when given."""
    if row.get("answer") is None:
        raise DataError("reward check: the row has no 'answer' column; the probes need a gold answer")
    gold = str(row["answer"])
    probes = probe_completions(gold, prompt)
    texts = [completion_text(probes[name], template) for name in PROBES]
    if tokenizer is not None:
        lengths = [len(tokenizer(t, add_special_tokens=False, verbose=False)["input_ids"]) for t in texts]
    else:
        lengths = [len(t.split()) for t in texts]
    n = len(texts)
    columns = {k: [v] * n for k, v in row.items()}
    columns.update(prompts=[prompt] * n, completion_lengths=lengths)
    scored = rewards.score(texts, columns)
    honest = scored.total[0]
    results = [ProbeScore(name, text, length, {r: scored.per_reward[r][i] for r in rewards.names}, scored.total[i],
                          flagged=i > 0 and scored.total[i] >= honest - 1e-9)
               for i, (name, text, length) in enumerate(zip(PROBES, texts, lengths))]
    broken = [r for r in rewards.names if scored.failures.get(r, 0)
              and scored.failures[r] == sum(v is not None for v in scored.per_reward[r])]
    return RewardCheckReport(gold, rewards.names, results, dict(scored.errors), broken)


def check_not_broken(report: RewardCheckReport) -> None:
    """A reward that fails on every probe (it raises, returns the wrong shape, ``builtins:len``) would score
    every sample of the run 0: one line before training instead."""
    if report.broken:
        name = report.broken[0]
        raise RewardError(f"reward '{name}' failed on every probe completion ({report.errors[name]}); fix it before "
                          "training, or set rl.reward_check=false to skip this check")


def run_reward_check_cli(cfg) -> RewardCheckReport:
    """The reward check for a run config: its rewards on the first training row with a gold answer,
    rendered with the run's template and tokenizer."""
    from rlkit.models import load_tokenizer

    env = None
    if getattr(cfg, "env", None) is not None:  # its get_reward is a reward: not applicable to probes (no episode)
        from rlkit.env.environments import load_env

        env = load_env(cfg.env)
    rewards = RewardSet(cfg.rewards, env=env)
    row = next((r for r in rl_rows(cfg.data) if r.get("answer") is not None), None)
    if row is None:
        raise DataError(f"{cfg.data.train}: no row has an 'answer' column; the reward check needs a gold answer "
                        "to build its probes")
    tokenizer = load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)
    prompt = render_prompt(row["prompt"], cfg.data.template, tokenizer, env.schemas if env is not None else None)
    return run_reward_check(rewards, row, prompt, cfg.data.template, tokenizer)


def format_table(report: RewardCheckReport) -> Table:
    """One row per probe: each reward's score, the weighted total, and a flag on hacks."""
    table = Table(title=f"reward check (gold answer {report.gold!r})")
    table.add_column("probe")
    table.add_column("tokens", justify="right")
    for name in report.rewards:
        table.add_column(name, justify="right")
    table.add_column("total", justify="right")
    table.add_column("")
    for p in report.probes:
        cells = ["-" if p.scores[r] is None else f"{p.scores[r]:.2f}" for r in report.rewards]
        flag = "[bold red]hack[/]" if p.flagged else ""
        table.add_row(p.name, str(p.length), *cells, f"{p.total:.2f}", flag)
    return table


def summary_line(report: RewardCheckReport) -> str:
    """One line for the log.

    >>> p = lambda name, total, flagged=False: ProbeScore(name, "", 1, {}, total, flagged)
    >>> summary_line(RewardCheckReport("7", [], [p("honest", 1.2), p("wrong", 0.2), p("no_think", 1.2, True)], {}))
    'reward check: honest 1.20, wrong 0.20; 1 hack scores as high as honest: no_think (1.20)'
    >>> summary_line(RewardCheckReport("7", [], [p("honest", 1.2), p("wrong", 0.2)], {}))
    'reward check: ok, every hack scores below the honest answer (1.20)'
    """
    honest = report.probe("honest").total
    hacks = report.hacks
    if not hacks:
        return f"reward check: ok, every hack scores below the honest answer ({honest:.2f})"
    wrong = report.probe("wrong").total
    listed = ", ".join(f"{p.name} ({p.total:.2f})" for p in hacks)
    what = "1 hack scores" if len(hacks) == 1 else f"{len(hacks)} hacks score"
    return f"reward check: honest {honest:.2f}, wrong {wrong:.2f}; {what} as high as honest: {listed}"


def check_before_training(rewards: RewardSet, rows: list[dict], template: str, tokenizer) -> None:
    """What an RL run does first (``rl.reward_check``): the probes on the first row with a gold answer; a reward
    that fails on every probe stops the run, and one line says whether a known hack pays as well as honesty."""
    from rlkit.tracking import console

    row = next((r for r in rows if r.get("answer") is not None), None)
    if row is None:
        return
    report = run_reward_check(rewards, row, render_prompt(row["prompt"], template, tokenizer), template, tokenizer)
    check_not_broken(report)
    hint = "; see `rlkit rewards check`, or rl.reward_check=false to skip" if report.hacks else ""
    console.print(f"[{'yellow' if report.hacks else 'green'}]{summary_line(report)}{hint}[/]")

