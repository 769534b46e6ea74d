"""The streaming loader (mlc.data.stream): determinism, resume, masking, damage, tokenizer refusal."""
from __future__ import annotations

import random
import shutil
import warnings

import numpy as np
import pytest
import torch

from mlc.data.shards import prepare_shards, read_manifest
from mlc.data.stream import DamagedDataWarning, ShardStream, mlm_mask
from mlc.errors import MlcError
from mlc.models.tiny import SAMPLE_SENTENCES
from mlc.recipe import ShardSpec


def tag(i: int) -> str:
    """A word made of letters the tiny tokenizers know (digits would all be <unk>)."""
    letters = "abdeghiklmnoprstuwy"
    return "".join(letters[(i // len(letters) ** k) % len(letters)] for k in range(3))


def corpus(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = rng.choice(SAMPLE_SENTENCES).split()
        out.append(f"{tag(i)} " + " ".join(words[: rng.randint(1, 5)]))  # short enough never to be split
    return out


@pytest.fixture(scope="module")
def shards(tiny_xlmr_dir, tmp_path_factory):
    """About 10 shards, the last one smaller than the others."""
    out = tmp_path_factory.mktemp("stream") / "shards"
    manifest = prepare_shards(corpus(1200), tiny_xlmr_dir, out,
                              ShardSpec(seq_len=40, sequences_per_sample=8, samples_per_shard=5))
    sizes = [s["sequences"] for s in manifest["shards"]]
    assert manifest["split_sentences"] == 0  # so every packed sequence is unique
    assert 3 not in np.concatenate([t for t in _all_ids(out)])  # no <unk>: the tags tell sentences apart
    assert len(sizes) >= 6 and sizes[-1] < sizes[0]
    return out


def _all_ids(shard_dir):
    from mlc.data.stream import decode_member, read_shard

    m = read_manifest(shard_dir)
    return [decode_member(x, m["seq_len"], m["tokenizer"]["vocab_size"])[0].ravel()
            for e in m["shards"] for x in read_shard(shard_dir / e["name"])]


def rows(batches, key="original_ids"):
    return [tuple(r.tolist()) for b in batches for r in b[key]]


def same(a, b) -> bool:
    return len(a) == len(b) and all(all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def test_batches_are_well_formed(shards):
    s = ShardStream(shards, batch_size=6, seed=1, samples_per_epoch=60, workers=0)
    batches = list(s)
    assert len(batches) == len(s) == 10
    manifest = read_manifest(shards)
    tok = manifest["tokenizer"]
    for b in batches:
        assert set(b) == {"input_ids", "labels", "attention_mask", "original_ids"}
        assert all(t.shape == (6, 40) and t.dtype == torch.int64 for t in b.values())
        chosen = b["labels"] != -100
        assert torch.equal(b["labels"][chosen], b["original_ids"][chosen])
        assert torch.equal(b["input_ids"][~chosen], b["original_ids"][~chosen])
        assert (chosen.sum(1) >= 1).all()
        assert (b["original_ids"][:, 0] == tok["cls_id"]).all()
        lengths = b["attention_mask"].sum(1)
        assert (b["original_ids"][torch.arange(6), lengths - 1] == tok["sep_id"]).all()
        assert (b["original_ids"][b["attention_mask"] == 0] == tok["pad_id"]).all()
    assert s.state_dict()["epoch"] == 1 and s.state_dict()["batches"] == 0


def test_same_seed_same_batches_and_workers_0_equals_1(shards):
    a = list(ShardStream(shards, batch_size=4, seed=7, samples_per_epoch=40, workers=0))
    b = list(ShardStream(shards, batch_size=4, seed=7, samples_per_epoch=40, workers=0))
    c = list(ShardStream(shards, batch_size=4, seed=7, samples_per_epoch=40, workers=1))
    d = list(ShardStream(shards, batch_size=4, seed=8, samples_per_epoch=40, workers=0))
    assert same(a, b) and same(a, c)
    assert rows(a) != rows(d)


def test_epochs_differ_and_follow_on(shards):
    s = ShardStream(shards, batch_size=4, seed=3, samples_per_epoch=16, workers=0)
    first, second = list(s), list(s)
    assert len(first) == len(second) == 4 and rows(first) != rows(second)
    chained = ShardStream(shards, batch_size=4, seed=3, samples_per_epoch=16, workers=0).forever()
    assert same([next(chained) for _ in range(8)], first + second)


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 0), (3, 0), (3, 2)])
def test_every_sequence_once_per_epoch_on_equal_length_ranks(shards, world, workers):
    """With the default shuffle buffer (larger than a rank's share) and epoch length, an epoch is one pass:
    every sequence once across the ranks, bar a remainder smaller than one global batch."""
    m = read_manifest(shards)
    n, batch = m["sequences"], 4
    entries = m["shards"]
    if world > 1:  # split by shards, the ranks would hold different amounts of data
        assert len({sum(e["sequences"] for e in entries[r::world]) for r in range(world)}) > 1
    streams = [ShardStream(shards, batch_size=batch, rank=r, world_size=world, seed=2, workers=workers)
               for r in range(world)]
    epochs = [[rows(list(s)) for s in streams] for _ in range(2)]  # [epoch][rank] -> rows in order
    for per_rank in epochs:
        assert {len(r) for r in per_rank} == {n // (world * batch) * batch}  # equal batch counts
        used = [row for r in per_rank for row in r]
        assert len(set(used)) == len(used)  # nothing twice in an epoch
        assert 0 <= n - len(used) < world * batch  # only the remainder is left out
    clean = {tuple(r) for ids in _all_ids(shards) for r in ids.reshape(-1, m["seq_len"]).tolist()}
    assert set(row for r in epochs[0] for row in r) <= clean
    for rank in range(world):
        assert epochs[0][rank] != epochs[1][rank]  # a fresh order in epoch 2
    if world > 1:
        assert set(epochs[0][0]) != set(epochs[1][0])  # and a fresh share of the data per rank
    assert [len(s) for s in streams] == [n // (world * batch)] * world


def test_epoch_longer_than_one_pass_is_refused(shards):
    n = read_manifest(shards)["sequences"]
    ShardStream(shards, batch_size=4, world_size=2, samples_per_epoch=n // 2, workers=0)
    with pytest.raises(MlcError, match="more than one pass") as e:
        ShardStream(shards, batch_size=4, world_size=2, samples_per_epoch=n // 2 + 1, workers=0)
    assert "loader.samples_per_epoch" in str(e.value)


@pytest.mark.parametrize("workers,k", [(0, 5), (2, 3), (2, 4), (2, 11)])
def test_resume_continues_with_the_same_batches(shards, workers, k):
    kw = dict(batch_size=4, seed=5, samples_per_epoch=36, workers=workers, shuffle_buffer=50)
    full = list(ShardStream(shards, **kw).forever().__iter__() for _ in [0])[0]
    reference = [next(full) for _ in range(14)]  # crosses the epoch boundary at 9
    first = ShardStream(shards, **kw)
    it = first.forever()
    head = [next(it) for _ in range(k)]
    state = first.state_dict()
    assert state["samples"] == (k % 9) * 4 and state["epoch"] == k // 9
    resumed = ShardStream(shards, **kw)
    resumed.load_state_dict(state)
    it2 = resumed.forever()
    tail = [next(it2) for _ in range(14 - k)]
    assert same(head + tail, reference)


def test_resume_refuses_other_settings(shards):
    state = ShardStream(shards, batch_size=4, seed=5, samples_per_epoch=36, workers=0).state_dict()
    other = ShardStream(shards, batch_size=4, seed=6, samples_per_epoch=36, workers=0)
    with pytest.raises(MlcError, match="seed=5"):
        other.load_state_dict(state)
    # any rank's position restores every rank
    ShardStream(shards, batch_size=4, seed=5, samples_per_epoch=36, workers=0, rank=1,
                world_size=2).load_state_dict({**state, "world_size": 2})


def test_from_recipe_reads_the_loader_section(shards):
    from types import SimpleNamespace

    from mlc.recipe import LoaderSpec

    spec = LoaderSpec(mlm_probability=0.3, whole_word_mask=True, shuffle_buffer=64, workers=0,
                      samples_per_epoch=24, max_damaged_share=0.2)
    s = ShardStream.from_recipe(SimpleNamespace(loader=spec, seed=9), shards, batch_size=4, rank=1, world_size=2)
    direct = ShardStream(shards, batch_size=4, rank=1, world_size=2, seed=9, samples_per_epoch=24,
                         mlm_probability=0.3, whole_word_mask=True, shuffle_buffer=64, workers=0,
                         max_damaged_share=0.2)
    assert len(s) == 6 and same(list(s), list(direct))
    assert s.state_dict()["mlm_probability"] == 0.3 and s.state_dict()["seed"] == 9


def test_more_ranks_than_shards_read_disjoint_parts(shards):
    m = read_manifest(shards)
    world = len(m["shards"]) + 3  # more ranks than shards: ranks share shards
    seen = []
    for rank in range(world):
        s = ShardStream(shards, batch_size=4, rank=rank, world_size=world, seed=1, samples_per_epoch=12,
                        workers=0, shuffle_buffer=8)
        batches = list(s)
        assert len(batches) == 3
        seen.append(set(rows(batches)))
    for a in range(world):
        for b in range(a + 1, world):
            assert not (seen[a] & seen[b])
    with pytest.raises(MlcError, match="cannot feed"):
        ShardStream(shards, batch_size=4, world_size=m["sequences"] // 4 + 1, rank=0, workers=0)


def test_refuses_shards_of_another_tokenizer(shards, tiny_bert_dir, tiny_xlmr_dir):
    ShardStream(shards, batch_size=4, samples_per_epoch=8, workers=0, tokenizer_dir=tiny_xlmr_dir)
    with pytest.raises(MlcError, match="sha256:.*sha256:"):
        ShardStream(shards, batch_size=4, samples_per_epoch=8, workers=0, tokenizer_dir=tiny_bert_dir)


# --- masking statistics -----------------------------------------------------------------------------

def _masking_input(n=400, length=64, vocab=1000, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(10, vocab, size=(n, length))
    lengths = rng.integers(length // 2, length + 1, size=n)
    ids[:, 0] = 0
    ids[np.arange(n), lengths - 1] = 2
    ids[np.arange(length)[None, :] >= lengths[:, None]] = 1
    wst = (rng.random((n, length)) < 0.5).astype(np.uint8)
    wst[:, 0] = 1
    wst[np.arange(n), lengths - 1] = 1
    wst[np.arange(length)[None, :] >= lengths[:, None]] = 0
    return ids, lengths, wst


def test_masking_statistics_80_10_10():
    ids, lengths, wst = _masking_input()
    out, labels = mlm_mask(ids, lengths, wst, np.random.default_rng(1), probability=0.15, mask_id=5,
                           special_ids=[0, 1, 2, 3, 5], vocab_size=1000)
    maskable = (np.arange(64)[None, :] < lengths[:, None]) & ~np.isin(ids, [0, 1, 2])
    chosen = labels != -100
    assert not (chosen & ~maskable).any()  # never a special token or padding
    assert np.array_equal(labels[chosen], ids[chosen])
    share = chosen.sum() / maskable.sum()
    assert 0.14 < share < 0.16
    as_mask = (out == 5) & chosen
    kept = (out == ids) & chosen
    swapped = chosen & ~as_mask & ~kept
    assert 0.77 < as_mask.sum() / chosen.sum() < 0.83
    assert 0.08 < kept.sum() / chosen.sum() < 0.12
    assert 0.08 < swapped.sum() / chosen.sum() < 0.12
    assert not np.isin(out[swapped], [0, 1, 2, 3, 5]).any()
    assert np.array_equal(out[~chosen], ids[~chosen])


def test_whole_word_masking_takes_whole_words():
    ids, lengths, wst = _masking_input(seed=4)
    out, labels = mlm_mask(ids, lengths, wst, np.random.default_rng(2), probability=0.15, mask_id=5,
                           special_ids=[0, 1, 2, 3, 5], vocab_size=1000, whole_word=True)
    chosen = labels != -100
    maskable = (np.arange(64)[None, :] < lengths[:, None]) & ~np.isin(ids, [0, 1, 2])
    words_chosen = words_total = 0
    for r in range(len(ids)):
        word = []
        for i in range(1, lengths[r]):
            if (wst[r, i] or not maskable[r, i]) and word:
                states = {bool(chosen[r, j]) for j in word}
                assert len(states) == 1, (r, word)  # all of a word's tokens or none
                words_total += 1
                words_chosen += states.pop()
                word = []
            if maskable[r, i]:
                word.append(i)
    assert 0.13 < words_chosen / words_total < 0.17


def test_stream_masks_about_15_percent(shards):
    batches = list(ShardStream(shards, batch_size=8, seed=0, samples_per_epoch=160, workers=0,
                               whole_word_mask=True))
    chosen = sum(int((b["labels"] != -100).sum()) for b in batches)
    real = sum(int((b["attention_mask"].sum() - 2 * len(b["labels"]))) for b in batches)  # minus CLS/SEP at least
    assert 0.10 < chosen / real < 0.20


def test_unmasked_stream_gives_the_text_and_the_same_order(shards):
    """mask_inputs=False (a step with inputs: original): input_ids are the text, nothing is to be predicted,
    the sequences come in the masked stream's order, and a position of one kind does not resume the other."""
    masked = list(ShardStream(shards, batch_size=4, seed=3, samples_per_epoch=36, workers=0))
    plain_stream = ShardStream(shards, batch_size=4, seed=3, samples_per_epoch=36, workers=0, mask_inputs=False)
    plain = list(plain_stream)
    assert len(plain) == len(masked) == 9
    for p, m in zip(plain, masked):
        assert torch.equal(p["input_ids"], p["original_ids"]) and bool((p["labels"] == -100).all())
        assert torch.equal(p["original_ids"], m["original_ids"])
        assert torch.equal(p["attention_mask"], m["attention_mask"])
        assert not torch.equal(m["input_ids"], m["original_ids"])
    with pytest.raises(MlcError, match="mask_inputs=False"):
        ShardStream(shards, batch_size=4, seed=3, samples_per_epoch=36, workers=0).load_state_dict(
            plain_stream.state_dict())


def test_original_inputs_are_refused_where_a_loss_predicts_masked_tokens():
    import yaml

    from mlc.errors import RecipeError
    from mlc.recipe import parse_recipe

    from pathlib import Path

    r = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs" / "recipes" / "demo.yaml").read_text())
    r["distill"]["step2"]["inputs"] = "original"
    recipe = parse_recipe(r, check_files=False)
    assert recipe.distill.step2.inputs == "original"
    from mlc.distill.build import masked_inputs

    assert masked_inputs(recipe.distill.step1) and not masked_inputs(recipe.distill.step2)
    assert masked_inputs(recipe.adapt)  # adaptation is MLM: always masked
    r["distill"]["step2"]["losses"]["logits"] = {"weight": 1.0}  # positions: masked by default
    with pytest.raises(RecipeError, match="distill.step2: inputs: original .* which logits needs"):
        parse_recipe(r, check_files=False)
    r["distill"]["step2"]["losses"]["logits"]["positions"] = "all"
    assert parse_recipe(r, check_files=False).distill.step2.losses.logits.positions == "all"


# --- damaged data -----------------------------------------------------------------------------------

def _damaged_copy(shards, tmp_path, how: str):
    copy = tmp_path / "damaged"
    shutil.copytree(shards, copy)
    manifest = read_manifest(copy)
    name = manifest["shards"][0]["name"]
    path = copy / name
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 3])
    elif how == "flip":  # a byte inside the first member's token ids: its checksum no longer matches
        b = bytearray(data)
        b[512 + 200] ^= 0x01
        path.write_bytes(bytes(b))
    elif how == "garbage":
        path.write_bytes(b"this is not a tar file" * 50)
    return copy, name


@pytest.mark.parametrize("how", ["truncate", "flip", "garbage"])
def test_damaged_shard_is_skipped_with_a_warning(shards, tmp_path, how):
    copy, name = _damaged_copy(shards, tmp_path, how)
    m = read_manifest(shards)
    first = m["shards"][0]
    with pytest.warns(DamagedDataWarning, match=name):
        s = ShardStream(copy, batch_size=4, seed=1, workers=0, max_damaged_share=0.5)
        batches = list(s)
    if how == "flip":  # found while reading: the epoch keeps its length and the gap is filled
        assert len(batches) == m["sequences"] // 4
        reasons = [e["reason"] for e in s.damage_events]
        assert "checksum" in reasons[0] and any("sha256" in r for r in reasons)  # the member, then the shard
    else:  # found at open time from the tar headers: the shard is not part of the epoch
        assert len(batches) == len(s) == (m["sequences"] - first["sequences"]) // 4
    assert s.damaged_samples == first["samples"] and s.damage_events[0]["shard"] == name
    lost = s.damaged_samples * m["sequences_per_sample"]  # sequences in the members lost, at most
    assert len(rows(batches)) - len(set(rows(batches))) <= lost  # the gap is filled, nothing more repeats
    clean = {tuple(r) for ids in _all_ids(shards) for r in ids.reshape(-1, m["seq_len"]).tolist()}
    assert all(r in clean for r in rows(batches))  # nothing damaged got through


def test_damage_share_is_of_the_whole_share_of_the_stream(shards, tmp_path):
    """Whichever shard an epoch's order starts with, the share of damage is measured against all the members
    the stream is given in the epoch, not the few read when the damage is found."""
    copy, name = _damaged_copy(shards, tmp_path, "flip")  # found while reading: 5 of 56 members lost, 9%
    for seed in range(24):
        s = ShardStream(copy, batch_size=4, seed=seed, workers=0, max_damaged_share=0.2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DamagedDataWarning)
            assert len(list(s)) == len(s)
        assert s.damaged_samples == 5


def test_too_much_damage_stops_naming_the_shard(shards, tmp_path):
    copy, name = _damaged_copy(shards, tmp_path, "truncate")  # seen at open time, on every rank alike
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DamagedDataWarning)
        with pytest.raises(MlcError, match=f"{name}.*max_damaged_share"):
            ShardStream(copy, batch_size=4, seed=1, workers=2, max_damaged_share=0.0)
    copy, name = _damaged_copy(shards, tmp_path / "flip", "flip")  # seen while reading
    s = ShardStream(copy, batch_size=4, seed=1, workers=2, max_damaged_share=0.0, max_damaged_members=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DamagedDataWarning)
        with pytest.raises(MlcError, match=f"{name}.*max_damaged_share"):
            list(s)


def test_missing_shard_file_counts_as_damage(shards, tmp_path):
    copy = tmp_path / "missing"
    shutil.copytree(shards, copy)
    entry = read_manifest(copy)["shards"][2]
    (copy / entry["name"]).unlink()
    with pytest.warns(DamagedDataWarning, match="FileNotFoundError"):
        s = ShardStream(copy, batch_size=4, seed=1, workers=0, max_damaged_share=0.9)
    assert len(list(s)) == (read_manifest(copy)["sequences"] - entry["sequences"]) // 4
    assert s.damaged_samples == entry["samples"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", DamagedDataWarning)
        list(s)  # the next epoch: the same members are not counted again


def _manifest_rows(shard_dir) -> list[tuple]:
    """Every sequence of the shards, in the manifest's order."""
    seq_len = read_manifest(shard_dir)["seq_len"]
    return [tuple(r) for ids in _all_ids(shard_dir) for r in ids.reshape(-1, seq_len).tolist()]


@pytest.mark.parametrize("world,workers", [(1, 0), (3, 2)])
def test_heldout_sequences_are_never_trained_on(shards, world, workers):
    """The last K x B x R sequences in manifest order (here across a shard boundary) are in no epoch of any
    rank; the rest is still used once per epoch; each rank gets K fixed, masked batches of the held-out set."""
    k, b = 2, 4
    every = _manifest_rows(shards)
    held = set(every[-k * b * world:])
    assert len(held) == k * b * world
    last = read_manifest(shards)["shards"][-1]["sequences"]
    assert k * b * world > last or world == 1  # with 3 ranks the held-out set reaches into the shard before
    streams = [ShardStream(shards, batch_size=b, rank=r, world_size=world, seed=2, workers=workers,
                           heldout_batches=k) for r in range(world)]
    rest = len(every) - len(held)
    for _ in range(2):  # two epochs
        used = [row for s in streams for row in rows(list(s))]
        assert len(used) == len(set(used)) == rest // (world * b) * world * b  # once each, bar the remainder
        assert not held & set(used)
    heldout = [s.heldout() for s in streams]
    assert all(len(h) == k for h in heldout)
    got = [row for h in heldout for row in rows(h)]
    assert len(got) == len(held) and set(got) == held  # the ranks' parts are disjoint and make the whole set
    assert same(heldout[0], streams[0].heldout())  # fixed: the same batches at every call
    for batch in heldout[0]:
        assert ((batch["labels"] != -100).sum(1) >= 1).all()
        chosen = batch["labels"] != -100
        assert torch.equal(batch["labels"][chosen], batch["original_ids"][chosen])
    # the training stream's epoch counts the rest only; a resume with another held-out set is refused
    assert len(streams[0]) == rest // (world * b)
    plain = ShardStream(shards, batch_size=b, rank=0, world_size=world, seed=2, workers=workers,
                        samples_per_epoch=streams[0].samples_per_epoch)
    with pytest.raises(MlcError, match="held out"):
        plain.load_state_dict(streams[0].state_dict())
    assert plain.heldout() == []


def test_a_heldout_set_leaving_no_global_batch_is_refused(shards):
    n = read_manifest(shards)["sequences"]
    with pytest.raises(MlcError, match="less than one global batch") as e:
        ShardStream(shards, batch_size=4, world_size=2, heldout_batches=n // 8, workers=0,
                    heldout_key="distill.step1.eval_batches")
    assert "distill.step1.eval_batches" in str(e.value)
