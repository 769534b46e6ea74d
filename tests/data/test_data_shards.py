"""Packing, shard writing, the manifest and the tokenizer hash (mlc.data.shards)."""
from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest

from mlc.data.shards import (MANIFEST, Packer, check_tokenizer, load_tokenizer, prepare_shards, read_manifest,
                             tokenizer_hash, verify_shards)
from mlc.data.stream import decode_member, read_shard
from mlc.errors import MlcError
from mlc.models.tiny import SAMPLE_SENTENCES
from mlc.recipe import ShardSpec

CLS, SEP, PAD = 101, 102, 0


def corpus(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = rng.choice(SAMPLE_SENTENCES).split()
        out.append(" ".join(words[: rng.randint(1, len(words))]) + f" namba {i}")
    return out


def read_all(shard_dir):
    manifest = read_manifest(shard_dir)
    ids, lengths, wst = [], [], []
    for entry in manifest["shards"]:
        for sample in read_shard(shard_dir / entry["name"]):
            a, b, c = decode_member(sample, manifest["seq_len"], manifest["tokenizer"]["vocab_size"])
            ids.append(a), lengths.append(b), wst.append(c)
    return manifest, np.concatenate(ids), np.concatenate(lengths), np.concatenate(wst)


def segments(row: np.ndarray, length: int) -> list[list[int]]:
    assert row[0] == CLS and row[length - 1] == SEP
    out, cur = [], []
    for t in row[1:length]:
        if t == SEP:
            out.append(cur)
            cur = []
        else:
            cur.append(int(t))
    return out


# --- packing ----------------------------------------------------------------------------------------

def test_packing_keeps_sentences_whole_and_frames_them():
    rng = np.random.default_rng(0)
    seq_len = 16
    sentences = [rng.integers(200, 300, size=n) for n in rng.integers(1, 14, size=300)]  # all fit (<= 14)
    sentences.append(np.arange(200, 240))  # 40 tokens: longer than a sequence, must be split
    sentences += [rng.integers(200, 300, size=n) for n in rng.integers(1, 10, size=50)]
    packer = Packer(seq_len, CLS, SEP, PAD)
    rows = []
    for s in sentences:
        rows += packer.add(s, np.ones(len(s), dtype=np.uint8)).sequences()
    rows += packer.flush().sequences()

    found = []
    for ids, wst, length in rows:
        assert ids.shape == (seq_len,) and wst.shape == (seq_len,)
        assert ids[0] == CLS and ids[length - 1] == SEP
        assert (ids[length:] == PAD).all() and (wst[length:] == 0).all()
        assert CLS not in ids[1:]
        found += segments(ids, length)
    whole = [list(map(int, s)) for s in sentences if len(s) <= seq_len - 2]
    long = list(range(200, 240))
    pieces = [f for f in found if f not in whole]
    # every sentence that fits appears whole; only the long one is cut, into full pieces and a rest
    assert sorted(map(tuple, [f for f in found if f in whole])) == sorted(map(tuple, whole))
    assert sorted(sum(pieces, [])) == long and [len(p) for p in pieces] == [14, 14, 12]
    assert packer.split_sentences == 1 and packer.pieces == len(found)
    # first-fit packing leaves little padding
    assert sum(r[2] for r in rows) / (len(rows) * seq_len) > 0.85


def test_packing_exact_multiple_is_not_given_an_empty_piece():
    packer = Packer(8, CLS, SEP, PAD)
    rows = packer.add(np.arange(300, 312), np.ones(12, dtype=np.uint8)).sequences() + packer.flush().sequences()
    assert [r[2] for r in rows] == [8, 8]
    assert [segments(r[0], r[2]) for r in rows] == [[list(range(300, 306))], [list(range(306, 312))]]


# --- prepare_shards ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bert_shards(tiny_bert_dir, tmp_path_factory):
    sents = corpus(600)
    out = tmp_path_factory.mktemp("shards") / "bert"
    manifest = prepare_shards(iter(sents), tiny_bert_dir, out,
                              ShardSpec(seq_len=24, sequences_per_sample=8, samples_per_shard=4),
                              settings={"corpus": {"kept": len(sents)}})
    return sents, out, manifest


def test_manifest_counts_match_the_input_and_the_shards(bert_shards, tiny_bert_dir):
    sents, out, manifest = bert_shards
    assert manifest == json.loads((out / MANIFEST).read_text())
    assert manifest["sentences"] == len(sents) and manifest["empty_sentences"] == 0
    tok = load_tokenizer(tiny_bert_dir)
    lengths = [len(tok(s, add_special_tokens=False)["input_ids"]) for s in sents]
    assert manifest["content_tokens"] == sum(lengths)
    assert manifest["split_sentences"] == sum(n > 22 for n in lengths)

    _, ids, lens, wst = read_all(out)
    assert len(ids) == manifest["sequences"] == sum(s["sequences"] for s in manifest["shards"])
    assert int(lens.sum()) == manifest["tokens"] == sum(s["tokens"] for s in manifest["shards"])
    assert manifest["tokens"] == manifest["content_tokens"] + manifest["sequences"] + manifest["sentence_pieces"]
    assert manifest["padding_tokens"] == len(ids) * 24 - manifest["tokens"]
    assert manifest["samples"] == sum(s["samples"] for s in manifest["shards"])
    assert all(s["samples"] <= 4 for s in manifest["shards"]) and len(manifest["shards"]) >= 3
    for entry in manifest["shards"]:
        assert (out / entry["name"]).stat().st_size == entry["bytes"]
    assert verify_shards(out) == []
    assert manifest["tokenizer"]["hash"] == tokenizer_hash(tiny_bert_dir)
    assert manifest["settings"]["corpus"] == {"kept": len(sents)}
    assert manifest["settings"]["shards"]["seq_len"] == 24
    assert manifest["dtype"] == "uint16"

    # the special tokens frame every sequence, the sentences' own tokens are all there
    cls, sep = tok.cls_token_id, tok.sep_token_id
    assert (ids[:, 0] == cls).all()
    assert (ids[np.arange(len(ids)), lens - 1] == sep).all()
    assert all((ids[i, lens[i]:] == tok.pad_token_id).all() for i in range(len(ids)))
    content = ids[(ids != cls) & (ids != sep) & (ids != tok.pad_token_id)]
    expected = np.concatenate([tok(s, add_special_tokens=False)["input_ids"] for s in sents])
    assert np.array_equal(np.sort(content), np.sort(expected))


def test_word_starts_mark_wordpiece_continuations(bert_shards, tiny_bert_dir):
    _, out, _ = bert_shards
    _, ids, lens, wst = read_all(out)
    tok = load_tokenizer(tiny_bert_dir)
    tokens = tok.convert_ids_to_tokens(ids[0, :lens[0]].tolist())
    for i, t in enumerate(tokens):
        assert wst[0, i] == (0 if t.startswith("##") else 1), (i, t)
    assert (wst[0, lens[0]:] == 0).all()


@pytest.mark.parametrize("family", ["bert", "xlmr"])
def test_word_start_table_gives_the_word_indices_flags(family, tiny_bert_dir, tiny_xlmr_dir):
    """The table lookup (WordPiece '##', SentencePiece '\u2581') gives exactly the flags read from the word
    indices, and is not used where it would not: text with the marker itself, an added token's text, or an
    unknown piece (the unguarded table differs from the indices there)."""
    from mlc.data.shards import WordStarts, _arrays, encoding_backend

    folder = tiny_bert_dir if family == "bert" else tiny_xlmr_dir
    tok = load_tokenizer(folder)
    backend = encoding_backend(folder, tok)
    ws = WordStarts(tok, json.loads(backend.to_str()))
    assert ws.table is not None
    plain = list(SAMPLE_SENTENCES)  # the tiny vocabularies were built from them: no unknown piece
    enc = backend.encode_batch(plain, add_special_tokens=False)
    ids = np.array([i for e in enc for i in e.ids])
    assert ws.applies(plain, ids)
    by_indices, by_table = _arrays(enc), _arrays(enc, ws, plain)
    for a, b in zip(by_indices, by_table):  # ids, flags, lengths
        assert a.tolist() == b.tolist()
    odd = ["neno " + tok.mask_token + "jingine", "abc \u2581 x\u2581y" if family == "xlmr" else "abc ##x y",
           "\ua66e\ua66e mvua\ua66e"]
    unguarded = WordStarts(tok, json.loads(backend.to_str()))
    unguarded.guards, unguarded.unk_id = (), None
    differs = 0
    for text in odd:
        enc = backend.encode_batch([text], add_special_tokens=False)
        assert not ws.applies([text], np.array(enc[0].ids)) or text.startswith("abc ##")
        assert _arrays(enc)[1].tolist() == _arrays(enc, ws, [text])[1].tolist()
        differs += _arrays(enc)[1].tolist() != _arrays(enc, unguarded, [text])[1].tolist()
    if family == "xlmr":  # there the guards are needed (WordPiece happens to agree on these texts)
        assert differs >= 1


def test_same_input_gives_identical_shards(bert_shards, tiny_bert_dir, tmp_path):
    sents, _, manifest = bert_shards
    again = prepare_shards(sents, tiny_bert_dir, tmp_path / "again",
                           ShardSpec(seq_len=24, sequences_per_sample=8, samples_per_shard=4),
                           settings={"corpus": {"kept": len(sents)}})
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in manifest["shards"]]


def test_parallel_tokenization_gives_the_same_shards(tiny_xlmr_dir, tmp_path):
    sents = corpus(1500, seed=3)
    spec = dict(seq_len=32, sequences_per_sample=16, samples_per_shard=4)
    one = prepare_shards(sents, tiny_xlmr_dir, tmp_path / "one", ShardSpec(**spec))
    two = prepare_shards(sents, tiny_xlmr_dir, tmp_path / "two", ShardSpec(**spec, processes=2))
    assert one["sentences"] == two["sentences"] == 1500
    assert [s["sha256"] for s in one["shards"]] == [s["sha256"] for s in two["shards"]]
    assert one["tokenizer"]["cls_id"] == 0 and one["tokenizer"]["sep_id"] == 2 and one["tokenizer"]["pad_id"] == 1


def test_empty_corpus_is_an_error_and_writes_nothing(tiny_bert_dir, tmp_path):
    with pytest.raises(MlcError, match="no sentence"):
        prepare_shards([], tiny_bert_dir, tmp_path / "empty", ShardSpec())
    assert not (tmp_path / "empty").exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_failure_keeps_the_previous_output(bert_shards, tiny_bert_dir, tmp_path):
    _, out, manifest = bert_shards
    target = tmp_path / "kept"
    shutil.copytree(out, target)

    def broken():
        yield "Habari ya asubuhi"
        raise MlcError("reader failed", "x.txt:2")

    with pytest.raises(MlcError, match="reader failed"):
        prepare_shards(broken(), tiny_bert_dir, target, ShardSpec(seq_len=24))
    assert read_manifest(target) == manifest


def test_verify_shards_finds_a_changed_shard(bert_shards, tmp_path):
    _, out, manifest = bert_shards
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    name = manifest["shards"][1]["name"]
    data = bytearray((copy / name).read_bytes())
    data[700] ^= 0xFF
    (copy / name).write_bytes(bytes(data))
    assert verify_shards(copy) == [name]


# --- the tokenizer hash ---------------------------------------------------------------------------

def test_tokenizer_hash_follows_meaning_not_files(tiny_bert_dir, tiny_xlmr_dir, tmp_path):
    h = tokenizer_hash(tiny_bert_dir)
    assert h.startswith("sha256:") and h == tokenizer_hash(tiny_bert_dir)
    load_tokenizer(tiny_bert_dir).save_pretrained(tmp_path / "resaved")
    assert tokenizer_hash(tmp_path / "resaved") == h
    assert tokenizer_hash(tiny_xlmr_dir) != h
    # one more token changes the ids' meaning
    tok = load_tokenizer(tiny_bert_dir)
    tok.add_tokens(["mpyaneno"])
    tok.save_pretrained(tmp_path / "grown")
    assert tokenizer_hash(tmp_path / "grown") != h


def test_check_tokenizer_refuses_another_tokenizer_naming_both_hashes(bert_shards, tiny_bert_dir, tiny_xlmr_dir):
    _, out, manifest = bert_shards
    assert check_tokenizer(out, tiny_bert_dir) == manifest["tokenizer"]["hash"]
    with pytest.raises(MlcError) as e:
        check_tokenizer(out, tiny_xlmr_dir)
    assert manifest["tokenizer"]["hash"] in str(e.value) and tokenizer_hash(tiny_xlmr_dir) in str(e.value)


def test_not_a_shard_folder(tmp_path):
    with pytest.raises(MlcError, match="manifest.json"):
        read_manifest(tmp_path)


def test_packing_many_sentences_at_once_equals_one_by_one():
    """add_many over flat arrays (what prepare_shards calls per chunk) packs exactly as add per sentence,
    with empty and over-long sentences among them."""
    rng = np.random.default_rng(5)
    lengths = rng.integers(0, 30, size=400)
    lengths[[3, 50, 51]] = [0, 44, 28]  # empty, longer than two sequences, an exact multiple of the room
    ids = rng.integers(200, 300, size=int(lengths.sum()))
    starts = rng.integers(0, 2, size=len(ids)).astype(np.uint8)
    one, many = Packer(16, CLS, SEP, PAD, window=4), Packer(16, CLS, SEP, PAD, window=4)
    rows_one, at = [], 0
    for n in lengths:
        rows_one += one.add(ids[at:at + n], starts[at:at + n]).sequences()
        at += n
    rows_one += one.flush().sequences()
    half = int(lengths[:200].sum())
    rows_many = (many.add_many(ids[:half], starts[:half], lengths[:200]).sequences()
                 + many.add_many(ids[half:], starts[half:], lengths[200:]).sequences() + many.flush().sequences())
    assert len(rows_one) == len(rows_many) > 100
    for (a_ids, a_wst, a_len), (b_ids, b_wst, b_len) in zip(rows_one, rows_many):
        assert a_len == b_len and a_ids.tolist() == b_ids.tolist() and a_wst.tolist() == b_wst.tolist()
    assert (one.split_sentences, one.pieces, one.empty) == (many.split_sentences, many.pieces, many.empty)
    assert many.empty == int((lengths == 0).sum()) and many.split_sentences == int((lengths > 14).sum())


def _first_fit_reference(lengths, ids, starts, seq_len, window):
    """First-fit packing written plainly, one sequence list at a time (what the packer's scatter must equal)."""
    room, open_, closed, at = seq_len - 2, [], [], 0

    def finish(parts):
        row_ids, row_wst = [CLS], [1]
        for p_ids, p_wst in parts:
            row_ids += p_ids + [SEP]
            row_wst += [1] + p_wst[1:] + [1]
        return row_ids + [PAD] * (seq_len - len(row_ids)), row_wst + [0] * (seq_len - len(row_wst)), len(row_ids)

    for n in lengths:
        s_ids, s_wst, at = ids[at:at + n].tolist(), starts[at:at + n].tolist(), at + n
        while len(s_ids) > room:
            closed.append(finish([(s_ids[:room], s_wst[:room])]))
            s_ids, s_wst = s_ids[room:], s_wst[room:]
        if not s_ids:
            continue
        fills = [1 + sum(len(p) + 1 for p, _ in parts) for parts in open_]
        fit = next((i for i, f in enumerate(fills) if f + len(s_ids) + 1 <= seq_len), None)
        if fit is not None:
            open_[fit].append((s_ids, s_wst))
            continue
        if len(open_) >= window:
            closed.append(finish(open_.pop(fills.index(max(fills)))))
        open_.append([(s_ids, s_wst)])
    return closed + [finish(parts) for parts in open_]


def test_packing_equals_a_plain_first_fit():
    rng = np.random.default_rng(11)
    lengths = rng.integers(0, 40, size=600)
    ids = rng.integers(200, 300, size=int(lengths.sum()))
    starts = rng.integers(0, 2, size=len(ids)).astype(np.uint8)
    packer, rows, at = Packer(24, CLS, SEP, PAD, window=5), [], 0
    for k in range(0, 600, 97):  # calls of several sizes, open sequences carried between them
        n = int(lengths[k:k + 97].sum())
        rows += packer.add_many(ids[at:at + n], starts[at:at + n], lengths[k:k + 97]).sequences()
        at += n
    rows += packer.flush().sequences()
    expected = _first_fit_reference(lengths, ids, starts, 24, 5)
    assert len(rows) == len(expected) > 300
    for (r_ids, r_wst, r_len), (e_ids, e_wst, e_len) in zip(rows, expected):
        assert (r_ids.tolist(), r_wst.tolist(), r_len) == (e_ids, e_wst, e_len)
