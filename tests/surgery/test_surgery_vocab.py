"""Vocabulary trimming: same segmentation and bit-identical hidden states on covered text, both families."""
from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
import torch

from mlc.errors import MlcError
from mlc.models.tiny import SAMPLE_SENTENCES
from mlc.recipe import VocabSpec
from mlc.surgery.vocab import trim_vocabulary

CORPUS = SAMPLE_SENTENCES[:8]
HELDOUT = SAMPLE_SENTENCES[8:]


def _load(folder, head=True):
    from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer

    cls = AutoModelForMaskedLM if head else AutoModel
    return cls.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def _covered(tok, kept, sentences):
    kept = set(kept.tolist())
    return [s for s in sentences if all(i in kept for i in tok(s)["input_ids"])]


@pytest.fixture(params=["bert", "xlmr"])
def src(request, tiny_bert_dir, tiny_xlmr_dir):
    return tiny_bert_dir if request.param == "bert" else tiny_xlmr_dir


def test_trim_keeps_segmentation_and_hidden_states(src, tmp_path):
    out = tmp_path / "trimmed"
    report = trim_vocabulary(src, out, {"swa": CORPUS}, VocabSpec(), heldout=HELDOUT)
    kept = np.load(out / "mlc_vocab_ids.npy")
    a, ta = _load(src)
    b, tb = _load(out)
    assert report["tokens_kept"] == len(kept) == b.config.vocab_size == len(tb) < a.config.vocab_size
    assert report["coverage"] == 1.0 and report["parameters_after"] < report["parameters_before"]
    assert report["parameters_after"] == sum(p.numel() for p in b.parameters())
    # new sentences made of corpus words: their original tokens are all kept
    rng = random.Random(0)
    words = " ".join(CORPUS).split()
    mixed = [" ".join(rng.sample(words, 8)) for _ in range(6)]
    texts = _covered(ta, kept, CORPUS + mixed + HELDOUT)
    assert len(texts) >= len(CORPUS) + 4
    for s in texts:
        assert ta.tokenize(s) == tb.tokenize(s)
        assert [int(kept[i]) for i in tb(s)["input_ids"]] == ta(s)["input_ids"]
    ea = ta(texts, padding=True, return_tensors="pt")
    eb = tb(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        oa = a(**ea, output_hidden_states=True)
        ob = b(**eb, output_hidden_states=True)
    for ha, hb in zip(oa.hidden_states, ob.hidden_states):
        assert torch.equal(ha, hb)
    # the MLM head is re-indexed (weight and bias), not truncated: logits are the kept columns
    assert torch.equal(ob.logits, oa.logits[..., torch.as_tensor(kept)])
    assert b.get_output_embeddings().weight is b.get_input_embeddings().weight
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if getattr(a.config, key) is not None:
            assert int(kept[getattr(b.config, key)]) == getattr(a.config, key)
    assert tb.pad_token_id == b.config.pad_token_id and tb.mask_token == ta.mask_token
    # unseen words still split into kept pieces (every character of the corpus is kept)
    unseen = "Wanafunzi walikula mahindi mazuri sana"
    assert tb.unk_token_id not in tb(unseen)["input_ids"]
    # the held-out <unk> rate is what the trimmed tokenizer gives
    ids = [i for s in HELDOUT for i in tb(s, add_special_tokens=False)["input_ids"]]
    assert report["heldout"]["unk_rate"] == pytest.approx(ids.count(tb.unk_token_id) / len(ids))
    assert json.loads((out / "mlc_vocab.json").read_text())["tokens_kept"] == len(kept)


def test_sentencepiece_model_agrees(tiny_xlmr_dir, tmp_path):
    import sentencepiece as spm

    out = tmp_path / "trimmed"
    trim_vocabulary(tiny_xlmr_dir, out, {"swa": CORPUS[:4]}, VocabSpec())
    _, tb = _load(out)
    sp = spm.SentencePieceProcessor(model_file=str(out / "sentencepiece.bpe.model"))
    sp_old = spm.SentencePieceProcessor(model_file=str(tiny_xlmr_dir / "sentencepiece.bpe.model"))
    assert sp.get_piece_size() < sp_old.get_piece_size()
    for s in CORPUS + HELDOUT + ["Wanafunzi walikula mahindi mazuri"]:
        ids = tb(s, add_special_tokens=False)["input_ids"]
        assert sp.encode(s) == ids  # this folder's SentencePiece ids equal the fast ids
        pieces = sp.encode(s, out_type=str)
        fast = tb.convert_ids_to_tokens(ids)
        assert [p if i != tb.unk_token_id else "<unk>" for p, i in zip(pieces, ids)] == fast


def test_rules_and_several_languages(tiny_bert_dir, tmp_path):
    a = trim_vocabulary(tiny_bert_dir, tmp_path / "top", {"swa": CORPUS}, VocabSpec(top_n=10))
    assert a["languages"]["swa"]["kept_by_rule"] == 10 and a["coverage"] < 1
    c = trim_vocabulary(tiny_bert_dir, tmp_path / "cov", {"swa": CORPUS}, VocabSpec(coverage=0.5))
    assert 0.5 <= c["languages"]["swa"]["coverage"] < 0.7
    m = trim_vocabulary(tiny_bert_dir, tmp_path / "min", {"swa": CORPUS}, VocabSpec(min_count=2))
    assert m["tokens_kept"] < trim_vocabulary(tiny_bert_dir, tmp_path / "all", {"swa": CORPUS},
                                              VocabSpec())["tokens_kept"]
    both = trim_vocabulary(tiny_bert_dir, tmp_path / "both", {"swa": CORPUS[:3], "nya": [SAMPLE_SENTENCES[10]]},
                           VocabSpec())
    kept = set(np.load(tmp_path / "both" / "mlc_vocab_ids.npy").tolist())
    one = set(np.load(tmp_path / "all" / "mlc_vocab_ids.npy").tolist())
    _, tok = _load(tiny_bert_dir)
    assert set(tok(SAMPLE_SENTENCES[10])["input_ids"]) <= kept
    assert set(tok(CORPUS[0])["input_ids"]) <= kept
    assert set(both["languages"]) == {"swa", "nya"} and kept != one


def test_folder_without_mlm_head(tiny_bert_dir, tmp_path):
    from transformers import AutoModel

    enc = tmp_path / "encoder"
    shutil.copytree(tiny_bert_dir, enc)
    AutoModel.from_pretrained(tiny_bert_dir).save_pretrained(enc)  # drops the MLM head
    trim_vocabulary(enc, tmp_path / "out", {"swa": CORPUS}, VocabSpec())
    a, ta = _load(enc, head=False)
    b, tb = _load(tmp_path / "out", head=False)
    with torch.no_grad():
        ha = a(**ta(CORPUS, padding=True, return_tensors="pt")).last_hidden_state
        hb = b(**tb(CORPUS, padding=True, return_tensors="pt")).last_hidden_state
    assert torch.equal(ha, hb)


def test_bad_input_writes_nothing(tiny_bert_dir, tiny_xlmr_dir, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(MlcError, match="'swa' has no text"):
        trim_vocabulary(tiny_bert_dir, out, {"swa": ["", "   "]}, VocabSpec())
    with pytest.raises(MlcError, match="no corpus"):
        trim_vocabulary(tiny_bert_dir, out, {}, VocabSpec())
    # a byte-level BPE tokenizer is not supported
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    bpe = tmp_path / "bpe"
    shutil.copytree(tiny_bert_dir, bpe)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=200))
    tok.save(str(bpe / "tokenizer.json"))
    with pytest.raises(MlcError, match="tokenizer type 'BPE' is not supported"):
        trim_vocabulary(bpe, out, {"swa": CORPUS}, VocabSpec())
    with pytest.raises(MlcError, match="config.json"):
        trim_vocabulary(tmp_path / "missing", out, {"swa": CORPUS}, VocabSpec())
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_damaged_tokenizer_or_weights_are_errors_naming_the_file(tiny_bert_dir, tmp_path):
    """Fault probe rerun: `mlc trim` on a teacher whose tokenizer.json was cut short gave a JSONDecodeError
    traceback, on one whose model.safetensors was cut short a SafetensorError traceback."""
    out = tmp_path / "out"
    bad = tmp_path / "bad"
    shutil.copytree(tiny_bert_dir, bad)
    text = (bad / "tokenizer.json").read_text()
    (bad / "tokenizer.json").write_text(text[: len(text) // 2])
    with pytest.raises(MlcError, match=r"tokenizer.json: invalid JSON at line \d+"):
        trim_vocabulary(bad, out, {"swa": CORPUS}, VocabSpec())
    (bad / "tokenizer.json").write_text(text)
    weights = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(weights[:3000])
    with pytest.raises(MlcError, match=r"model.safetensors: not a readable safetensors file"):
        trim_vocabulary(bad, out, {"swa": CORPUS}, VocabSpec())
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
