"""scripts/bench_kernels.py runs each fused loss against the naive one and writes a markdown table."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_writes_table_with_both_implementations(tmp_path):
    out = tmp_path / "bench.md"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_kernels.py"), "--tokens", "128", "--vocab", "1000",
           "--hidden", "24", "--layers", "2", "--repeats", "1", "--rounds", "1", "--cases", "logit", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = out.read_text()
    assert "No GPU was available" in text
    for name in ("linear logit distill (kl, T=2): 128 tokens, vocabulary 1,000, hidden 24",):
        rows = [line for line in text.splitlines() if line.startswith(f"| {name}")]
        assert [r.split(" | ")[1] for r in rows] == ["naive (1 of 1 runs)", "torch (1 of 1 runs)"], rows
        assert "failed" not in " ".join(rows)
    # both implementations computed the same loss value (last column)
    logit = [line for line in text.splitlines() if line.startswith("| linear logit")]
    a, b = (float(r.strip(" |").split(" | ")[-1]) for r in logit)
    assert abs(a - b) <= 1e-4 * abs(a)
    assert "- logit: fused uses" in text
