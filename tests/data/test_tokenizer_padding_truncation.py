"""A tokenizer.json that sets padding and truncation: trimming and packing ignore both, and the trimmed
tokenizer.json keeps them (mlc.surgery.vocab, mlc.data.shards)."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from mlc.models.tiny import SAMPLE_SENTENCES
from mlc.recipe import ShardSpec, VocabSpec

LIMIT = 128  # the tokenizer.json's fixed padding length and truncation length


def _plain(path):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    tok.no_padding()
    tok.no_truncation()
    return tok


@pytest.fixture(scope="module")
def padded_bert(tmp_path_factory):
    """The tiny BERT (positions for 512 tokens) whose tokenizer.json pads to 128 and truncates at 128; and a
    text far longer than 128 tokens, whose second half has words the first does not."""
    from tokenizers import Tokenizer

    from mlc.models.tiny import tiny_bert

    folder = tmp_path_factory.mktemp("padded-bert")
    tiny_bert(folder, max_positions=512)
    path = folder / "tokenizer.json"
    tok = Tokenizer.from_file(str(path))
    long_text = " ".join(SAMPLE_SENTENCES[:10] * 2)
    assert len(tok.encode(long_text, add_special_tokens=False).ids) > 2 * LIMIT
    tok.enable_padding(length=LIMIT, pad_id=tok.token_to_id("[PAD]"), pad_token="[PAD]")
    tok.enable_truncation(max_length=LIMIT)
    tok.save(str(path))
    saved = json.loads(path.read_text(encoding="utf-8"))
    assert saved["padding"]["strategy"] == {"Fixed": LIMIT} and saved["truncation"]["max_length"] == LIMIT
    return folder, long_text


def test_trimming_ignores_padding_and_truncation_and_keeps_them(padded_bert, tmp_path):
    from transformers import AutoModel

    from mlc.surgery.vocab import trim_vocabulary

    src, long_text = padded_bert
    # the corpus: the long text, whose tokens past 128 (the later sentences) must be counted too
    late = " ".join(SAMPLE_SENTENCES[5:10])
    corpus = [" ".join(SAMPLE_SENTENCES[:10])]
    out = tmp_path / "trimmed"
    report = trim_vocabulary(src, out, {"swa": corpus}, VocabSpec())
    kept = np.load(out / "mlc_vocab_ids.npy")
    old, new = _plain(src / "tokenizer.json"), _plain(out / "tokenizer.json")
    pad = old.token_to_id("[PAD]")
    for text in (corpus[0], late, long_text):
        a, b = old.encode(text).ids, new.encode(text).ids
        assert len(a) > LIMIT or text == late
        assert [int(kept[i]) for i in b] == a  # the same tokens, all of them, remapped
    assert report["corpus_tokens"] == len(old.encode(corpus[0], add_special_tokens=False).ids)  # no [PAD]
    # the trimmed model gives the same hidden states on the long text, beyond 128 tokens
    ma, mb = AutoModel.from_pretrained(src).eval(), AutoModel.from_pretrained(out).eval()
    ia, ib = torch.tensor([old.encode(long_text).ids]), torch.tensor([new.encode(long_text).ids])
    with torch.no_grad():
        ha = ma(input_ids=ia, output_hidden_states=True).hidden_states
        hb = mb(input_ids=ib, output_hidden_states=True).hidden_states
    assert all(torch.equal(x, y) for x, y in zip(ha, hb))
    # the user's padding and truncation stay in the trimmed tokenizer.json, padding with the new [PAD] id
    before = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    after = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    assert after["truncation"] == before["truncation"]
    assert after["padding"] == {**before["padding"], "pad_id": int(np.nonzero(kept == pad)[0][0])}
    from tokenizers import Tokenizer

    padded = Tokenizer.from_file(str(out / "tokenizer.json")).encode("Mvua kubwa").ids
    assert len(padded) == LIMIT and padded[-1] == after["padding"]["pad_id"]


def test_shards_ignore_padding_and_truncation(padded_bert, tmp_path):
    from mlc.data.shards import prepare_shards, read_manifest
    from mlc.data.stream import decode_member, read_shard

    src, long_text = padded_bert
    sentences = list(SAMPLE_SENTENCES) + [long_text]
    manifest = prepare_shards(sentences, src, tmp_path / "shards",
                              ShardSpec(seq_len=64, sequences_per_sample=4, samples_per_shard=4))
    m = read_manifest(tmp_path / "shards")
    tok = m["tokenizer"]
    plain = _plain(src / "tokenizer.json")
    expected = Counter(i for s in sentences for i in plain.encode(s, add_special_tokens=False).ids)
    assert manifest["content_tokens"] == sum(expected.values())  # nothing cut at 128, no padding counted
    packed: Counter = Counter()
    for entry in m["shards"]:
        for sample in read_shard(tmp_path / "shards" / entry["name"]):
            ids, lengths, _ = decode_member(sample, m["seq_len"], tok["vocab_size"])
            for row, n in zip(ids, lengths):
                attended = row[:n].tolist()
                assert tok["pad_id"] not in attended  # no [PAD] packed as text
                packed.update(i for i in attended if i not in (tok["cls_id"], tok["sep_id"]))
    assert packed == expected  # every token of every sentence, the long one's end included
