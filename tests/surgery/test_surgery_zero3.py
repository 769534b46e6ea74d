"""The masked form under DeepSpeed ZeRO-3 (one CPU rank: parameters are still partitioned into
placeholders and gathered by DeepSpeed's module hooks): pruned weights stay exactly zero through AdamW steps
with weight decay and gradient clipping, and the trained masked model still equals its sliced form.

Run by pytest, this file launches itself under the deepspeed launcher (the ``__main__`` block is the worker).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def _worker(src: str, out: str) -> None:
    import deepspeed
    import torch
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from mlc.models.tiny import SAMPLE_SENTENCES
    from mlc.recipe import PruneSpec
    from mlc.surgery import prune as P

    torch.manual_seed(0)
    model = AutoModelForMaskedLM.from_pretrained(src)
    tok = AutoTokenizer.from_pretrained(src)
    enc = dict(tok(SAMPLE_SENTENCES[:4], padding=True, return_tensors="pt"))
    inputs = dict(enc)
    enc["labels"] = enc["input_ids"].clone()
    masks = P.make_masks(model, P.score_importance(model, method="magnitude"),
                         PruneSpec(ffn_dim=40, heads=2, hidden_size=16))
    P.apply_masks(model, masks)
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 3}, "gradient_clipping": 1.0}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    first = None
    for _ in range(3):
        loss = engine(**enc).loss
        engine.backward(loss)
        engine.step()
        first = first if first is not None else float(loss)
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
        state = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
        engine.module.eval()
        with torch.no_grad():
            masked_logits = engine.module(**inputs).logits
    probe = AutoModelForMaskedLM.from_pretrained(src)
    with torch.no_grad():
        for p in probe.parameters():
            p.fill_(1.0)
    P.enforce_masks(probe, masks)
    pruned = {n: p == 0 for n, p in probe.named_parameters()}
    nonzero = sum(int((state[n][pruned[n]] != 0).sum()) for n in state)
    plain = AutoModelForMaskedLM.from_pretrained(src)
    plain.load_state_dict(state, strict=False)
    plain.tie_weights()
    P.apply_masks(plain, masks)
    sliced = P.slice_model(plain.eval(), masks)
    with torch.no_grad():
        diff = float((sliced(**inputs).logits - masked_logits).abs().max())
    if int(os.environ.get("RANK", "0")) == 0:
        with open(out, "w") as f:
            json.dump({"nonzero_pruned": nonzero, "pruned": sum(int(z.sum()) for z in pruned.values()),
                       "diff": diff, "first_loss": first, "last_loss": float(loss)}, f)


@pytest.mark.distributed
@pytest.mark.slow
def test_masks_under_zero3(tiny_bert_dir, tmp_path):
    out = tmp_path / "result.json"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port",
           str(29500 + os.getpid() % 1000), __file__, str(tiny_bert_dir), str(out)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    r = json.loads(out.read_text())
    assert r["pruned"] > 0 and r["nonzero_pruned"] == 0
    assert r["diff"] < 1e-5
    assert r["last_loss"] != r["first_loss"]  # it did train


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    _worker(*args)
