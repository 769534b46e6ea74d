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


def test_evaluate_writes_a_report_and_mlc_report_joins_evaluations(tiny_bert_dir, tiny_xlmr_dir, tmp_path, capsys):
    """Models evaluated by hand get a report (shares of the first model's scores, the baselines); `mlc report`
    writes one for any set of evaluated models, and refuses what it cannot compare."""
    recipe = str(_recipe(tmp_path))
    assert main(["evaluate", recipe, "--model", f"big={tiny_bert_dir}", "--model", f"small={tiny_xlmr_dir}",
                 "--tasks", "topic", "--quiet", "--no-speed"]) == 0
    eval_dir = tmp_path / "run" / "eval"
    report = (eval_dir / "report" / "report.md").read_text()
    assert "| big |" in report and "| small |" in report and "bag of words" in report
    assert "shares of big's scores" in capsys.readouterr().out
    assert main(["report", str(eval_dir), "--out", str(tmp_path / "joined"), "--teacher", "small"]) == 0
    joined = (tmp_path / "joined" / "report.md").read_text()
    assert "| big |" in joined and "| small |" in joined and "baseline: majority class" in joined
    assert joined.index("| small |") < joined.index("| big |")  # the teacher's row first
    summary = json.loads((tmp_path / "joined" / "results.json").read_text())
    assert summary["summary"]["teacher"] == "small"
    capsys.readouterr()
    assert main(["report", str(tmp_path / "nothing-here"), "--out", str(tmp_path / "r2")]) == 2
    assert "folder not found" in capsys.readouterr().err
    assert main(["report", str(eval_dir), "--out", str(tmp_path / "r3"), "--teacher", "nobody"]) == 2
    assert "'nobody' is not one of the models" in capsys.readouterr().err
