"""Structured pruning: masks on activations, zero gradients of pruned weights, masked == sliced, export."""
from __future__ import annotations

import copy

import pytest
import torch

from mlc.errors import MlcError
from mlc.recipe import PruneSpec
from mlc.surgery import prune as P

TEXTS = ["Wizara ya afya ya Tanzania imeripoti Jumatatu kuwa watu zaidi wamepata maambukizi.",
         "Rais amesema serikali itaendelea kuchukua hatua.", "Mvua kubwa imenyesha katika mikoa ya pwani."]


def _load(folder):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    return AutoModelForMaskedLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def _batch(tok, labels=True):
    enc = dict(tok(TEXTS, padding=True, return_tensors="pt"))
    if labels:
        enc["labels"] = enc["input_ids"].clone()
    return enc


def _inputs(batch):
    return {k: v for k, v in batch.items() if k != "labels"}


@pytest.fixture(params=["bert", "xlmr"])
def family(request, tiny_bert_dir, tiny_xlmr_dir):
    model, tok = _load(tiny_bert_dir if request.param == "bert" else tiny_xlmr_dir)
    return model, tok


SPECS = [PruneSpec(ffn_dim=40),
         PruneSpec(ffn_dim=40, heads=2, hidden_size=16),
         PruneSpec(hidden_size=24, importance="first"),
         PruneSpec(ffn_dim=20, heads=4, hidden_size=28, scope="global", importance="magnitude"),
         PruneSpec(ffn_dim=48, hidden_size=20, importance="taylor", hidden_importance="first")]


@pytest.mark.parametrize("spec", SPECS, ids=["ffn", "ffn+heads+hidden", "hidden-first", "global", "mixed"])
def test_masked_equals_sliced(family, spec):
    model, tok = family
    batch = _batch(tok)
    scores = P.score_importance(model, [batch], method=spec.importance, hidden_method=spec.hidden_importance)
    masks = P.make_masks(model, scores, spec)
    masked = P.apply_masks(copy.deepcopy(model), masks)
    sliced = P.slice_model(masked, masks)
    k = masks.kept()
    assert sliced.config.hidden_size == k["hidden"] == (spec.hidden_size or 32)
    assert sliced.config.num_attention_heads == (spec.heads or 4)
    assert sliced.config.intermediate_size == max(k["ffn"])
    if spec.scope == "per_layer":
        assert k["ffn"] == [spec.ffn_dim or 64] * 4
    else:
        assert sum(k["ffn"]) == 4 * spec.ffn_dim
    assert sum(p.numel() for p in sliced.parameters()) < sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        a = masked(**_inputs(batch), output_hidden_states=True)
        b = sliced(**_inputs(batch), output_hidden_states=True)
        full = model(**_inputs(batch))
    hi = masks.hidden_index()
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=0)
    for ha, hb in zip(a.hidden_states, b.hidden_states):
        torch.testing.assert_close(ha[..., hi], hb, atol=1e-5, rtol=0)
        assert torch.all(ha[..., ~masks.hidden] == 0)
    assert (a.logits - full.logits).abs().max() > 1e-3  # pruning did change the function


def test_first_importance_keeps_first_units(tiny_bert_dir):
    model, _ = _load(tiny_bert_dir)
    scores = P.score_importance(model, method="first")
    masks = P.make_masks(model, scores, PruneSpec(ffn_dim=10, heads=2, hidden_size=12))
    assert masks.hidden.nonzero().flatten().tolist() == list(range(12))
    assert masks.ffn[2].nonzero().flatten().tolist() == list(range(10))
    assert masks.heads[0].tolist() == [True, True, False, False]
    assert masks.inner[0, 0].nonzero().flatten().tolist() == list(range(6))


def test_taylor_scores_follow_gradients(tiny_xlmr_dir):
    model, tok = _load(tiny_xlmr_dir)
    batch = _batch(tok)
    s1 = P.score_importance(model, [batch], method="taylor")
    s2 = P.score_importance(model, [batch, batch], method="taylor")
    assert s1.batches == 1 and s2.batches == 2
    torch.testing.assert_close(s2.ffn, 2 * s1.ffn, rtol=1e-5, atol=0)
    assert bool((s1.ffn > 0).all()) and bool((s1.hidden > 0).all())
    assert all(p.grad is None for p in model.parameters())
    # a custom loss on the output of layer 1 (hidden_states[2]) cannot depend on layer 3's FFN
    s3 = P.score_importance(model, [batch], loss_fn=lambda m, b: m(**_inputs(b), output_hidden_states=True)
                            .hidden_states[2].pow(2).mean())
    assert float(s3.ffn[3].abs().sum()) == 0.0 and float(s3.ffn[0].sum()) > 0


def test_pruned_weights_stay_zero_through_adamw(family):
    model, tok = family
    batch = _batch(tok)
    scores = P.score_importance(model, [batch], method="magnitude")
    masks = P.make_masks(model, scores, PruneSpec(ffn_dim=40, heads=2, hidden_size=16))
    model = copy.deepcopy(model).train()
    P.apply_masks(model, masks)
    # which entries are pruned: exactly the ones enforce_masks zeroes
    probe = copy.deepcopy(model)
    with torch.no_grad():
        for p in probe.parameters():
            p.fill_(1.0)
    P.enforce_masks(probe, masks)
    pruned = {n: (p == 0) for n, p in probe.named_parameters()}
    assert sum(int(z.sum()) for z in pruned.values()) > 0
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(4):
        opt.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        for n, p in model.named_parameters():
            assert torch.all(p.grad[pruned[n]] == 0), n
        opt.step()
    changed = 0
    for n, p in model.named_parameters():
        assert torch.all(p[pruned[n]] == 0), n
        changed += int((p[~pruned[n]] != before[n][~pruned[n]]).sum())
    assert changed > 0
    # still equal to the sliced form after training
    model.eval()
    sliced = P.slice_model(model, masks)
    with torch.no_grad():
        torch.testing.assert_close(model(**_inputs(batch)).logits, sliced(**_inputs(batch)).logits,
                                   atol=1e-5, rtol=0)


def test_enforce_and_remove_masks(tiny_bert_dir):
    model, tok = _load(tiny_bert_dir)
    masks = P.make_masks(model, P.score_importance(model, method="first"), PruneSpec(ffn_dim=32))
    P.apply_masks(model, masks)
    w = model.bert.encoder.layer[1].intermediate.dense.weight
    with torch.no_grad():
        w.add_(1.0)
    assert float(w.detach()[40:].abs().sum()) > 0
    n = P.enforce_masks(model, masks)
    assert n == 4 * 32 * (32 + 1 + 32)  # per layer: intermediate rows + biases + output columns
    assert float(w.detach()[32:].abs().sum()) == 0 and float(w.detach()[:32].abs().min()) > 0
    P.remove_masks(model)
    assert not model.bert.encoder.layer[1].intermediate._forward_hooks


def test_masks_round_trip_and_export(tiny_xlmr_dir, tmp_path):
    from transformers import AutoModelForMaskedLM

    model, tok = _load(tiny_xlmr_dir)
    batch = _batch(tok)
    spec = PruneSpec(ffn_dim=24, heads=2, hidden_size=12, scope="global")
    masks = P.make_masks(model, P.score_importance(model, [batch]), spec)
    P.save_masks(masks, tmp_path / "masks.safetensors")
    back = P.load_masks(tmp_path / "masks.safetensors")
    for key in ("ffn", "heads", "inner", "hidden"):
        assert torch.equal(getattr(back, key), getattr(masks, key))
    masked = P.apply_masks(copy.deepcopy(model), back)
    sliced = P.slice_model(masked, back)
    assert sliced.mlc_slice_report["ffn_padding"] == [max(masks.kept()["ffn"]) - n for n in masks.kept()["ffn"]]
    sliced.save_pretrained(tmp_path / "final")
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path / "final").eval()
    assert type(loaded) is type(model) and loaded.config.hidden_size == 12
    with torch.no_grad():
        torch.testing.assert_close(loaded(**_inputs(batch)).logits, masked(**_inputs(batch)).logits,
                                   atol=1e-5, rtol=0)
        assert torch.equal(loaded(**_inputs(batch)).logits, sliced(**_inputs(batch)).logits)


def test_bad_targets(tiny_bert_dir, tmp_path):
    model, tok = _load(tiny_bert_dir)
    scores = P.score_importance(model, method="magnitude")
    with pytest.raises(MlcError, match="prune.ffn_dim.*larger than the layer's FFN width 64"):
        P.make_masks(model, scores, PruneSpec(ffn_dim=65))
    with pytest.raises(MlcError, match="prune.heads.*larger than"):
        P.make_masks(model, scores, PruneSpec(heads=5))
    with pytest.raises(MlcError, match="prune.hidden_size"):
        P.make_masks(model, scores, PruneSpec(hidden_size=33))
    with pytest.raises(MlcError, match="head size"):
        P.make_masks(model, scores, PruneSpec(heads=2))  # 32/2 = 16 > head size 8
    with pytest.raises(MlcError, match="not divisible"):
        P.make_masks(model, scores, PruneSpec(heads=3, hidden_size=16))
    with pytest.raises(MlcError, match="at least one calibration batch"):
        P.score_importance(model, [], method="taylor")
    with pytest.raises(MlcError, match="not an mlc mask file|not found"):
        P.load_masks(tmp_path / "nothing.safetensors")
    other = copy.deepcopy(model)
    masks = P.make_masks(model, scores, PruneSpec(ffn_dim=8))
    masks.ffn = masks.ffn[:, :60]
    with pytest.raises(MlcError, match="shape"):
        P.apply_masks(other, masks)
    assert not other.bert.encoder.layer[0].intermediate._forward_hooks


def test_recipe_refuses_heads_the_stock_layout_cannot_hold(tiny_bert_dir):
    from mlc.errors import RecipeError
    from mlc.recipe import parse_recipe

    base = {"name": "t", "language": "swa", "teacher": {"source": str(tiny_bert_dir)},
            "corpus": {"sources": [{"kind": "text", "path": str(tiny_bert_dir / "config.json")}]},
            "distill": {"step1": {"steps": 1, "batch_size": 1, "lr": 1e-4, "losses": {"mlm": {"weight": 1.0}}},
                        "step2": {"steps": 1, "batch_size": 1, "lr": 1e-4, "losses": {"mlm": {"weight": 1.0}}}}}
    with pytest.raises(RecipeError, match="prune.heads: 2 heads at hidden size 32 would need head size 16"):
        parse_recipe({**base, "prune": {"heads": 2}})
    ok = parse_recipe({**base, "prune": {"heads": 2, "hidden_size": 16}})
    assert ok.prune.heads == 2


def test_max_batches_takes_no_more_than_needed(tiny_bert_dir):
    import itertools

    model, tok = _load(tiny_bert_dir)
    batch = _batch(tok)
    pulled = []

    def stream():
        for i in itertools.count():
            pulled.append(i)
            yield batch

    scores = P.score_importance(model, stream(), method="taylor", max_batches=2)
    assert scores.batches == 2 and pulled == [0, 1]
