"""A distillation step's export (the student, and step 2's sliced model) keeps the student's
sentence-transformers modules, the pooling fitted to the sliced hidden size."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from sentence_helpers import assert_sentence_model, tiny_sentence_folder

pytest.importorskip("sentence_transformers")


def test_step2_export_keeps_the_sentence_modules(tmp_path, one_torch_thread):
    from transformers import AutoModelForMaskedLM

    from mlc.distill.loop import _export
    from mlc.distill.plan import StepPlan
    from mlc.recipe import PruneSpec
    from mlc.surgery import prune as P

    student_dir = tiny_sentence_folder(tmp_path / "step1", "xlmr")
    model = AutoModelForMaskedLM.from_pretrained(str(student_dir)).eval()
    masks = P.make_masks(model, P.score_importance(model, method="magnitude"),
                         PruneSpec(ffn_dim=40, heads=2, hidden_size=16))
    P.enforce_masks(model, masks)  # step 2's invariant: the pruned weights are zero
    plan = StepPlan(step=2, key="distill.step2", teacher_dir=None, student_dir=student_dir,
                    shard_dir=tmp_path / "shards", out_dir=tmp_path / "step2", final_dir=tmp_path / "final",
                    masks_file=None)
    _export(SimpleNamespace(student=model), plan, stage3=False, rank=0, masks=masks, info={"step": 2})
    assert_sentence_model(plan.out_dir)
    assert json.loads((plan.final_dir / "1_Pooling" / "config.json").read_text())["word_embedding_dimension"] == 16
    assert_sentence_model(plan.final_dir)
