"""Integration: trimming the embedded multilingual-e5-small to the Swahili corpus vocabulary."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mlc.recipe import VocabSpec
from mlc.surgery.vocab import trim_vocabulary
from sentence_helpers import assert_sentence_model


@pytest.mark.integration
@pytest.mark.slow
def test_trim_e5_to_swahili(e5_teacher_dir, data_dir, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    from mlc.data.tasks import task_sentences
    from mlc.data.text import clean_stream, read_text_file

    sources = [("news", read_text_file(data_dir / "swa" / "raw" / "news.txt"))]
    sources += [(t, task_sentences(data_dir / "swa", t, "train")) for t in ("topic", "sentiment", "ner", "pos")]
    corpus = list(clean_stream(sources))
    heldout = task_sentences(data_dir / "swa", "topic", "dev")
    out = tmp_path / "trimmed"
    report = trim_vocabulary(e5_teacher_dir, out, {"swa": corpus}, VocabSpec(), heldout=heldout)
    assert 117_000_000 < report["parameters_before"] < 118_000_000
    assert report["parameters_after"] < 30_000_000
    assert 5_000 < report["tokens_kept"] < 30_000 and report["coverage"] == 1.0
    assert report["heldout"]["unk_rate"] < 0.01

    kept = np.load(out / "mlc_vocab_ids.npy")
    ta = AutoTokenizer.from_pretrained(e5_teacher_dir)
    tb = AutoTokenizer.from_pretrained(out)
    texts = ["query: " + s for s in corpus[::250][:24]]
    keep = set(kept.tolist())
    texts = [s for s in texts if set(ta(s)["input_ids"]) <= keep]
    assert len(texts) >= 20
    for s in texts:
        assert ta.tokenize(s) == tb.tokenize(s)
    a = AutoModel.from_pretrained(e5_teacher_dir).eval()
    ea = ta(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        ha = a(**ea, output_hidden_states=True).hidden_states
    del a
    b = AutoModel.from_pretrained(out).eval()
    assert sum(p.numel() for p in b.parameters()) == report["parameters_after"]
    eb = tb(texts, padding=True, return_tensors="pt")
    assert torch.equal(torch.as_tensor(kept)[eb["input_ids"]], ea["input_ids"])
    with torch.no_grad():
        hb = b(**eb, output_hidden_states=True).hidden_states
    assert len(ha) == 13
    for x, y in zip(ha, hb):
        assert torch.equal(x, y)
    # the import's sentence-transformers modules (mean, L2, e5's prompts) survive the trim
    assert_sentence_model(out, [s[len("query: "):] for s in texts[:8]])
