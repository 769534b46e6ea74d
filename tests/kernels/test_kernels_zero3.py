"""ZeRO-3 on 2 CPU ranks (gloo): kernels.gathered lets the fused logit loss read a partitioned LM head."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.distributed
def test_fused_logit_loss_under_zero3_matches_single_process(tmp_path):
    out = tmp_path / "result.json"
    env = dict(os.environ, DS_ACCELERATOR="cpu", MLC_KERNELS="torch",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    cmd = ["timeout", "400", sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
           "--master_port", str(_free_port()), str(ROOT / "tests" / "kernels_zero3_worker.py"), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=450)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    result = json.loads(out.read_text())
    assert result["partitioned_outside"] and result["whole_inside"]
    assert "kernels.gathered" in result["ungathered_error"]
    errors = result["max_abs_error"]
    for name in ("body.weight", "body.bias", "head.weight", "head.bias"):
        assert errors[name + "_moved"] > 1e-4, name  # the step changed the parameter
        assert errors[name] < 1e-6, (name, errors[name])
