"""`mlc evaluate` end to end on a tiny model, and its input errors (exit status 2)."""
from __future__ import annotations

import json

import pytest
import yaml

from mlc.cli import main
from mlc.paths import PROJECT_ROOT


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _recipe(tmp_path, evaluate=True):
    data = yaml.safe_load((PROJECT_ROOT / "configs" / "recipes" / "demo.yaml").read_text())
    data["output_dir"] = str(tmp_path / "run")
    if evaluate:
        data["evaluate"].update(tasks=["topic", "pos"], max_train_examples=8, max_eval_examples=8, max_length=48,
                                c_grid=[0.1, 1.0])
    else:
        del data["evaluate"]
        data["corpus"]["sources"] = [s for s in data["corpus"]["sources"] if s["kind"] != "task_train"]
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_evaluate_command_writes_results(tiny_bert_dir, tmp_path, capsys):
    rc = main(["evaluate", str(_recipe(tmp_path)), "--model", f"tiny={tiny_bert_dir}", "--tasks", "topic",
               "--quiet"])
    assert rc == 0
    r = json.loads((tmp_path / "run" / "eval" / "tiny" / "results.json").read_text())
    assert list(r["tasks"]) == ["topic"] and r["complete"]
    assert r["protocol"]["max_train_examples"] == 8 and r["protocol"]["mode"] == "probe"
    b = json.loads((tmp_path / "run" / "eval" / "baselines" / "results.json").read_text())
    assert list(b["tasks"]) == ["topic"]
    out = capsys.readouterr().out
    assert "topic" in out and "test" in out and "sentences/s" in out and "bag of words" in out


def test_evaluate_command_input_errors(tiny_bert_dir, tmp_path, capsys):
    assert main(["evaluate", str(_recipe(tmp_path, evaluate=False)), "--model", str(tiny_bert_dir)]) == 2
    assert "no 'evaluate' section" in capsys.readouterr().err
    assert main(["evaluate", str(_recipe(tmp_path)), "--model", str(tmp_path / "missing")]) == 2
    assert "config.json" in capsys.readouterr().err
    assert not (tmp_path / "run" / "eval").exists()
