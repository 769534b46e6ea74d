"""Fast checks of the distillation engine's parts (no DeepSpeed launch)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mlc.distill.losses import LossSet, Outputs, Selection, hidden_cosine, mlm_cross_entropy, resolve_layer_map
from mlc.errors import MlcError
from mlc.recipe import Losses, StepSpec

ROOT = Path(__file__).resolve().parents[2]


# --- layer maps -------------------------------------------------------------------------------

def test_auto_layer_map_by_depth_ratio():
    assert resolve_layer_map("auto", 6, 12, hidden_states=True) == {i: 2 * i for i in range(7)}
    assert resolve_layer_map("auto", 6, 12, hidden_states=False) == {i: 2 * i + 1 for i in range(6)}
    assert resolve_layer_map("last", 6, 12, hidden_states=False) == {5: 11}
    assert resolve_layer_map("last", 3, 12, hidden_states=True) == {3: 12}
    assert resolve_layer_map({1: 4, 0: 0}, 2, 4, hidden_states=True) == {0: 0, 1: 4}


# --- the loss terms against tiny hand-written references ---------------------------------------

def _ref_mse(s, t, mask):
    m = mask.float().unsqueeze(-1)
    return ((s - t) ** 2 * m).sum() / (m.sum() * s.shape[-1])


def _ref_attn(q, k, tq, tk, mask):
    def maps(q, k):
        sc = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        sc = sc.masked_fill(mask[:, None, None, :] == 0, -1e30)
        return sc.softmax(-1).mean(1)
    pair = (mask[:, :, None] * mask[:, None, :]).float()
    return ((maps(q, k) - maps(tq, tk)) ** 2 * pair).sum() / pair.sum()


def test_loss_set_terms_match_references():
    torch.manual_seed(0)
    b, length, hs, ht, v = 2, 5, 8, 8, 11
    losses = Losses.model_validate({
        "hidden_mse": {"weight": 1.0, "layer_map": {1: 2, 2: 4}},
        "hidden_cos": {"weight": 0.5, "layer_map": "last"},
        "mlm": {"weight": 0.25},
        "logits": {"weight": 2.0, "kind": "kl", "temperature": 2.0, "positions": "masked"},
        "attention": {"weight": 3.0, "layer_map": "last"}})
    ls = LossSet(losses, 2, 4)
    s_hidden = [torch.randn(b, length, hs, requires_grad=True) for _ in range(3)]
    t_hidden = [torch.randn(b, length, ht) for _ in range(5)]
    s_head, t_head = torch.randn(b, length, hs, requires_grad=True), torch.randn(b, length, ht)
    sw, sb, tw, tb = torch.randn(v, hs), torch.randn(v), torch.randn(v, ht), torch.randn(v)
    q, k = torch.randn(b, 2, length, 4, requires_grad=True), torch.randn(b, 2, length, 4)
    tq, tk = torch.randn(b, 4, length, 2), torch.randn(b, 4, length, 2)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    labels = torch.full((b, length), -100)
    labels[0, 1], labels[1, 2] = 3, 7
    total, terms = ls.compute(Outputs(s_hidden, s_head, {1: (q, k)}), Outputs(t_hidden, t_head, {3: (tq, tk)}),
                              attention_mask=mask, labels=labels, student_head=(sw, sb), teacher_head=(tw, tb))
    ref_mse = (_ref_mse(s_hidden[1], t_hidden[2], mask) + _ref_mse(s_hidden[2], t_hidden[4], mask)) / 2
    valid = mask.float()
    cos = F.cosine_similarity(s_hidden[2], t_hidden[4], dim=-1)
    ref_cos = ((1 - cos) * valid).sum() / valid.sum()
    rows = labels.reshape(-1) != -100
    zs = (s_head.reshape(-1, hs) @ sw.T + sb)[rows]
    zt = (t_head.reshape(-1, ht) @ tw.T + tb)[rows]
    ref_mlm = F.cross_entropy(zs, labels.reshape(-1)[rows])
    ref_kl = F.kl_div(F.log_softmax(zs / 2, -1), F.log_softmax(zt / 2, -1), log_target=True,
                      reduction="batchmean") * 4
    ref_att = _ref_attn(q, k, tq, tk, mask)
    for name, ref in (("hidden_mse", ref_mse), ("hidden_cos", ref_cos), ("mlm", ref_mlm), ("logits", ref_kl),
                      ("attention", ref_att)):
        torch.testing.assert_close(terms[name], ref, rtol=1e-5, atol=1e-6, msg=name)
    ref_total = ref_mse + 0.5 * ref_cos + 0.25 * ref_mlm + 2.0 * ref_kl + 3.0 * ref_att
    torch.testing.assert_close(total, ref_total, rtol=1e-5, atol=1e-6)
    total.backward()
    assert s_hidden[0].grad is None or float(s_hidden[0].grad.abs().sum()) == 0  # index 0 is not mapped
    assert float(q.grad.abs().sum()) > 0 and float(s_head.grad.abs().sum()) > 0


def test_selection_compares_kept_dims_and_heads_only():
    torch.manual_seed(1)
    losses = Losses.model_validate({"hidden_mse": {"weight": 1.0, "layer_map": "last"},
                                    "attention": {"weight": 1.0, "layer_map": "last"}})
    ls = LossSet(losses, 1, 1)
    s = [torch.randn(1, 3, 6), torch.randn(1, 3, 6)]
    t = [torch.randn(1, 3, 6), torch.randn(1, 3, 6)]
    q, k = torch.randn(1, 3, 3, 2), torch.randn(1, 3, 3, 2)
    tq, tk = torch.randn(1, 2, 3, 2), torch.randn(1, 2, 3, 2)
    mask = torch.ones(1, 3, dtype=torch.long)
    dims, heads = torch.tensor([0, 2, 5]), torch.tensor([0, 2])
    _, terms = ls.compute(Outputs(s, None, {0: (q, k)}), Outputs(t, None, {0: (tq, tk)}), attention_mask=mask,
                          labels=torch.full((1, 3), -100), student_head=None, teacher_head=None,
                          selection=Selection(hidden_dims=dims, heads={0: heads}))
    torch.testing.assert_close(terms["hidden_mse"], ((s[1][..., dims] - t[1][..., dims]) ** 2).mean())
    torch.testing.assert_close(terms["attention"], _ref_attn(q[:, heads], k[:, heads], tq, tk, mask))


def test_projection_when_widths_differ():
    from mlc.distill.engine import Harness
    from mlc.models.tiny import tiny_bert

    import tempfile
    with tempfile.TemporaryDirectory() as d:
        model, _ = tiny_bert(Path(d) / "m", hidden=16, heads=2, layers=2)
    losses = Losses.model_validate({"hidden_mse": {"weight": 1.0, "layer_map": "auto"}})
    h = Harness(model, LossSet(losses, 2, 4), teacher_hidden=32)
    assert sorted(h.projections) == ["0", "1", "2"]
    assert h.projections["1"].in_features == 16 and h.projections["1"].out_features == 32
    ids = torch.tensor([[2, 10, 11, 3]])
    mask = torch.ones_like(ids)
    teacher = Outputs([torch.randn(1, 4, 32) for _ in range(5)])
    total, terms = h(ids, mask, torch.full_like(ids, -100), teacher)
    total.backward()
    assert h.projections["2"].weight.grad is not None and float(h.projections["2"].weight.grad.abs().sum()) > 0


def test_cosine_and_mlm_edge_cases():
    s = torch.ones(1, 2, 4)
    assert float(hidden_cosine([s], [2 * s], torch.ones(1, 2))) == pytest.approx(0.0, abs=1e-6)
    h = torch.randn(1, 2, 4, requires_grad=True)
    loss = mlm_cross_entropy(h, torch.randn(5, 4), None, torch.full((1, 2), -100))
    assert float(loss.detach()) == 0.0
    loss.backward()  # no masked position: still part of the graph


# --- DeepSpeed config, schedule, checkpoint state ---------------------------------------------

def _step(**kw):
    base = {"steps": 10, "batch_size": 4, "grad_accum": 3, "lr": 1e-3, "clip_grad": 0.5, "precision": "bf16",
            "losses": {"mlm": {"weight": 1.0}}}
    base.update(kw)
    return StepSpec.model_validate(base)


def test_deepspeed_config_filled_from_recipe(tmp_path):
    from mlc.distill.ds_config import deepspeed_config
    from mlc.recipe import resolve_deepspeed_config

    ds = deepspeed_config(resolve_deepspeed_config("zero3"), _step(), 2, "distill.step1.deepspeed")
    cfg = ds.config
    assert cfg["train_micro_batch_size_per_gpu"] == 4 and cfg["gradient_accumulation_steps"] == 3
    assert cfg["train_batch_size"] == 24 and cfg["gradient_clipping"] == 0.5
    assert cfg["bf16"] == {"enabled": True} and ds.zero_stage == 3 and ds.notes == [] and not ds.offload
    with pytest.raises(MlcError, match="no DeepSpeed config"):
        deepspeed_config(tmp_path / "none.json", _step(), 2, "distill.step1.deepspeed")


# the JSON a transformers / axolotl user brings: every value mlc owns is "auto"
HF_STYLE = {
    "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "train_batch_size": "auto",
    "gradient_clipping": "auto", "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto", "loss_scale": 0},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                      "warmup_num_steps": "auto", "total_num_steps": "auto"}},
    "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                          "stage3_param_persistence_threshold": "auto",
                          "offload_optimizer": {"device": "cpu", "pin_memory": True}},
}


def test_auto_values_are_filled_from_the_recipe(tmp_path):
    """'auto' (the transformers convention) was refused: 'optimizer' is set by mlc from the recipe."""
    from mlc.distill.ds_config import deepspeed_config

    path = tmp_path / "hf.json"
    path.write_text(json.dumps(HF_STYLE))
    ds = deepspeed_config(path, _step(), 2, "distill.step1.deepspeed", hidden_size=64)
    cfg = ds.config
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"], cfg["train_batch_size"],
            cfg["gradient_clipping"], cfg["bf16"]) == (4, 3, 24, 0.5, {"enabled": True})
    assert "optimizer" not in cfg and "scheduler" not in cfg and "fp16" not in cfg  # mlc passes its own
    zero = cfg["zero_optimization"]
    assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"],
            zero["stage3_param_persistence_threshold"]) == (4096, 3686, 640)
    assert ds.offload and ds.notes == [] and ds.adam == {"betas": (0.9, 0.999), "eps": 1e-8}
    # the student's width unknown (mlc validate before the student exists): DeepSpeed's defaults
    assert "reduce_bucket_size" not in deepspeed_config(path, _step(), 2, "k").config["zero_optimization"]


def test_json_values_the_recipe_replaces_are_reported(tmp_path):
    from mlc.distill.ds_config import deepspeed_config

    path = tmp_path / "explicit.json"
    path.write_text(json.dumps({
        "train_micro_batch_size_per_gpu": 16, "gradient_accumulation_steps": 3, "gradient_clipping": 1.0,
        "bf16": {"enabled": False}, "optimizer": {"type": "Adam", "params": {"lr": 5e-5, "betas": [0.9, 0.98],
                                                                             "eps": 1e-6, "weight_decay": 0.01}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 100}},
        "zero_optimization": {"stage": 2}}))
    ds = deepspeed_config(path, _step(), 2, "distill.step1.deepspeed")
    assert ds.config["train_micro_batch_size_per_gpu"] == 4 and ds.config["gradient_clipping"] == 0.5
    text = "\n".join(ds.notes)
    for said in ("train_micro_batch_size_per_gpu is 16", "gradient_clipping is 1.0", "bf16.enabled is False",
                 "optimizer.params.lr is 5e-05", "scheduler WarmupLR with {'warmup_num_steps': 100}"):
        assert said in text, (said, text)
    assert "gradient_accumulation_steps" not in text and "weight_decay" not in text   # equal to the recipe's
    assert ds.adam == {"betas": (0.9, 0.98), "eps": 1e-6}                                 # used as written
    assert len(ds.notes) == 5  # absent keys (train_batch_size) are filled without a note


@pytest.mark.parametrize("block, key", [
    ({"fp16": {"enabled": True}}, "fp16.enabled"),
    ({"optimizer": {"type": "SGD", "params": {"lr": "auto"}}}, "optimizer.type"),
    ({"optimizer": {"type": "AdamW", "params": {"amsgrad": True}}}, "optimizer.params.amsgrad"),
    ({"optimizer": {"type": "AdamW", "params": {"betas": [0.9]}}}, "optimizer.params.betas"),
    ({"scheduler": {"type": "Cyclic"}}, "scheduler.type"),
    ({"zero_optimization": {"stage": 0, "offload_optimizer": {"device": "cpu"}}}, "zero_optimization.stage"),
    ({"zero_optimization": {"stage": 2, "allgather_bucket_size": "auto"}}, "zero_optimization.allgather_bucket_size"),
])
def test_what_mlc_cannot_honour_is_an_error_naming_the_key(tmp_path, block, key):
    from mlc.distill.ds_config import deepspeed_config

    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, **block}))
    with pytest.raises(MlcError) as err:
        deepspeed_config(path, _step(), 1, "distill.step1.deepspeed")
    assert key in str(err.value) and str(path) in str(err.value)
def test_auto_precision_is_bf16_only_where_native(monkeypatch):
    import mlc.runtime as runtime
    from mlc.distill.ds_config import deepspeed_config
    from mlc.recipe import resolve_deepspeed_config

    default = StepSpec.model_validate({"steps": 1, "batch_size": 1, "lr": 1e-3, "losses": {"mlm": {"weight": 1.0}}})
    assert default.precision == "auto"
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(runtime, "native_bf16", lambda native=native: native)
        assert runtime.resolve_precision("auto") == expected
        cfg = deepspeed_config(resolve_deepspeed_config("zero2"), _step(precision="auto"), 1, "k").config
        assert cfg["bf16"] == {"enabled": expected == "bf16"}
        # an explicit choice is taken as written, native or not
        assert runtime.resolve_precision("bf16") == "bf16" and runtime.resolve_precision("fp32") == "fp32"


def test_student_dropout_changes_the_layers_not_the_config(tiny_bert_dir, tmp_path):
    from mlc.models.arch import set_dropout
    from mlc.models.io import load_model

    model = load_model(tiny_bert_dir, with_head=False)
    model.train()
    ids = torch.randint(5, 50, (2, 12))
    mask = torch.ones_like(ids)
    assert set_dropout(model, 0.5) > 0
    torch.manual_seed(0)
    a = model(input_ids=ids, attention_mask=mask).last_hidden_state
    b = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert not torch.allclose(a, b)  # dropout at 0.5 is on in train mode
    set_dropout(model, 0.0)
    a = model(input_ids=ids, attention_mask=mask).last_hidden_state
    b = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(a, b)  # hidden and attention dropout both off
    original = load_model(tiny_bert_dir, with_head=False).config
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["hidden_dropout_prob"] == original.hidden_dropout_prob
    assert saved["attention_probs_dropout_prob"] == original.attention_probs_dropout_prob
    assert _step().student_dropout is None
    with pytest.raises(Exception, match="student_dropout"):
        _step(student_dropout=1.0)


def test_schedule_warms_up_and_decays():
    from mlc.distill.engine import make_optimizer, make_schedule

    m = torch.nn.Linear(2, 2)
    opt = make_optimizer(m, 1.0, 0.01)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
    sched = make_schedule(opt, "linear", 10, 0.2)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(0.5) and lrs[2] == pytest.approx(1.0)
    assert lrs[-1] < lrs[3]


def test_rng_state_round_trips_through_json():
    import random

    import numpy as np

    from mlc.distill.checkpoint import rng_state, set_rng_state

    torch.manual_seed(5)
    state = json.loads(json.dumps(rng_state()))
    a = (random.random(), np.random.rand(), torch.rand(3))
    set_rng_state(state)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_checkpointer_latest_and_incomplete(tmp_path):
    from mlc.distill.checkpoint import Checkpointer, write_manifest

    c = Checkpointer(tmp_path, keep=2, rank=0)
    assert c.latest() is None
    (tmp_path / "step-000002").mkdir()
    (tmp_path / "latest.json").write_text(json.dumps({"tag": "step-000002", "step": 2}))
    (tmp_path / "step-000002" / "mlc-state.json").write_text("{}")
    with pytest.raises(MlcError, match="has no manifest.json"):  # complete only with its manifest
        c.latest()
    write_manifest(tmp_path / "step-000002", {"key": None, "step": 2})
    assert c.latest()["step"] == 2


# --- bad recipes fail before any model is loaded, naming the key ----------------------------

def _write_bad(tmp_path, tiny_bert_dir, mutate) -> Path:
    import yaml

    corpus = tmp_path / "c.txt"
    corpus.write_text("Habari ya leo.\n")
    data = {"name": "bad", "language": "swa", "output_dir": str(tmp_path / "run"),
            "teacher": {"source": str(tiny_bert_dir), "dtype": "fp32"},
            "corpus": {"sources": [{"kind": "text", "path": str(corpus)}]},
            "vocab": {"enabled": False},  # step 1 distils from the teacher folder itself
            "student": {"layers": [0, 2]},
            "distill": {"step1": {"steps": 2, "batch_size": 2, "lr": 1e-3, "deepspeed": "zero2",
                                  "losses": {"hidden_mse": {"weight": 1.0}}}}}
    mutate(data["distill"]["step1"])
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("mutate,key", [
    (lambda s: s["losses"].update({"kl_div": {"weight": 1.0}}), "distill.step1.losses.kl_div"),
    (lambda s: s["losses"]["hidden_mse"].update({"layer_map": {2: 9}}), "distill.step1.losses.hidden_mse.layer_map.2"),
    (lambda s: s.update({"deepspeed": "zero7"}), "distill.step1.deepspeed"),
    (lambda s: s.update({"deepspeed": "zero3", "compile": True}), "distill.step1.compile"),
    pytest.param(lambda s: s.update({"teacher_side_stream": True}), "distill.step1.teacher_side_stream",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")),
])
def test_bad_recipe_fails_before_loading(tmp_path, tiny_bert_dir, mutate, key, capsys, monkeypatch):
    import mlc.distill.commands as commands
    from mlc.cli import main

    launched = []
    monkeypatch.setattr(commands.subprocess, "call", lambda *a, **k: launched.append(a) or 0)
    recipe = _write_bad(tmp_path, tiny_bert_dir, mutate)
    assert main(["distill", str(recipe), "--step", "1", "--num-gpus", "2"]) == 2
    err = capsys.readouterr().err
    assert key in err and err.startswith("mlc: error:")
    assert launched == [] and not (tmp_path / "run").exists()


def test_missing_inputs_and_head_named_before_launch(tmp_path, tiny_bert_dir):
    """No shards, a missing student for step 2, or a logit loss without a teacher MLM head: MlcError, no
    launch. A missing step-1 student is made from the teacher's layers."""
    import shutil

    from mlc.distill.commands import prepare

    recipe = _write_bad(tmp_path, tiny_bert_dir, lambda s: None)
    with pytest.raises(MlcError, match="no shards"):
        prepare(recipe, 1)
    # a recipe that trims the vocabulary distils from R/teacher-trimmed, which is not there yet
    import yaml

    trims = yaml.safe_load(recipe.read_text())
    trims["vocab"] = {"enabled": True}
    (tmp_path / "trims.yaml").write_text(yaml.safe_dump(trims))
    with pytest.raises(MlcError, match=r"teacher-trimmed is not a Hugging Face model folder .*mlc compress"):
        prepare(tmp_path / "trims.yaml", 1)
    cfg = json.loads((tmp_path / "run" / "student-init" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2
    with pytest.raises(MlcError, match="step 2 is not configured"):
        prepare(recipe, 2)
    # a teacher without an MLM head cannot serve the logit loss
    from transformers import AutoModel

    AutoModel.from_pretrained(str(tiny_bert_dir)).save_pretrained(tmp_path / "bare")
    shutil.copytree(tmp_path / "run" / "student-init", tmp_path / "run" / "shards")  # any folder
    (tmp_path / "run" / "shards" / "manifest.json").write_text("{}")
    recipe2 = _write_bad(tmp_path, tmp_path / "bare",
                         lambda s: s["losses"].update({"logits": {"weight": 1.0}}))
    with pytest.raises(MlcError) as e:
        prepare(recipe2, 1)
    assert e.value.where == "distill.step1.losses.logits" and "MLM head" in e.value.message


def test_gradual_pruning_targets_reach_the_recipe_in_the_last_round():
    from types import SimpleNamespace

    from mlc.distill.plan import round_boundaries, round_targets

    shape = SimpleNamespace(ffn=1536, heads=12, head_size=32, hidden=384)
    prune = SimpleNamespace(ffn_dim=1024, heads=8, hidden_size=256, scope="per_layer")
    rounds = [round_targets(prune, shape, r, 3) for r in range(3)]
    assert [t.ffn_dim for t in rounds] == [1365, 1195, 1024]
    assert [t.heads for t in rounds] == [11, 9, 8]
    assert [t.hidden_size for t in rounds] == [352, 288, 256]
    assert all(t.hidden_size % t.heads == 0 for t in rounds)
    only_ffn = round_targets(SimpleNamespace(ffn_dim=512, heads=None, hidden_size=None, scope="global"), shape, 0, 2)
    assert (only_ffn.ffn_dim, only_ffn.heads, only_ffn.hidden_size, only_ffn.scope) == (1024, None, None, "global")
    assert round_boundaries(60, 3) == [20, 40] and round_boundaries(4, 2) == [2] and round_boundaries(10, 1) == []


def test_selection_from_masks_keeps_inner_dims_of_kept_heads():
    """A masked student with pruned inner head dims is scored like its sliced form (1/sqrt(kept dims))."""
    from mlc.distill.engine import selection_from_masks
    from mlc.surgery.prune import Masks

    heads = torch.tensor([[True, False, True]])
    inner = torch.zeros(1, 3, 4, dtype=torch.bool)
    inner[0, 0, [0, 3]] = True
    inner[0, 2, [1, 2]] = True
    masks = Masks(ffn=torch.ones(1, 8, dtype=torch.bool), heads=heads, inner=inner,
                  hidden=torch.tensor([True, True, True, True, False, False]))
    sel = selection_from_masks(masks)
    assert sel.hidden_dims.tolist() == [0, 1, 2, 3] and sel.heads[0].tolist() == [0, 2]
    assert sel.inner[0].tolist() == [[0, 3], [1, 2]]
    losses = Losses.model_validate({"attention": {"weight": 1.0, "layer_map": "last"}})
    q, k = torch.randn(1, 3, 5, 4), torch.randn(1, 3, 5, 4)
    tq, tk = torch.randn(1, 2, 5, 3), torch.randn(1, 2, 5, 3)
    mask = torch.ones(1, 5, dtype=torch.long)
    _, terms = LossSet(losses, 1, 1).compute(Outputs([], None, {0: (q, k)}), Outputs([], None, {0: (tq, tk)}),
                                             attention_mask=mask, labels=torch.full((1, 5), -100),
                                             student_head=None, teacher_head=None, selection=sel)
    sq = torch.stack([q[:, 0][..., [0, 3]], q[:, 2][..., [1, 2]]], 1)
    sk = torch.stack([k[:, 0][..., [0, 3]], k[:, 2][..., [1, 2]]], 1)
    torch.testing.assert_close(terms["attention"], _ref_attn(sq, sk, tq, tk, mask))


def test_teacher_feed_ahead_pairs_batches_and_records_the_right_loader_position(tmp_path):
    """One micro-batch ahead (the order a CUDA side stream uses), the feed hands out the same (batch, teacher
    outputs) pairs as the plain feed, and its loader_state resumes at the next batch it hands out."""
    import sys

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from distill_helpers import build_tiny_world

    from mlc.data.stream import ShardStream
    from mlc.distill.engine import TeacherFeed

    world = build_tiny_world(tmp_path / "w")
    calls = []

    def teacher(ids, mask):
        calls.append(ids.clone())
        return Outputs(hidden_states=[ids.float() * 2], head_input=None, qk={})

    def stream():
        return ShardStream(world["shards"], batch_size=3, seed=5, workers=0)

    cpu = torch.device("cpu")
    plain = TeacherFeed(teacher, stream(), cpu)
    expected = [plain.next() for _ in range(5)]
    calls.clear()
    ahead = TeacherFeed(teacher, stream(), cpu, ahead=True)
    for i in range(3):
        batch, out = ahead.next()
        assert torch.equal(batch["input_ids"], expected[i][0]["input_ids"])
        assert torch.equal(out.hidden_states[0], batch["input_ids"].float() * 2)
    assert len(calls) == 4  # the teacher already ran on the fourth batch
    state = ahead.loader_state
    assert state["batches"] == 3 and ahead.stream.state_dict()["batches"] == 4
    resumed = stream()
    resumed.load_state_dict(state)
    assert torch.equal(next(iter(resumed.forever()))["input_ids"], expected[3][0]["input_ids"])
    assert torch.equal(ahead.next()[0]["input_ids"], expected[3][0]["input_ids"])
    with pytest.raises(MlcError) as e:
        TeacherFeed(teacher, stream(), cpu, side_stream=True, key="distill.step1.teacher_side_stream")
    assert "distill.step1.teacher_side_stream" in str(e.value) and "CUDA" in str(e.value)


def test_non_finite_loss_stops_naming_the_step_and_the_term():
    from mlc.distill.loop import check_finite_loss

    check_finite_loss("distill.step1", 1, 2.5, {"mlm": torch.tensor(2.0), "hidden_mse": 0.5})
    with pytest.raises(MlcError, match=r"distill.step1: step 2: the loss term mlm = nan is not finite; "
                                       r"stopping without exporting"):
        check_finite_loss("distill.step1", 2, float("nan"), {"mlm": torch.tensor(float("nan")), "hidden_mse": 0.5})
    with pytest.raises(MlcError, match=r"step 7: the loss term hidden_mse = inf \(also logits = nan\)"):
        check_finite_loss("distill.step2", 7, float("inf"), {"hidden_mse": float("inf"), "logits": float("nan")})
    with pytest.raises(MlcError, match=r"step 3: the weighted total \(inf; every term is finite"):
        check_finite_loss("adapt", 3, float("inf"), {"mlm": 1.0})


# --- issue 18, finding 11: resuming from a checkpoint folder mlc cannot use -------------------------

def _resume_setup(tmp_path, monkeypatch, world: int):
    """A step-1 plan whose run folder holds a checkpoint; run() sees ``world`` ranks without a process group."""
    import mlc.distill.loop as loop
    from mlc.recipe import parse_recipe

    from distill_helpers import recipe_dict

    fake = {"teacher": tmp_path / "teacher", "student": tmp_path / "student", "shards": tmp_path / "shards"}
    recipe = parse_recipe(recipe_dict(fake, tmp_path / "run"), "r.yaml", check_files=False)
    plan = loop.StepPlan(1, "distill.step1", fake["teacher"], fake["student"], fake["shards"],
                         tmp_path / "run" / "step1", None, None)
    monkeypatch.setattr(loop, "check_plan", lambda *a: None)
    monkeypatch.setattr(loop, "check_outputs", lambda *a: None)
    monkeypatch.setattr(loop, "dist_info", lambda: (0, world, 0))
    monkeypatch.setattr(loop, "rank_device", lambda local_rank: torch.device("cpu"))
    root = plan.run_dir / "checkpoints"
    (root / "step-000004").mkdir(parents=True)
    (root / "step-000004" / "mlc-state.json").write_text('{"step": 4}')
    for r in range(2):  # written by 2 ranks
        (root / "step-000004" / f"mlc-rank{r:05d}.json").write_text("{}")
    from mlc.distill.checkpoint import write_manifest

    write_manifest(root / "step-000004", {"key": plan.key, "step": 4})
    return loop, recipe, plan, root


@pytest.mark.parametrize("text,key", [
    ("{not json", "latest.json"),
    ("[1, 2]", "latest.json"),
    ('{"tag": "../../etc", "step": 4}', "latest.json: tag"),
    ('{"tag": "step-000004"}', "latest.json: step"),
    ('{"tag": "step-000004", "step": "4"}', "latest.json: step"),
])
def test_malformed_latest_json_is_an_error_naming_the_file(tmp_path, monkeypatch, text, key):
    loop, recipe, plan, root = _resume_setup(tmp_path, monkeypatch, world=2)
    (root / "latest.json").write_text(text)
    with pytest.raises(MlcError) as err:
        loop.run(recipe, plan, resume=True)
    assert f"{root / key}" in str(err.value), str(err.value)


def test_resume_with_another_rank_count_names_both_counts(tmp_path, monkeypatch):
    loop, recipe, plan, root = _resume_setup(tmp_path, monkeypatch, world=3)
    (root / "latest.json").write_text('{"tag": "step-000004", "step": 4}')
    with pytest.raises(MlcError, match="written by 2 ranks and this run has 3") as err:
        loop.run(recipe, plan, resume=True)
    assert str(root / "step-000004") in str(err.value)
