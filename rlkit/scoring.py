"""Apply a recipe's rewards to samples: weights, per-reward metrics, failures that never crash a run.

Each reward is called once per batch with the completions and every dataset column. A reward that
raises is retried sample by sample; a sample that still raises, or for which the reward returns something
other than a finite number (the built-in math check returns NaN on a timeout), scores 0 and is counted in
``reward/<name>/failures``. Any numeric type counts as a number: Python and numpy scalars, 0-d arrays and
one-element tensors, bools, ``Decimal``; a whole batch may come back as a list, a numpy array or a 1-d
tensor. ``None`` means "not applicable" (the weighted sum skips it; the metric averages the rest).

Each call runs under the reward's ``timeout`` (seconds, per reward per batch: the batch call and any
per-sample retries together), in a fresh daemon thread, so it works whichever thread calls ``score``.
A call that runs longer is abandoned (its thread is left to finish or hang on its own) and every sample
it had not scored yet fails with "timed out after T s": a reward that hangs costs at most ``timeout`` per
batch. A thread cannot interrupt C code that holds the GIL (a runaway ``re`` match); such a reward should
bound its own time. A reward marked ``fn.self_timed = True`` already does (the math check: SIGALRM on the
main thread, a process pool off it) and is called on the calling thread, without the time limit.

A reward gets copies of the completions, the columns and its params, so a plug-in that edits them (appends
to a prompt's messages) cannot change the data later steps read; a reward that raises ``SystemExit`` (calls
``sys.exit()``) fails its samples like any other exception instead of ending the run.

The first failure of each reward is printed once, with the sample and the error, and kept in
``RewardSet.first_errors``; each batch's first failure per reward is in ``ScoredBatch.errors``. A reward
that fails on every sample of a batch is reported loudly, so a run never goes on silently scoring zeros.
A reward with ``routes`` applies only to samples whose ``route`` column is one of them (others: None).

A reward function may carry attributes: ``prepare(**params)``, called once when the set is built, so that
bad parameters (a reward model path that does not exist) fail before training starts; ``requires``, the
columns every applicable row must have, and ``check_row(row) -> str | None``, which says what is wrong
with a row; ``RewardSet.check_rows`` runs both over a data set before training starts.
"""

from __future__ import annotations

import copy
import math
import threading
from dataclasses import dataclass, field

from rlkit.data import DataError
from rlkit.errors import RlkitError
from rlkit.rewards import REWARDS, RewardError, get_reward
from rlkit.tracking import console


@dataclass
class ScoredBatch:
    total: list[float]                          # weighted sum per sample
    per_reward: dict[str, list[float | None]]   # raw score per reward and sample (None: not applicable)
    failures: dict[str, int] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # first failure per reward: "sample 3: ValueError: ..."

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {"reward": _mean(self.total)}
        for name, vals in self.per_reward.items():
            applicable = [v for v in vals if v is not None]
            if applicable:
                out[f"reward/{name}"] = _mean(applicable)
            out[f"reward/{name}/failures"] = float(self.failures.get(name, 0))
        return out


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def score_groups(rewards: "RewardSet", rows: list[dict], prompts: list[str], groups: list[list]) -> ScoredBatch:
    """Score ``groups[i]`` (the samples of prompt i) with every dataset column of ``rows[i]``, plus the
    rendered ``prompts`` and the ``completion_lengths`` in tokens, repeated per sample."""
    flat = [s for g in groups for s in g]
    keys = {k for r in rows for k in r}
    cols = {k: [r.get(k) for r, g in zip(rows, groups) for _ in g] for k in keys}
    cols["prompts"] = [p for p, g in zip(prompts, groups) for _ in g]
    # the model's tokens (a multi-turn episode's tool and environment tokens are not its length)
    cols["completion_lengths"] = [len(s.token_ids) if s.mask is None else sum(s.mask) for s in flat]
    if any(s.episode is not None for s in flat):  # multi-turn: TRL's environments, and the turns after the prompt
        cols["environments"] = [getattr(s.episode, "env", None) for s in flat]
        cols["completion_messages"] = [getattr(s.episode, "messages", None) for s in flat]
    return rewards.score([s.text for s in flat], cols)


# columns passed as they are: the episodes' environment instances (TRL passes them to rewards; get_reward reads
# their state, and an instance may hold what cannot be copied: a connection, a lock)
_UNCOPIED = ("environments",)


def _copied(columns: dict) -> dict:
    return {k: (v if k in _UNCOPIED else copy.deepcopy(v)) for k, v in columns.items()}


def as_score(v) -> float | None:
    """A reward's value for one sample as a float (None stays None: not applicable); ValueError for
    anything that is not one finite real number.

    >>> import numpy as np, torch
    >>> [as_score(v) for v in (1, True, np.float32(0.5), np.array(0.25), torch.tensor([2.0]), None)]
    [1.0, 1.0, 0.5, 0.25, 2.0, None]
    >>> as_score("1.0")
    Traceback (most recent call last):
    ValueError: returned '1.0' (str), expected a finite number or None
    """
    if v is None:
        return None
    x = v
    if callable(getattr(x, "item", None)) and not isinstance(x, (str, bytes)):  # numpy scalar/array, torch tensor
        size = x.numel() if callable(getattr(x, "numel", None)) else getattr(x, "size", 1)
        if size != 1:
            raise ValueError(f"returned an array of {size} values for one sample, expected a number or None")
        x = x.item()
    if isinstance(x, (str, bytes, complex)) or not hasattr(x, "__float__"):
        raise ValueError(f"returned {_short(v)} ({type(v).__name__}), expected a finite number or None")
    try:
        f = float(x)
    except (TypeError, ValueError, OverflowError) as e:
        raise ValueError(f"returned {_short(v)} ({type(v).__name__}), which is not a float ({e})") from None
    if not math.isfinite(f):
        raise ValueError(f"returned {f}, expected a finite number or None")
    return f


def _as_list(raw, n: int) -> list:
    if isinstance(raw, (str, bytes, dict)) or not hasattr(raw, "__iter__") or getattr(raw, "ndim", 1) != 1:
        raise TypeError(f"returned {_short(raw)} ({type(raw).__name__}), expected a list of {n} scores")
    return list(raw)


def _short(x, limit: int = 60) -> str:
    text = repr(x)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe(e: BaseException) -> str:
    if isinstance(e, SystemExit):
        return f"SystemExit: the reward called sys.exit({e.code!r})"
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


_PENDING = object()  # no result yet: the call timed out before it reached this sample

# What score_groups passes besides the dataset's own columns, and the columns rlkit's rows always have.
COLUMNS = ("prompts", "prompt", "answer", "metadata", "completion_lengths", "route", "environments",
           "completion_messages")


def check_params(key: str, fn, params: dict) -> None:
    """A reward's ``params`` against its signature, before training: a typo (``mdoe: any``) is an error, not a
    parameter silently swallowed by ``**_`` (rlkit's own rewards) or a TypeError on every sample (a plug-in
    with no ``**kwargs``); a parameter named like a column would collide with the column."""
    import difflib
    import inspect

    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin or C callable: nothing to check against
        return
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    named = [n for n, p in list(sig.parameters.items())[1:] if p.kind in kinds]  # after completions
    open_ended = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    own = getattr(fn, "__module__", "").startswith("rlkit.")  # their **_ takes the columns, never parameters
    # the columns it declares it needs (``fn.requires``: a code reward's tests) are data, not parameters
    takes = [n for n in named if n not in COLUMNS and n not in getattr(fn, "requires", ())]
    required = [n for n in takes if sig.parameters[n].default is inspect.Parameter.empty]
    missing = [n for n in required if n not in params]
    if missing and own:  # a plug-in's required argument may be one of its data's columns
        raise RewardError(f"reward '{key}': needs params.{missing[0]} (e.g. params: {{{missing[0]}: ...}})")
    for name in params:
        if name in COLUMNS:
            raise RewardError(f"reward '{key}': params.{name} is a data column the reward is given, not a parameter; "
                              "remove it")
        if name not in named and (own or not open_ended):
            guess = difflib.get_close_matches(name, takes, n=1)
            hint = f"did you mean '{guess[0]}'? " if guess else ""
            raise RewardError(f"reward '{key}': unknown parameter '{name}'; {hint}it takes "
                              f"{', '.join(takes) or 'no parameters'}")


class RewardSet:
    """The rewards a recipe lists: ``[{name, weight, params, routes, timeout}]``, built and checked up front."""

    def __init__(self, specs: list, warn_all_failed: bool = True, env=None):
        """``env``: the run's environment source (rlkit.env.environments.EnvSource); an environment with
        ``get_reward`` is a reward of weight 1 named after its class (TRL's convention)."""
        env_scores = env is not None and env.has_reward
        if not specs and not env_scores:
            raise RewardError("no rewards configured; list at least one under 'rewards:'" if env is None else
                              f"no rewards configured, and {env.name or 'the environment'} has no get_reward(); list "
                              "at least one under 'rewards:'")
        self.specs = list(specs)
        self.fns = {}
        self.plugin: dict[str, bool] = {}
        for s in specs:
            key = s.alias or s.name
            if key in self.fns:
                raise RewardError(f"reward '{key}' is listed twice; give one an 'alias'")
            self.fns[key] = get_reward(s.name)
            self.plugin[key] = s.name not in REWARDS  # a dotted path or entry point, maybe written for TRL
            check_params(key, self.fns[key], dict(s.params))
            prepare = getattr(self.fns[key], "prepare", None)
            if prepare is not None:  # e.g. load a reward model now: a bad path fails before training starts
                try:
                    prepare(**dict(s.params))
                except RlkitError:
                    raise
                except (Exception, SystemExit) as e:  # a plug-in's own check, or a parameter it needs and lacks
                    raise RewardError(f"reward '{key}': its params were refused ({_describe(e)})") from None
        if env_scores:
            from rlkit.config.parts import RewardSpec
            from rlkit.env.environments import env_reward

            if env.name in self.fns:
                raise RewardError(f"reward '{env.name}' is listed and is also the environment's get_reward; give the "
                                  "listed one an 'alias'")
            self.specs.append(RewardSpec(name=env.name))
            self.fns[env.name], self.plugin[env.name] = env_reward, False
        self.warn_all_failed = warn_all_failed
        self.first_errors: dict[str, str] = {}  # reward -> its first failure, "sample 3: ValueError: ..."

    @property
    def names(self) -> list[str]:
        return list(self.fns)

    def check_rows(self, rows: list[dict], spec: str) -> None:
        """Raise a DataError naming the first row (1-based) that a reward cannot score: a column in the
        reward's ``requires`` is missing, or its ``check_row`` finds the row bad (an unparseable gold answer).
        ``spec`` names the data set in the message. Only rows of a reward's ``routes`` are checked for it."""
        for s in self.specs:
            key = s.alias or s.name
            fn = self.fns[key]
            requires, check = tuple(getattr(fn, "requires", ())), getattr(fn, "check_row", None)
            if not requires and check is None:
                continue
            for i, row in enumerate(rows, 1):
                if s.routes is not None and row.get("route") not in s.routes:
                    continue
                where = f" (route '{row['route']}')" if row.get("route") is not None else ""
                missing = [c for c in requires if row.get(c) is None]
                if missing:
                    raise DataError(f"{spec}: row {i}{where} has no '{missing[0]}' column, which reward '{key}' needs")
                problem = check(row) if check is not None else None
                if problem:
                    raise DataError(f"{spec}: row {i}{where}: {problem} (reward '{key}')")

    def check_routes(self, rows: list[dict]) -> None:
        """Each route a reward lists must be some row's (a typo would apply the reward to nothing)."""
        found = sorted({str(r["route"]) for r in rows if r.get("route") is not None})
        for s in self.specs:
            for route in s.routes or []:
                if route not in found:
                    raise RewardError(f"reward '{s.alias or s.name}': routes: no row has route '{route}'; the data's "
                                      f"routes are {', '.join(found) or 'none (set data.route or data.mix[].route)'}")

    def score(self, completions: list[str], columns: dict[str, list]) -> ScoredBatch:
        n = len(completions)
        per: dict[str, list[float | None]] = {}
        failures: dict[str, int] = {}
        errors: dict[str, str] = {}
        total = [0.0] * n
        routes = columns.get("route")
        # TRL's convention on conversational data (prompts that are message lists): a reward gets each completion
        # as [{"role": "assistant", "content": text}] and ``prompts`` as the prompt messages. rlkit's own rewards
        # read text; plug-ins get what TRL would give them, so TRL-style reward functions work unchanged.
        prompt_col = columns.get("prompt") or [None]
        conversational = isinstance(prompt_col[0], list)
        for spec in self.specs:
            key = spec.alias or spec.name
            if spec.routes is None:
                idx = list(range(n))
            else:
                idx = [i for i in range(n) if routes is not None and routes[i] in spec.routes]
            vals: list[float | None] = [None] * n
            errs: list[str | None] = [None] * n
            if idx:
                sub_cols = {k: [v[i] for i in idx] for k, v in columns.items()}
                sub_comps: list = [completions[i] for i in idx]
                if conversational and self.plugin[key]:
                    sub_comps = [[{"role": "assistant", "content": c}] for c in sub_comps]
                    sub_cols["prompts"] = sub_cols["prompt"]
                sub_vals, sub_errs = self._call(key, self.fns[key], sub_comps, sub_cols, dict(spec.params),
                                                spec.timeout)
                for i, v, e in zip(idx, sub_vals, sub_errs):
                    vals[i], errs[i] = v, e
            per[key] = vals
            failures[key] = failed = sum(e is not None for e in errs)
            if failed:
                first = next(i for i, e in enumerate(errs) if e is not None)
                errors[key] = f"sample {first + 1}: {errs[first]}"
                self._report_first(key, errors[key])
            if failed and failed == sum(v is not None for v in vals) and self.warn_all_failed:
                console.print(f"[bold red]reward '{key}' failed on all {n} samples of this batch; they score 0[/]",
                              soft_wrap=True)
            for i, v in enumerate(vals):
                if v is not None:
                    total[i] += spec.weight * v
        return ScoredBatch(total, per, failures, errors)

    def _report_first(self, key: str, error: str) -> None:
        if key in self.first_errors:
            return
        self.first_errors[key] = error
        console.print(f"reward '{key}' failed on {error} (further failures are counted in reward/{key}/failures)",
                      style="yellow", markup=False, highlight=False, soft_wrap=True)

    @staticmethod
    def _call(key, fn, completions, columns, params, timeout) -> tuple[list[float | None], list[str | None]]:
        """Scores and, per sample, the failure (None: none). A reward that returns the wrong number of
        scores breaks its contract: RewardError, raised here."""
        n = len(completions)
        results: list = [_PENDING] * n
        errors: list[str | None] = [None] * n
        raised: list[BaseException] = []

        def settle(i, v):
            try:
                results[i] = as_score(v)
            except ValueError as e:
                errors[i], results[i] = str(e), 0.0

        # What a reward may raise and still only fail its samples: any Exception, and SystemExit (a plug-in
        # that calls sys.exit() must not end the run with exit code 0 and nothing saved). On a reward thread
        # a KeyboardInterrupt can only come from the reward (signals reach the main thread); on the main thread
        # (a self-timed reward) it is the user's Ctrl-C and stops the run.
        self_timed = getattr(fn, "self_timed", False)
        caught = (Exception, SystemExit) if self_timed else (Exception, SystemExit, KeyboardInterrupt)

        def call(comps, cols):
            """The reward on copies: a plug-in that edits its arguments (appends to a prompt's messages, say)
            must not change the data set that later steps read."""
            return fn(copy.deepcopy(comps), **_copied(cols), **copy.deepcopy(params))

        # the batch's copies are made here, outside the reward's time limit (large columns take a while)
        batch_args = (copy.deepcopy(completions), _copied(columns), copy.deepcopy(params))

        def work():
            try:
                try:
                    comps, cols, kw = batch_args
                    raw = _as_list(fn(comps, **cols, **kw), n)
                except RewardError:
                    raise
                except caught:
                    raw = None
                if raw is not None:
                    if len(raw) != n:
                        raise RewardError(f"reward '{key}' returned {len(raw)} scores for {n} completions")
                    for i, v in enumerate(raw):
                        settle(i, v)
                    return
                for i in range(n):  # the batch raised: retry one by one, so one bad sample fails alone
                    try:
                        one = _as_list(call([completions[i]], {k: [v[i]] for k, v in columns.items()}), 1)
                        if len(one) != 1:
                            raise RewardError(f"reward '{key}' returned {len(one)} scores for 1 completion")
                        settle(i, one[0])
                    except RewardError:
                        raise
                    except caught as e:
                        errors[i], results[i] = _describe(e), 0.0
            except BaseException as e:  # noqa: BLE001 - handed to the calling thread
                raised.append(e)

        if self_timed:
            work()
        else:
            worker = threading.Thread(target=work, name=f"reward {key}", daemon=True)
            worker.start()
            worker.join(timeout)
            if worker.is_alive():  # abandoned: whatever it writes from now on is not read
                results, errors = list(results), list(errors)
                for i in range(n):
                    if results[i] is _PENDING:
                        errors[i], results[i] = f"timed out after {timeout:g} s", 0.0
                return results, errors
        if raised:
            raise raised[0]
        return results, errors
