"""The report (report.md, results.json, plots) and the model card, from hand-made and tiny real results."""
from __future__ import annotations

import json
import re

import pytest

from mlc.errors import MlcError
from mlc.evaluate import report


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _fake(total, emb, disk, b1, b32, scores, protocol=None, flags=None):
    primary = {"topic": "accuracy", "sentiment": "macro_f1", "ner": "entity_f1", "pos": "accuracy"}
    tasks = {}
    for task, (test, std) in scores.items():
        tasks[task] = {"primary": primary[task],
                       "metrics": {primary[task]: {"dev_mean": test + 0.01, "dev_std": std,
                                                   "test_mean": test, "test_std": std}},
                       "runs": [{"seed": 1}, {"seed": 2}, {"seed": 3}], "flags": (flags or {}).get(task, []),
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
    # the mean of the per-task shares, over every task (the teacher is valid on all of them here)
    assert final["average_kept"] == pytest.approx((0.95 + 0.90 + 0.95 + 1.0) / 4)
    assert final["kept_over"] == ["topic", "sentiment", "ner", "pos"]
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
                 "0.450 ± 0.020", "0.760 ± 0.020", "0.900 ± 0.010", "0.670", "95.0%"):
        assert cell in row, cell
    assert "100.0%" in md and "90.0%" in md            # per-task share kept
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


def _baselines(majority, bow):
    primary = {"topic": "accuracy", "sentiment": "macro_f1", "ner": "entity_f1", "pos": "accuracy"}
    return {"tasks": {t: {"primary": primary[t], "majority": {"dev": {primary[t]: majority[t]},
                                                                "test": {primary[t]: majority[t]}},
                          "bag_of_words": {"dev": {primary[t]: bow[t]}, "test": {primary[t]: bow[t]}}}
                      for t in majority}}


def test_kept_is_absent_where_the_teacher_is_not_a_valid_reference(tmp_path):
    res = _results()
    res["teacher"]["tasks"]["pos"]["flags"] = ["collapsed"]
    base = _baselines({"topic": 0.25, "sentiment": 0.25, "ner": 0.0, "pos": 0.3},
                      {"topic": 0.55, "sentiment": 0.52, "ner": 0.7, "pos": 0.8})   # sentiment: teacher 0.50 below
    s = report.summarise(res, baselines=base)
    assert s["validity"]["sentiment"] == {"valid": False, "reason": "teacher at or below the bag of words"}
    assert not s["validity"]["pos"]["valid"] and "collapsed" in s["validity"]["pos"]["reason"]
    final = s["models"]["final"]
    assert final["scores"]["sentiment"]["kept"] is None and final["scores"]["pos"]["kept"] is None
    assert final["kept_over"] == ["topic", "ner"]
    assert final["average_kept"] == pytest.approx((0.95 + 0.95) / 2)
    assert final["scores"]["topic"]["below_bag_of_words"] is False
    md = report.write_report(res, tmp_path / "r", baselines=base).read_text()
    assert "does not measure** this task (teacher at or below the bag of words)" in md
    kept_rows = md.split("## Share of the teacher's score kept")[1].split("##")[0]
    assert "not measured" in kept_rows and "95.0% (2 of 4)" in kept_rows
    assert "| baseline: majority class |" in md and "| baseline: bag of words |" in md
    # above the majority class but below the bag of words: marked, and said in words (sentiment only)
    final_row = next(line for line in md.splitlines() if line.startswith("| final |"))
    assert final_row.count("▽") == 1 and "▼" not in final_row
    assert "`final` is below the bag-of-words baseline on sentiment: on that task it adds nothing" in md

    everything_invalid = _baselines({t: 0.95 for t in ("topic", "sentiment", "ner", "pos")},
                                    {t: 0.0 for t in ("topic", "sentiment", "ner", "pos")})
    s = report.summarise(_results(), baselines=everything_invalid)
    assert s["valid_tasks"] == [] and s["models"]["final"]["average_kept"] is None
    assert all(v["at_or_below_majority"] for v in s["models"]["final"]["scores"].values())
    md = report.write_report(_results(), tmp_path / "r2", baselines=everything_invalid).read_text()
    assert "not measured (no valid teacher score)" in md and "▼" in md


def test_plots_hold_every_point_and_draw_the_baselines(tmp_path):
    base = _baselines({"topic": 0.25, "sentiment": 0.25, "ner": 0.0, "pos": 0.3},
                      {"topic": 0.55, "sentiment": 0.40, "ner": 0.7, "pos": 0.8})
    s = report.summarise(_results(), baselines=base)
    for task in ("ner", None):
        drawn = report._plot(s, task, tmp_path / "p.png")
        (x0, x1), (y0, y1) = drawn["xlim"], drawn["ylim"]
        for _, x, y in drawn["points"]:
            assert x0 < x < x1 and y0 < y < y1
        assert "teacher" in drawn["legend"] and "baseline: bag of words" in drawn["legend"]
        assert "baseline: majority class" in drawn["legend"]
        assert y0 < (0.0 if task == "ner" else 0.2)              # the majority line is inside too


def test_report_from_a_tiny_real_run(tiny_bert_dir, tiny_xlmr_dir, data_dir, tmp_path):
    from mlc.evaluate.facts import measure_speeds
    from mlc.evaluate.run import evaluate_baselines, evaluate_model
    from mlc.recipe import EvalSpec

    spec = EvalSpec(tasks=["topic", "pos"], data_dir=str(data_dir / "swa"), max_length=48, max_train_examples=8,
                    max_eval_examples=8, c_grid=[0.1, 1.0])
    res = {"teacher": evaluate_model(tiny_bert_dir, spec, tmp_path / "t", progress=False),
           "final": evaluate_model(tiny_xlmr_dir, spec, tmp_path / "f", progress=False)}
    speeds = measure_speeds({"teacher": tiny_bert_dir, "final": tiny_xlmr_dir}, ["a b c", "d e"], 16, rounds=2)
    for name, sp in speeds.items():
        assert sp["interleaved_with"] == ["teacher", "final"] and sp["rounds"] == 2 and sp["batch_1"] > 0
        res[name]["model"]["speed"] = sp
    base = evaluate_baselines(spec, tmp_path / "b", progress=False)
    md = report.write_report(res, tmp_path / "report", baselines=base).read_text()
    assert "| teacher |" in md and "| final |" in md and "| baseline: bag of words |" in md
    assert "2 interleaved rounds" in md and "Evaluation time" in md
    assert not re.search(r"\bnan\b|None|not evaluated|incomplete", md)
    # the probe is one deterministic run: no spread is shown, in any table
    assert not [line for line in md.splitlines() if line.startswith("|") and "±" in line]
    assert (tmp_path / "report" / "plots" / "pos.png").is_file()
