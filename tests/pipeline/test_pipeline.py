"""`mlc compress`: stage order, skipping complete stages, reruns after a change or with --from, and a whole
tiny run through distillation to the report."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mlc.pipeline.run import plan, run_pipeline
from mlc.pipeline.stage import MARKER
from mlc.recipe import load_recipe

SENTENCES = [f"Habari ya siku ya {i}, wanafunzi wengi wamefika shuleni mapema leo asubuhi." for i in range(60)] + \
    ["Rais amesema serikali itaendelea kuchukua hatua za kulinda afya ya wananchi wote."] * 3


def tiny_recipe(tmp_path: Path, teacher: Path, data_dir: Path, **changes) -> Path:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    step = {"steps": 2, "batch_size": 2, "lr": 1e-3, "deepspeed": "zero2", "precision": "fp32",
            "checkpoint_every": 1, "log_every": 1,
            "losses": {"hidden_mse": {"weight": 1.0}, "attention": {"weight": 1.0}}}
    recipe = {
        "name": "tiny", "language": "swa", "seed": 1, "output_dir": str(tmp_path / "run"),
        "teacher": {"source": str(teacher)},
        "corpus": {"sources": [{"kind": "text", "path": str(corpus)}]},
        "vocab": {"enabled": True},
        "shards": {"seq_len": 32, "sequences_per_sample": 4, "samples_per_shard": 2},
        "student": {"layers": "every_other"},
        "prune": {"enabled": True, "importance": "magnitude", "ffn_dim": 32, "heads": 2, "hidden_size": 16},
        "distill": {"step1": step, "step2": {**step, "teacher": "step1"}},
        "evaluate": {"data_dir": str(data_dir / "swa"), "tasks": ["topic"], "models": ["teacher", "final"],
                     "max_length": 32, "c_grid": [0.1, 1.0], "max_train_examples": 16, "max_eval_examples": 16},
    }
    recipe.update(changes)  # whole sections
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture
def teacher(tmp_path, tiny_xlmr_dir):
    folder = tmp_path / "teacher"
    shutil.copytree(tiny_xlmr_dir, folder)
    return folder


def test_stage_order_and_optional_stages(tmp_path, teacher, data_dir):
    r = load_recipe(tiny_recipe(tmp_path, teacher, data_dir))
    names = [s.name for s, _, _ in plan(r)]
    assert names == ["teacher", "corpus", "vocab", "shards", "student", "step1", "step2", "evaluate"]
    r = load_recipe(tiny_recipe(tmp_path, teacher, data_dir, vocab={"enabled": False}))
    assert "vocab" not in [s.name for s, _, _ in plan(r)]


def test_caching_changes_and_from(tmp_path, teacher, data_dir):
    path = tiny_recipe(tmp_path, teacher, data_dir)
    r = load_recipe(path)
    quiet = lambda *a: None  # noqa: E731
    assert run_pipeline(r, path, stop="shards", log=quiet) == ["teacher", "corpus", "vocab", "shards"]
    for name in ("corpus", "teacher-trimmed", "shards"):
        assert (r.out / name / MARKER).is_file()
    manifest = json.loads((r.out / "shards" / "manifest.json").read_text())
    assert manifest["sentences"] == 61  # 63 lines, two duplicates

    # nothing changed: nothing runs
    assert run_pipeline(r, path, stop="shards", log=quiet) == []
    # a shard setting changed: only the shards are redone
    path = tiny_recipe(tmp_path, teacher, data_dir, shards={"seq_len": 48, "sequences_per_sample": 4,
                                                            "samples_per_shard": 2})
    r = load_recipe(path)
    assert run_pipeline(r, path, stop="shards", log=quiet) == ["shards"]
    assert json.loads((r.out / "shards" / "manifest.json").read_text())["seq_len"] == 48
    # a corpus change invalidates everything downstream of it, not the teacher
    path = tiny_recipe(tmp_path, teacher, data_dir, corpus={"sources": r.corpus.model_dump()["sources"],
                                                            "min_chars": 20})
    r = load_recipe(path)
    assert run_pipeline(r, path, stop="shards", log=quiet) == ["corpus", "vocab", "shards"]
    # --from forces a rerun from that stage on
    assert run_pipeline(r, path, start="vocab", stop="shards", log=quiet) == ["vocab", "shards"]


def test_unknown_stage_is_an_error(tmp_path, teacher, data_dir):
    path = tiny_recipe(tmp_path, teacher, data_dir)
    proc = subprocess.run([sys.executable, "-m", "mlc.cli", "compress", str(path), "--from", "adapt"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "--from: unknown or disabled stage 'adapt'" in proc.stderr


@pytest.mark.slow
@pytest.mark.distributed
def test_whole_tiny_run_to_the_report(tmp_path, teacher, data_dir):
    path = tiny_recipe(tmp_path, teacher, data_dir)
    proc = subprocess.run([sys.executable, "-m", "mlc.cli", "compress", str(path)], capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "run"
    results = json.loads((run / "report" / "results.json").read_text())
    assert set(results["models"]) == {"teacher", "final"}
    report = (run / "report" / "report.md").read_text()
    assert "topic" in report and "nan" not in report.lower()
    assert (run / "report" / "plots").is_dir()
    # every exported folder has a Hub card that huggingface_hub reads, with no local path in it
    from huggingface_hub import ModelCard

    for folder in ("student-init", "step1", "step2", "final"):
        text = (run / folder / "README.md").read_text()
        assert str(tmp_path) not in text, folder
        assert ModelCard.load(run / folder / "README.md").data.language == ["swa"], folder
    final_card = ModelCard.load(run / "final" / "README.md").data
    assert final_card.eval_results and final_card.eval_results[0].metric_value == pytest.approx(
        results["models"]["final"]["tasks"][final_card.eval_results[0].task_name.lower()]["metrics"][
            final_card.eval_results[0].metric_type]["test_mean"], abs=1e-4)
    # the final model is a plain HF folder of the pruned shape
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(run / "final"))
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size, cfg.num_hidden_layers) == (16, 2, 32, 2)
    # everything is complete now: a second call runs nothing
    again = subprocess.run([sys.executable, "-m", "mlc.cli", "compress", str(path)], capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0 and "(0 stage(s) run)" in again.stdout


def test_speed_only_keys_leave_fingerprints_alone(tmp_path, teacher, data_dir):
    """compile and teacher_side_stream change how fast a step runs, not what it writes: switching them does
    not redo finished stages, while a training setting does."""
    def fingerprints(path):
        return {s.name: fp for s, fp, _ in plan(load_recipe(path))}

    base = load_recipe(tiny_recipe(tmp_path, teacher, data_dir))
    step = base.distill.step1.model_dump(mode="json", exclude_none=True)
    step2 = base.distill.step2.model_dump(mode="json", exclude_none=True)
    before = fingerprints(tiny_recipe(tmp_path, teacher, data_dir))
    fast = fingerprints(tiny_recipe(tmp_path, teacher, data_dir, distill={
        "step1": {**step, "compile": True, "teacher_side_stream": True}, "step2": {**step2, "compile": True}}))
    assert fast == before
    other = fingerprints(tiny_recipe(tmp_path, teacher, data_dir, distill={
        "step1": {**step, "lr": 5e-4}, "step2": step2}))
    assert other["step1"] != before["step1"] and other["step2"] != before["step2"]  # step 2 reads step 1
    assert other["shards"] == before["shards"]
