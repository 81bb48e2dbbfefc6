"""Recipes, rewards and the embedded model still resolve after a non-editable install."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_non_editable_install_resolves_recipes_rewards_and_model(tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(ROOT)], check=True, capture_output=True, timeout=300)
    code = ("import rlkit, rlkit.rewards; from rlkit.recipe import recipes_dir, list_recipes; "
            "from rlkit.embedded import model_dir; from rlkit.rewards import get_reward; "
            "assert str(recipes_dir()).startswith(%r), recipes_dir(); "
            "assert {'sft', 'r1_zero', 'instructgpt', 'r1'} <= set(list_recipes()); "
            "assert (model_dir() / 'model.safetensors').is_file() and str(model_dir()).startswith(%r); "
            "get_reward('accuracy'); get_reward('reward_model'); print('ok')") % (str(target), str(target))
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_every_package_is_listed_for_a_non_editable_install():
    """pyproject.toml lists packages explicitly: a new sub-package left out would be missing from `pip install .`
    (the editable install of the tests would not notice)."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).parent.parent
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(root).parts) for p in (root / "rlkit").rglob("__init__.py")}
    assert found - listed == set(), sorted(found - listed)
