"""The report (report.md, results.json, plots) and the model card, from hand-made and tiny real results."""
from __future__ import annotations

import json
import re

import pytest

from mlc.errors import MlcError
from mlc.evaluate import report


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models on a busy 2-core machine run faster on one thread than fighting over two."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _fake(total, emb, disk, b1, b32, scores, protocol=None):
    primary = {"topic": "accuracy", "sentiment": "macro_f1", "ner": "entity_f1", "pos": "accuracy"}
    tasks = {}
    for task, (test, std) in scores.items():
        tasks[task] = {"primary": primary[task],
                       "metrics": {primary[task]: {"dev_mean": test + 0.01, "dev_std": std,
                                                   "test_mean": test, "test_std": std}},
                       "runs": [{"seed": 1}, {"seed": 2}, {"seed": 3}],
                       "examples": {"train": {"used": 10, "total": 20}, "dev": {"used": 5, "total": 5},
                                    "test": {"used": 5, "total": 5}}}
    return {"model_dir": f"/models/{total}", "protocol": protocol or {"mode": "full", "epochs": 10, "lr": 1e-4,
                                                                    "head_lr": None, "batch_size": 32,
                                                                    "max_length": 128, "warmup": 0.1,
                                                                    "weight_decay": 0.01, "seeds": [1, 2, 3],
                                                                    "max_train_examples": 10,
                                                                    "max_eval_examples": None, "subset_seed": 0,
                                                                    "data_dir": "/data/swa"},
            "model": {"model_type": "bert", "layers": 12, "hidden": 384, "heads": 12, "ffn": 1536,
                      "vocab_size": 250037,
                      "parameters": {"total": total, "embeddings": emb, "rest": total - emb},
                      "disk_bytes": disk, "weights_bytes": disk - 100,
                      "speed": {"batch_1": b1, "batch_32": b32, "threads": 2, "sentences_batch_1": 32,
                                "sentences_batch_32": 128, "sentences_from": "topic/dev"}},
            "tasks": tasks}


def _results():
    return {
        "teacher": _fake(117_500_000, 96_200_000, 470 * 2**20, 20.0, 80.0,
                         {"topic": (0.60, 0.02), "sentiment": (0.50, 0.01), "ner": (0.80, 0.01), "pos": (0.90, 0.0)}),
        "final": _fake(9_400_000, 3_000_000, 36 * 2**20, 150.0, 900.0,
                       {"topic": (0.57, 0.03), "sentiment": (0.45, 0.02), "ner": (0.76, 0.02), "pos": (0.90, 0.01)}),
    }


def test_summary_computes_kept_share_and_compression():
    s = report.summarise(_results())
    final = s["models"]["final"]
    assert s["tasks"] == ["topic", "sentiment", "ner", "pos"]
    assert final["scores"]["topic"]["kept"] == pytest.approx(0.95)
    assert final["scores"]["sentiment"]["kept"] == pytest.approx(0.90)
    assert final["average"] == pytest.approx((0.57 + 0.45 + 0.76 + 0.90) / 4)
    assert final["average_kept"] == pytest.approx((0.57 + 0.45 + 0.76 + 0.90) / (0.60 + 0.50 + 0.80 + 0.90))
    assert final["compression"]["parameters_ratio"] == pytest.approx(117.5 / 9.4)
    assert final["compression"]["parameters_share"] == pytest.approx(9.4 / 117.5)
    assert s["models"]["teacher"]["average_kept"] == pytest.approx(1.0)


def test_report_has_every_number_and_plots(tmp_path):
    res = _results()
    path = report.write_report(res, tmp_path / "report", notes=["evaluation on subsets"])
    assert path == tmp_path / "report" / "report.md"
    md = path.read_text()
    row = next(line for line in md.splitlines() if line.startswith("| final |"))
    for cell in ("9.4M", "3.0M", "6.4M", "12.5×", "36.0 MiB", "150.0", "900.0", "0.570 ± 0.030",
                 "0.450 ± 0.020", "0.760 ± 0.020", "0.900 ± 0.010", "0.670", "95.7%"):
        assert cell in row, cell
    assert "95.0%" in md and "90.0%" in md            # per-task share kept
    assert "evaluation on subsets" in md and "at most 10 training" in md
    assert not re.search(r"\bnan\b|None|not measured|not evaluated|incomplete", md)
    for name in ("topic", "sentiment", "ner", "pos", "average"):
        png = tmp_path / "report" / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"plots/{name}.png" in md
    data = json.loads((tmp_path / "report" / "results.json").read_text())
    assert data["models"] == res
    assert data["summary"]["models"]["final"]["scores"]["topic"]["kept"] == pytest.approx(0.95)


def test_report_flags_missing_tasks_and_other_protocols(tmp_path):
    res = _results()
    del res["final"]["tasks"]["pos"]
    res["final"]["protocol"] = dict(res["final"]["protocol"], epochs=3)
    md = report.write_report(res, tmp_path / "r").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| final |"))
    assert "not evaluated" in row and "incomplete" in row
    assert "different protocol" in md


def test_report_needs_the_teacher(tmp_path):
    res = _results()
    with pytest.raises(MlcError, match="teacher"):
        report.write_report({"final": res["final"]}, tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_model_card(tmp_path):
    folder = tmp_path / "final"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    path = report.write_model_card(folder, _results(), model_key="final", language="swa")
    text = path.read_text()
    assert path == folder / "README.md"
    assert text.startswith("---\n") and "language: [swa]" in text
    assert "12.5× fewer" in text and "95.7%" in text and "| final |" in text and "| teacher |" in text
    with pytest.raises(MlcError):
        report.write_model_card(folder, _results(), model_key="step1")


def test_report_from_a_tiny_real_run(tiny_bert_dir, tiny_xlmr_dir, data_dir, tmp_path):
    from mlc.evaluate.finetune import evaluate_model
    from mlc.recipe import EvalSpec

    spec = EvalSpec(tasks=["topic", "pos"], data_dir=str(data_dir / "swa"), seeds=[1], epochs=1, batch_size=8,
                    max_length=48, max_train_examples=8, max_eval_examples=8)
    res = {"teacher": evaluate_model(tiny_bert_dir, spec, tmp_path / "t", progress=False),
           "final": evaluate_model(tiny_xlmr_dir, spec, tmp_path / "f", progress=False)}
    md = report.write_report(res, tmp_path / "report").read_text()
    assert "| teacher |" in md and "| final |" in md
    assert not re.search(r"\bnan\b|None|not measured|not evaluated|incomplete", md)
    assert (tmp_path / "report" / "plots" / "pos.png").is_file()
