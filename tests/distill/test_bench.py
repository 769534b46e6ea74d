"""mlc bench: the analytic FLOP count on hand-computed cases and a 2-step run on a tiny model in this process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlc.distill.bench import encoder_flops, parse_variants, step_flops, Variant
from mlc.errors import MlcError
from mlc.models.arch import Shape

ROOT = Path(__file__).resolve().parents[2]


def _bench_tiny(tmp_path, step1: dict, variants: str, *extra: str, timeout: int = 300, teacher_cache=None,
                loader=None):
    """``mlc bench`` through the CLI on the tiny world with step-1 settings ``step1``; returns (rows, stdout)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from distill_helpers import build_tiny_world, recipe_dict, write_recipe

    world = build_tiny_world(tmp_path / "w")
    data = recipe_dict(world, tmp_path / "run")
    data["distill"]["step1"].update(step1)
    if teacher_cache is not None:
        data["distill"]["teacher_cache"] = teacher_cache
    if loader is not None:
        data["loader"].update(loader)
    recipe = write_recipe(tmp_path / "r.yaml", data)
    out = tmp_path / "bench.json"
    from mlc.distill.commands import free_port, remove_shm_buffers

    port = free_port()
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", MASTER_PORT=str(port))
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "-m", "mlc.cli", "bench", str(recipe), "--steps", "2", "--warmup", "1",
                           "--variants", variants, "--teacher", str(world["teacher"]),
                           "--student", str(world["student"]), "--shards", str(world["shards"]),
                           "--json", str(out), *extra],
                          env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert remove_shm_buffers(port) == []  # mlc bench removed DeepSpeed's /dev/shm file of its one-rank group
    return json.loads(out.read_text())["rows"], proc.stdout


def test_encoder_flops_by_hand():
    # H=4, F=8, L=3 positions, 2 layers, 6 tokens: per token 2*(4*16 + 2*32) + 4*3*4 = 256 + 48 = 304
    assert encoder_flops(Shape(layers=2, hidden=4, heads=1, ffn=8, vocab_size=10), tokens=6, seq_len=3) == 2 * 304 * 6


def test_step_flops_by_hand():
    t = Shape(layers=2, hidden=4, heads=1, ffn=8, vocab_size=10)
    s = Shape(layers=1, hidden=2, heads=1, ffn=4, vocab_size=10)
    f = step_flops(t, s, tokens=6, seq_len=3, logit_rows=2, mlm_rows=1, teacher_head=True, student_head=True)
    # teacher: 2*304*6 + head transform 2*16*6 = 3648 + 192
    assert f["teacher"] == 3840
    # student per token: 2*(4*4 + 2*8) + 4*3*2 = 88; x6 tokens + head transform 2*4*6 = 528 + 48
    assert f["student_forward"] == 576 and f["student_backward"] == 1152
    # student vocabulary projection 2*2*10 per row, x3 (fwd+bwd) over 3 rows; teacher 2*4*10 over 2 rows
    assert f["losses"] == 3 * 40 * 3 + 80 * 2
    assert f["total"] == 3840 + 576 + 1152 + 520
    # no teacher, no head
    g = step_flops(None, s, tokens=6, seq_len=3)
    assert g["teacher"] == 0 and g["losses"] == 0 and g["total"] == 3 * 528


def test_parse_variants():
    assert parse_variants("fused, naive:all,fused:masked:zero3,fused:compiled:zero1,naive:eager") == [
        Variant("fused"), Variant("naive", "all"), Variant("fused", "masked", 3), Variant("fused", None, 1, True),
        Variant("naive", compile=False)]
    assert Variant("fused", None, 1, True).name == "fused zero1 compiled"
    assert parse_variants("fused:cached") == [Variant("fused", cached=True)]
    assert Variant("fused", cached=True).name == "fused cached"
    for bad in ("", "slow", "fused:everywhere", "fused:compile"):
        with pytest.raises(MlcError):
            parse_variants(bad)


def test_bench_two_steps_tiny(tmp_path):
    """Two measured steps of fused and naive losses on the tiny world, through the CLI, in one process."""
    rows, stdout = _bench_tiny(tmp_path, {"deepspeed": "zero0", "student_dropout": 0.0}, "fused,naive:all",
                               "--peak-tflops", "0.5")
    assert [r["variant"] for r in rows] == ["fused", "naive logits@all"]
    for r in rows:
        # batch 4 x grad_accum 2 x 2 steps of 32-token sequences
        assert r["tokens"] == 2 * 2 * 4 * 32 and r["seq_len"] == 32
        assert r["student_dropout"] == 0.0 and r["precision"] in ("fp32", "bf16")
        assert r["tokens_per_s"] > 0 and r["tflops"] > 0
        assert r["mfu"] == pytest.approx(r["tflops"] / 0.5)
        assert r["flops_split"]["teacher"] > 0 and r["flops_split"]["losses"] > 0
        assert sum(r["time_split"].values()) <= 1.0 + 1e-6
        assert all(v >= 0 for v in r["time_split"].values())
        assert r["time_split"]["student_forward"] > 0 and r["time_split"]["backward"] > 0
    # the logit loss on every position computes more vocabulary rows than on the masked ones
    assert rows[1]["flops_split"]["losses"] > rows[0]["flops_split"]["losses"]
    assert "| fused |" in stdout and "| naive logits@all |" in stdout


def test_bench_cached_reads_every_measured_target_and_trains_the_same(tmp_path):
    """The cached variant fills a teacher cache with the measured batches' targets first, then reads all of
    them (the teacher runs on none) and trains what the uncached variant trains."""
    # the recipe's own cache (here: on) is not what the variants use
    # with dropout and a loader worker: the fill pass must not move the training RNG
    rows, stdout = _bench_tiny(tmp_path, {"deepspeed": "zero0", "student_dropout": 0.1}, "fused,fused:cached",
                               teacher_cache={"enabled": True, "dir": str(tmp_path / "recipe-cache")},
                               loader={"workers": 1})
    assert [r["variant"] for r in rows] == ["fused", "fused cached"]
    assert rows[0]["teacher_cache"] is None
    counts = rows[1]["teacher_cache"]
    assert counts["hits"] == (1 + 2) * 2 * 4 and counts["misses"] == 0  # (warm-up + steps) x accum x batch
    assert rows[1]["mean_loss"] == rows[0]["mean_loss"]
    assert "| fused cached |" in stdout
    assert not (tmp_path / "recipe-cache").exists()


def test_bench_of_step_2_trains_the_masked_student(tmp_path):
    """`mlc bench --step 2` sets the step up as the loop does: the pruning masks are computed and applied, so
    the measured student is the pruned one (FFN 32, 2 heads, hidden 16 of the tiny world's 64, 4, 32)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from distill_helpers import build_tiny_world, recipe_dict, write_recipe

    world = build_tiny_world(tmp_path / "w")
    data = recipe_dict(world, tmp_path / "run")
    data["distill"]["step2"]["deepspeed"] = "zero0"
    recipe = write_recipe(tmp_path / "r.yaml", data)
    out = tmp_path / "bench.json"
    from mlc.distill.commands import free_port

    port = free_port()
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", MASTER_PORT=str(port))
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "-m", "mlc.cli", "bench", str(recipe), "--step", "2", "--steps", "1",
                           "--warmup", "0", "--variants", "fused", "--teacher", str(world["teacher"]),
                           "--student", str(world["student"]), "--shards", str(world["shards"]),
                           "--json", str(out)], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    prune = data["prune"]
    assert row["step"] == 2 and row["masks"] is not None
    kept = row["masks"]
    assert set(kept["ffn"]) == {prune["ffn_dim"]} and set(kept["heads"]) == {prune["heads"]}, kept
    assert kept["hidden"] == prune["hidden_size"], kept


def test_compile_refuses_zero3():
    from types import SimpleNamespace

    from mlc.distill.engine import check_compile

    spec = SimpleNamespace(compile=True)
    assert check_compile(spec, {"zero_optimization": {"stage": 2}}, "distill.step1") is True
    assert check_compile(SimpleNamespace(compile=False), {"zero_optimization": {"stage": 3}}, "x") is False
    with pytest.raises(MlcError) as e:
        check_compile(spec, {"zero_optimization": {"stage": 3}}, "distill.step2")
    assert "distill.step2.compile" in str(e.value)


@pytest.mark.slow
def test_bench_compiled_matches_eager(tmp_path):
    """torch.compile of the encoder layers (teacher and student) trains the same numbers as eager mode."""
    rows, _ = _bench_tiny(tmp_path, {"deepspeed": "zero1", "student_dropout": 0.0, "precision": "fp32"},
                          "fused:eager,fused:compiled", timeout=900)
    eager, compiled = rows
    assert (eager["compiled"], compiled["compiled"]) == (False, True)
    assert eager["zero_stage"] == compiled["zero_stage"] == 1
    # same batches, same initial weights, no dropout: the losses of the measured steps agree
    assert compiled["mean_loss"] == pytest.approx(eager["mean_loss"], rel=1e-3)
