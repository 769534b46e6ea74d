"""Full fine-tuning (``mode: full``) on tiny random models and small subsets of the real task data."""
from __future__ import annotations

import json

import pytest

from mlc.errors import MlcError
from mlc.evaluate import data as eval_data
from mlc.evaluate import facts, finetune, run
from mlc.models.io import load_encoder
from mlc.recipe import EvalSpec


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _spec(data_dir, **kw):
    base = dict(tasks=["topic", "sentiment", "ner", "pos"], data_dir=str(data_dir / "swa"), mode="full", seeds=[1],
                epochs=1, lr=1e-3, batch_size=8, max_length=64, max_train_examples=16, max_eval_examples=16)
    base.update(kw)
    return EvalSpec(**base)


@pytest.fixture(scope="module")
def tiny_run(tiny_bert_dir, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval-bert")
    spec = _spec(data_dir, epochs=2)
    return spec, out, run.evaluate_model(tiny_bert_dir, spec, out, progress=False)


def test_every_task_reports_dev_and_test_mean_and_std(tiny_run):
    spec, out, r = tiny_run
    assert r["complete"] is True
    assert json.loads((out / "results.json").read_text()) == r
    assert set(r["tasks"]) == {"topic", "sentiment", "ner", "pos"}
    expected = {"topic": {"accuracy", "macro_f1"}, "sentiment": {"accuracy", "macro_f1"},
                "ner": {"entity_f1", "precision", "recall"}, "pos": {"accuracy"}}
    for task, tr in r["tasks"].items():
        assert set(tr["metrics"]) == expected[task]
        assert tr["primary"] in tr["metrics"]
        for v in tr["metrics"].values():
            assert set(v) == {"dev_mean", "dev_std", "test_mean", "test_std"}
            assert 0.0 <= v["dev_mean"] <= 1.0 and 0.0 <= v["test_mean"] <= 1.0
            assert v["dev_std"] == 0.0  # one seed
        assert [run["seed"] for run in tr["runs"]] == [1]
        run = tr["runs"][0]
        assert len(run["history"]) == 2
        # the kept epoch is the best on dev (earliest on ties), and its dev scores are reported
        primary = tr["primary"]
        best = max(h["dev"][primary] for h in run["history"])
        assert run["dev"][primary] == best
        assert run["best_epoch"] == min(h["epoch"] for h in run["history"] if h["dev"][primary] == best)
        assert tr["metrics"][primary]["dev_mean"] == best
        assert tr["examples"]["train"]["used"] == 16 and tr["examples"]["dev"]["used"] == 16
        assert tr["examples"]["test"]["used"] == 16 and tr["examples"]["train"]["total"] > 16
    ner = r["tasks"]["ner"]["examples"]["test"]
    assert ner["words"] > 16 and 0 <= ner["words_without_token"] < ner["words"]
    assert r["protocol"]["max_train_examples"] == 16 and r["protocol"]["max_eval_examples"] == 16


def test_model_facts_are_recorded(tiny_run, tiny_bert_dir):
    from transformers import AutoModel

    _, _, r = tiny_run
    m = r["model"]
    p = m["parameters"]
    enc = AutoModel.from_pretrained(str(tiny_bert_dir), add_pooling_layer=False)
    assert p["total"] == sum(x.numel() for x in enc.parameters())
    assert p["embeddings"] == (enc.embeddings.word_embeddings.weight.numel()
                               + enc.embeddings.position_embeddings.weight.numel()
                               + enc.embeddings.token_type_embeddings.weight.numel())
    assert p["rest"] == p["total"] - p["embeddings"]
    assert m["weights_bytes"] == (tiny_bert_dir / "model.safetensors").stat().st_size
    assert m["disk_bytes"] > m["weights_bytes"]
    assert m["layers"] == enc.config.num_hidden_layers and m["hidden"] == enc.config.hidden_size


def test_subsets_are_fixed_and_in_file_order():
    a = eval_data.subset_indices(100, 10)
    assert a == eval_data.subset_indices(100, 10) and a == sorted(a) and len(set(a)) == 10
    assert eval_data.subset_indices(5, 10) == [0, 1, 2, 3, 4]
    assert eval_data.subset_indices(5, None) == [0, 1, 2, 3, 4]


def test_resume_reuses_finished_tasks_and_redoes_on_a_new_protocol(tiny_run, tiny_bert_dir, data_dir,
                                                                   monkeypatch):
    spec, out, r = tiny_run

    def boom(*a, **k):
        raise AssertionError("a finished task was run again")

    monkeypatch.setattr(run, "evaluate_task", boom)
    again = run.evaluate_model(tiny_bert_dir, spec, out, tasks=["topic", "pos"], progress=False)
    assert again["tasks"]["topic"] == r["tasks"]["topic"]
    assert set(again["tasks"]) == {"topic", "pos", "sentiment", "ner"}  # the others are kept
    changed = _spec(data_dir, epochs=1)
    with pytest.raises(AssertionError, match="run again"):
        run.evaluate_model(tiny_bert_dir, changed, out, tasks=["topic"], progress=False)
    # the failed call left the earlier results in place
    assert json.loads((out / "results.json").read_text())["tasks"]["topic"] == r["tasks"]["topic"]


def test_same_seed_same_scores_and_training_lowers_the_loss(tiny_xlmr_dir, data_dir, tmp_path):
    spec = _spec(data_dir, tasks=["pos"], epochs=2, lr=3e-3, max_train_examples=24, max_eval_examples=8)
    a = run.evaluate_model(tiny_xlmr_dir, spec, tmp_path / "a", progress=False)["tasks"]["pos"]
    b = run.evaluate_model(tiny_xlmr_dir, spec, tmp_path / "b", progress=False)["tasks"]["pos"]
    assert a["metrics"] == b["metrics"]
    losses = [h["train_loss"] for h in a["runs"][0]["history"]]
    assert losses[-1] < losses[0]


def test_a_run_whose_best_epoch_is_the_last_is_flagged():
    def r(best, epochs, distinct=3):
        return {"best_epoch": best, "epochs": epochs, "spread": {"distinct": distinct, "top_share": 0.5}}

    assert run.task_flags([r(2, 3), r(1, 3)]) == []
    assert run.task_flags([r(2, 3), r(3, 3)]) == ["best_epoch_last"]
    assert run.task_flags([r(1, 1)]) == []                      # one epoch: nothing to compare with
    assert run.task_flags([r(1, 3, distinct=1)]) == ["collapsed"]


def test_bad_inputs_raise_mlc_errors(tiny_bert_dir, data_dir, tmp_path):
    with pytest.raises(MlcError, match="config.json"):
        run.evaluate_model(tmp_path, _spec(data_dir), tmp_path / "o", progress=False)
    with pytest.raises(MlcError, match="unknown task"):
        run.evaluate_model(tiny_bert_dir, _spec(data_dir), tmp_path / "o", tasks=["parsing"], progress=False)
    with pytest.raises(MlcError, match="not found"):
        run.evaluate_model(tiny_bert_dir, _spec(tmp_path), tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def test_compacted_embeddings_train_exactly_like_the_full_vocabulary(tiny_xlmr_dir, data_dir):
    from tqdm import tqdm

    from mlc.data import tasks as task_data

    task = "pos"
    spec = _spec(data_dir, tasks=[task], epochs=2, lr=3e-3)
    tok = eval_data.load_tokenizer(tiny_xlmr_dir)
    labels = task_data.task_labels(spec.data_dir, task)
    splits = [eval_data.Split(task, task_data.load_task(spec.data_dir, task, split).select(range(16))).tokenize(tok, 64)
              for split in ("train", "dev")]
    used = finetune.used_token_ids(splits, tok.pad_token_id)
    assert len(used) < len(tok) and used[:tok.pad_token_id + 1] == list(range(tok.pad_token_id + 1))
    compact = finetune.remap_ids(splits, used)
    runs = []
    for data, u in ((splits, None), (compact, used)):
        with tqdm(disable=True) as bar:
            model, history = finetune._run_full(tiny_xlmr_dir, task, spec, 1, data[0], data[1], len(labels),
                                                tok.pad_token_id, 0, labels, bar, u)
        runs.append((model, history))
    (full, h_full), (small, h_small) = runs
    assert small.encoder.get_input_embeddings().weight.shape[0] == len(used)
    assert [h["dev"] for h in h_full] == [h["dev"] for h in h_small]
    assert [h["train_loss"] for h in h_full] == pytest.approx([h["train_loss"] for h in h_small], rel=1e-5)
    w_full = full.encoder.get_input_embeddings().weight[used]
    assert torch_allclose(w_full, small.encoder.get_input_embeddings().weight)


def torch_allclose(a, b):
    import torch

    return torch.allclose(a, b, atol=1e-6)


@pytest.mark.integration
def test_real_teacher_ner_subset_and_parameter_counts(e5_teacher_dir, data_dir):
    spec = _spec(data_dir, tasks=["ner"], lr=1e-4, max_train_examples=8, max_eval_examples=8, max_length=128)
    tr = run.evaluate_task(e5_teacher_dir, "ner", spec, progress=False)
    for split in ("train", "dev", "test"):
        assert tr["examples"][split]["words_without_token"] == 0  # every word keeps its first sub-word
    assert 100 < tr["embedding_rows_trained"] < 2000            # of 250,037 rows
    assert 0.0 <= tr["metrics"]["entity_f1"]["test_mean"] <= 1.0
    counts = facts.parameter_counts(load_encoder(e5_teacher_dir))
    assert counts["total"] == 117_505_920                        # without MLM head and pooler
    assert counts["embeddings"] == (250_037 + 512 + 2) * 384
