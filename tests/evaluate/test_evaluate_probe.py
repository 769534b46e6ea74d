"""The default protocol (a converged logistic-regression probe on frozen features) and the baselines."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from mlc.evaluate import baselines, probe, run
from mlc.evaluate.data import TaskData, score
from mlc.recipe import EvalSpec

GRID = [1e-2, 1e-1, 1.0, 10.0]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _spec(data_dir, **kw):
    base = dict(tasks=["topic", "ner"], data_dir=str(data_dir / "swa"), max_length=48, max_train_examples=24,
                max_eval_examples=16, c_grid=GRID)
    base.update(kw)
    return EvalSpec(**base)


def _clusters(n, seed, shift=0.0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    x = rng.normal(size=(n, 5)).astype(np.float32)
    x[np.arange(n), y] += 6.0 + shift  # three well-separated clusters
    return x, y


def test_a_separable_task_reaches_100_percent():
    x_train, y_train = _clusters(60, 0)
    x_dev, y_dev = _clusters(30, 1)
    x_test, y_test = _clusters(30, 2)

    def dev_eval(model, scaler):
        return score("topic", list(y_dev), [int(p) for p in model.predict(scaler.transform(x_dev))], ["a", "b", "c"])

    model, scaler, record = probe.fit_and_select("topic", x_train, y_train, dev_eval, GRID, 1000, 3)
    assert record["grid"][0]["dev"]["accuracy"] == 1.0 or record["C"] > GRID[0]
    assert next(g for g in record["grid"] if g["C"] == record["C"])["dev"]["accuracy"] == 1.0
    assert (model.predict(scaler.transform(x_test)) == y_test).all()
    assert record["converged"]


def test_the_grid_widens_at_an_edge_and_flags_a_choice_still_there():
    x_train, y_train = _clusters(60, 0)
    calls = []

    def always_stronger_is_better(model, scaler):
        calls.append(model.C)
        return {"accuracy": 1.0 / model.C, "macro_f1": 0.0}   # dev prefers ever smaller C

    _, _, record = probe.fit_and_select("topic", x_train, y_train, always_stronger_is_better, GRID, 1000, 3)
    tried = sorted(g["C"] for g in record["grid"])
    assert tried[0] == pytest.approx(GRID[0] / 10 ** probe.GRID_EXTENSIONS)
    assert record["C"] == tried[0] and record["c_at_edge"] is True
    assert run.task_flags([{"spread": {"distinct": 3}, "selection": record}]) == ["c_at_edge"]

    def best_in_the_middle(model, scaler):
        return {"accuracy": -abs(np.log10(model.C)), "macro_f1": 0.0}

    _, _, record = probe.fit_and_select("topic", x_train, y_train, best_in_the_middle, GRID, 1000, 3)
    assert record["C"] == 1.0 and not record["c_at_edge"]
    assert sorted(g["C"] for g in record["grid"]) == GRID     # no widening needed

    grid = [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0]

    def plateau_then_rise(model, scaler):                  # a flat start (majority class) is not a fall
        return {"accuracy": 0.25 if model.C < 0.05 else min(model.C, 2.0), "macro_f1": 0.0}

    _, _, record = probe.fit_and_select("topic", x_train, y_train, plateau_then_rise, grid, 1000, 3)
    assert record["C"] == 10.0 and record["not_fitted"] == []

    def rise_then_fall(model, scaler):
        return {"accuracy": -abs(np.log10(model.C) + 2), "macro_f1": 0.0}   # best at 1e-2

    _, _, record = probe.fit_and_select("topic", x_train, y_train, rise_then_fall, grid, 1000, 3)
    assert record["C"] == 1e-2 and record["not_fitted"] == [10.0]        # 1e-1 and 1 fell: 10 not fitted


@pytest.fixture(scope="module")
def tiny_probe(tiny_bert_dir, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("probe")
    spec = _spec(data_dir)
    return spec, out, run.evaluate_model(tiny_bert_dir, spec, out, progress=False)


def test_probe_results_selection_and_feature_cache(tiny_probe, tiny_bert_dir, data_dir, monkeypatch):
    spec, out, r = tiny_probe
    assert r["complete"] and r["protocol"]["mode"] == "probe" and r["protocol"]["c_grid"] == GRID
    assert "epochs" not in r["protocol"] and "seeds" not in r["protocol"]
    for task, tr in r["tasks"].items():
        (one,) = tr["runs"]
        assert one["seed"] is None                      # deterministic: one run
        sel = one["selection"]
        best = max(sel["grid"], key=lambda g: (g["dev"][tr["primary"]], -g["C"]))
        assert sel["C"] == best["C"] and one["dev"] == best["dev"]
        assert tr["metrics"][tr["primary"]]["dev_std"] == 0.0
        assert tr["feature_dim"] == 32
    assert len(list((out / "features").glob("*.npy"))) == 6   # 2 tasks x 3 splits

    # a rerun with another C grid reads the cached features: the encoder never runs
    def no_encoder(*a, **k):
        raise AssertionError("the encoder ran although its features were cached")

    monkeypatch.setattr(probe, "encode", no_encoder)
    again = run.evaluate_model(tiny_bert_dir, _spec(data_dir, c_grid=GRID + [100.0]), out, progress=False)
    assert again["protocol"]["c_grid"] == GRID + [100.0] and again["complete"]
    assert again["protocol"]["libraries"]["scikit-learn"] and again["protocol"]["libraries"]["torch"]


def test_results_and_features_of_other_library_versions_or_machines_are_not_reused(tiny_bert_dir, data_dir,
                                                                                   tmp_path, monkeypatch):
    """The same code and data under other numpy/scipy/scikit-learn (or torch) versions moves scores, so a
    result of one environment is neither reused nor mixed into another's."""
    from mlc import runtime

    spec = _spec(data_dir, tasks=["topic"])
    first = run.evaluate_model(tiny_bert_dir, spec, tmp_path, progress=False)
    encoded, fitted = [], []
    real_encode, real_fit = probe.encode, probe.fit_and_select
    monkeypatch.setattr(probe, "encode", lambda *a, **k: encoded.append(1) or real_encode(*a, **k))
    monkeypatch.setattr(probe, "fit_and_select", lambda *a, **k: fitted.append(1) or real_fit(*a, **k))
    run.evaluate_model(tiny_bert_dir, spec, tmp_path, progress=False)
    assert encoded == [] and fitted == []  # the same environment: reused, nothing computed

    other = dict(runtime.numeric_libraries(), **{"scikit-learn": "0.0-other"})
    monkeypatch.setattr(run, "numeric_libraries", lambda: dict(other))
    again = run.evaluate_model(tiny_bert_dir, spec, tmp_path, progress=False)
    assert again["protocol"]["libraries"]["scikit-learn"] == "0.0-other" and again["protocol"] != first["protocol"]
    assert fitted  # fitted again
    assert encoded == []  # the features (torch, transformers, tokenizers unchanged) were read from the cache

    other["torch"] = "0.0-other"
    monkeypatch.setattr(probe, "numeric_libraries", lambda: dict(other))
    run.evaluate_model(tiny_bert_dir, spec, tmp_path, progress=False)
    assert encoded  # another torch: the features are computed again

    # another machine's CPU kernels (AVX2 against AVX512 round differently): nothing of the others is reused
    encoded.clear()
    fitted.clear()
    machine = dict(runtime.numeric_machine(), cpu_kernels="OTHER")
    monkeypatch.setattr(run, "numeric_machine", lambda: dict(machine))
    monkeypatch.setattr(probe, "numeric_machine", lambda: dict(machine))
    moved = run.evaluate_model(tiny_bert_dir, spec, tmp_path, progress=False)
    assert moved["protocol"]["machine"]["cpu_kernels"] == "OTHER"
    assert encoded and fitted


def test_regularisation_is_chosen_on_dev_only(tiny_bert_dir, data_dir, monkeypatch):
    """Scrambling the test labels changes no choice; only the test scores move."""
    spec = _spec(data_dir, tasks=["topic"])
    a = run.evaluate_task(tiny_bert_dir, "topic", spec, progress=False)
    real_init = TaskData.__init__

    def scrambled_test(self, *args, **kw):
        real_init(self, *args, **kw)
        gold = self.splits["test"].gold
        self.splits["test"].gold = [(g + 1) % len(self.labels) for g in gold]

    monkeypatch.setattr(TaskData, "__init__", scrambled_test)
    b = run.evaluate_task(tiny_bert_dir, "topic", spec, progress=False)
    assert [(g["C"], g["dev"]) for g in a["runs"][0]["selection"]["grid"]] == \
        [(g["C"], g["dev"]) for g in b["runs"][0]["selection"]["grid"]]
    assert a["runs"][0]["selection"]["C"] == b["runs"][0]["selection"]["C"]
    assert a["runs"][0]["dev"] == b["runs"][0]["dev"]


def test_a_collapsed_model_is_flagged(data_dir):
    """An encoder whose features carry nothing predicts one class: flagged, whatever its score."""
    import torch
    from types import SimpleNamespace

    class Constant(torch.nn.Module):
        config = SimpleNamespace(hidden_size=8)

        def forward(self, input_ids, attention_mask, output_hidden_states=False):
            h = torch.ones(*input_ids.shape, 8)
            return SimpleNamespace(last_hidden_state=h, hidden_states=(h, h))

    class Tok:
        pad_token_id = 0

        def __call__(self, texts, truncation=True, max_length=None, is_split_into_words=False):
            return {"input_ids": [[1] * min(len(t.split()), 8) + [2] for t in texts]}

    data = TaskData(data_dir / "swa", "topic", 40, 20)
    got = probe.probe_task(Constant(), Tok(), data, _spec(data_dir), "constant", None)
    (one,) = got["runs"]
    assert one["spread"]["distinct"] == 1
    assert "collapsed" in run.task_flags(got["runs"])


def _hand_majority(path, column):
    import csv

    with open(path, encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [r[column].strip() for r in rows]


def test_baseline_scores_match_hand_counts(data_dir):
    swa = data_dir / "swa"
    data = TaskData(swa, "topic", None, None)
    got = baselines.majority(data)
    train = Counter(_hand_majority(swa / "topic" / "train.tsv", "category"))
    label = train.most_common(1)[0][0]
    test = _hand_majority(swa / "topic" / "test.tsv", "category")
    assert got["label"] == label
    assert got["test"]["accuracy"] == pytest.approx(test.count(label) / len(test))
    # macro-F1 over the classes present: only the predicted class has a non-zero F1
    share = test.count(label) / len(test)
    f1 = 2 * share / (share + 1)
    assert got["test"]["macro_f1"] == pytest.approx(f1 / len(set(test) | {label}))

    ner = baselines.majority(TaskData(swa, "ner", None, 50))
    assert ner["label"] == "O" and ner["test"]["entity_f1"] == 0.0      # "O" everywhere finds no entity
    pos = TaskData(swa, "pos", None, 50)
    tags = Counter(t for s in pos["train"].gold for t in s)
    top = tags.most_common(1)[0][0]
    flat = [t for s in pos["test"].gold for t in s]
    assert baselines.majority(pos)["test"]["accuracy"] == pytest.approx(flat.count(top) / len(flat))


def test_bag_of_words_baselines_learn(data_dir, tmp_path):
    spec = _spec(data_dir, tasks=["topic", "pos"], max_train_examples=120, max_eval_examples=40,
                 c_grid=[0.1, 1.0, 10.0], max_iter=300)
    b = run.evaluate_baselines(spec, tmp_path, progress=False)
    assert json.loads((tmp_path / "results.json").read_text()) == b
    for task, tb in b["tasks"].items():
        p = tb["primary"]
        assert tb["bag_of_words"]["test"][p] > tb["majority"]["test"][p] + 0.1, task
        assert tb["bag_of_words"]["selection"]["C"] in [g["C"] for g in tb["bag_of_words"]["selection"]["grid"]]
    # a rerun reuses them
    assert run.evaluate_baselines(spec, tmp_path, progress=False) == b
