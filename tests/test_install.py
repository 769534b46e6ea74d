"""A plain (non-editable) `pip install .` into a fresh virtual environment runs `mlc distill`: the launcher,
the DeepSpeed configs and the kernels are reached inside the installed package, not through the checkout."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from distill_helpers import build_tiny_world, recipe_dict, write_recipe

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_non_editable_install_runs_a_tiny_distillation(tmp_path):
    # the project copied without its build outputs, so nothing of the checkout can be picked up by accident
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "build", "*.egg-info",
                                                             "__pycache__", ".pytest_cache"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    # the dependencies come from this environment (installing torch and deepspeed again would take minutes);
    # a .pth file adds its site-packages after the new environment's own, so the new mlc is the one imported
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "deps-of-the-test-environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # the wheel a plain `pip install .` builds (built here, with this environment's setuptools, offline)
    pip_env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(src),
                    "-w", str(tmp_path / "dist")], check=True, env=pip_env, timeout=600, cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("mlc-*.whl")
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True, env=pip_env,
                   timeout=600)
    shutil.rmtree(src)  # the installed mlc must not need the checkout

    # a user's environment: no PYTHONPATH pointing at a checkout
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "WORLD_SIZE")}
    where = subprocess.run([str(py), "-c", "import mlc, mlc.kernels, mlc.launcher.distill as d; "
                            "from mlc.recipe import DEEPSPEED_DIR; print(mlc.__file__); print(mlc.kernels.__file__); "
                            "print(d.__file__); print(DEEPSPEED_DIR / 'zero2.json')"],
                           check=True, capture_output=True, text=True, cwd=tmp_path, env=clean).stdout.split()
    for path in where:
        assert path.startswith(str(site)), where
        assert Path(path).is_file(), path

    world = build_tiny_world(tmp_path / "w")
    data = recipe_dict(world, tmp_path / "run", stage1="zero2")
    data["distill"]["step1"].update(steps=2, checkpoint_every=2)
    recipe = write_recipe(tmp_path / "r.yaml", data)
    env = dict(clean)
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PATH=f"{venv / 'bin'}:{env.get('PATH', '')}")
    proc = subprocess.run([str(venv / "bin" / "mlc"), "distill", str(recipe), "--step", "1", "--num-gpus", "1",
                           "--teacher", str(world["teacher"]), "--student", str(world["student"]),
                           "--shards", str(world["shards"])],
                          env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "step1" / "model.safetensors").is_file()
