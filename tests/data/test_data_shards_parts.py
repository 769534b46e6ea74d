"""Shards for many machines: N parts (prepare_shards(part=(i, N)) / `mlc data prepare --part i/N`) merged
(merge_parts / `mlc data merge`) hold the same packed sequences as one process's shards."""
from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest

from mlc.cli import main
from mlc.data.shards import merge_parts, part_dir, prepare_shards, read_manifest, verify_shards
from mlc.data.stream import ShardStream, decode_member, read_shard
from mlc.errors import MlcError
from mlc.models.tiny import SAMPLE_SENTENCES
from mlc.recipe import ShardSpec
from data_helpers import write_recipe


def corpus(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(SAMPLE_SENTENCES).split()[: rng.randint(2, 12)]) + f" namba {i}" for i in range(n)]


def sequences(shard_dir) -> Counter:
    """The multiset of packed sequences (ids, length, word starts) of a shard folder."""
    m = read_manifest(shard_dir)
    rows = Counter()
    for e in m["shards"]:
        for sample in read_shard(shard_dir / e["name"]):
            ids, lengths, wst = decode_member(sample, m["seq_len"], m["tokenizer"]["vocab_size"])
            for a, n, w in zip(ids, lengths, wst):
                rows[(a.tobytes(), int(n), w.tobytes())] += 1
    return rows


SPEC = dict(seq_len=32, sequences_per_sample=8, samples_per_shard=3, block_sentences=70)
COUNTS = ("sentences", "sequences", "tokens", "content_tokens", "padding_tokens", "split_sentences")


@pytest.mark.parametrize("parts", [1, 2, 3, 7])
def test_merged_parts_hold_the_same_sequences_as_one_process(tiny_xlmr_dir, tmp_path, parts):
    sents = corpus(500, seed=parts)
    one = prepare_shards(sents, tiny_xlmr_dir, tmp_path / "one", ShardSpec(**SPEC))
    dirs = []
    for i in range(parts):
        dirs.append(part_dir(tmp_path / "many", i, parts))
        m = prepare_shards(sents, tiny_xlmr_dir, dirs[-1], ShardSpec(**SPEC), part=(i, parts))
        assert m["part"] == {"index": i, "of": parts, "block_sentences": 70}
        assert m["sentences"] == sum(min(70, 500 - b * 70) for b in range(i, 8, parts))
    merged = merge_parts(reversed(dirs), tmp_path / "many")  # any order: sorted by index
    assert merged["merged"]["parts"] == parts and "part" not in merged
    assert {k: merged[k] for k in COUNTS} == {k: one[k] for k in COUNTS}
    assert verify_shards(tmp_path / "many") == []
    assert sequences(tmp_path / "many") == sequences(tmp_path / "one")
    # a stream reads the merged folder like any other: an epoch of as many batches, of the same sequences
    rows = {k[0] for k in sequences(tmp_path / "one")}
    epochs = [list(ShardStream(tmp_path / f, batch_size=4, seed=3, workers=0)) for f in ("one", "many")]
    assert len(epochs[0]) == len(epochs[1]) == one["sequences"] // 4
    dtype = np.dtype(one["dtype"])
    assert all(r.numpy().astype(dtype).tobytes() in rows for b in epochs[1] for r in b["original_ids"])


def test_one_process_packs_blocks_apart(tiny_xlmr_dir, tmp_path):
    sents = corpus(300, seed=1)
    small = prepare_shards(sents, tiny_xlmr_dir, tmp_path / "a", ShardSpec(**{**SPEC, "block_sentences": 10}))
    large = prepare_shards(sents, tiny_xlmr_dir, tmp_path / "b", ShardSpec(**{**SPEC, "block_sentences": 10**6}))
    assert small["content_tokens"] == large["content_tokens"] and small["sentences"] == large["sentences"]
    assert small["padding_tokens"] >= large["padding_tokens"]


def test_merge_refuses_missing_duplicate_or_mismatched_parts(tiny_xlmr_dir, tiny_bert_dir, tmp_path):
    sents = corpus(200)
    a = prepare_shards(sents, tiny_xlmr_dir, part_dir(tmp_path / "s", 0, 2), ShardSpec(**SPEC), part=(0, 2))
    assert a["sequences"] > 0
    with pytest.raises(MlcError, match="parts 0..1 of 2"):
        merge_parts([part_dir(tmp_path / "s", 0, 2)], tmp_path / "s")
    prepare_shards(sents, tiny_bert_dir, part_dir(tmp_path / "s", 1, 2), ShardSpec(**SPEC), part=(1, 2))
    with pytest.raises(MlcError, match="tokenizer differs"):
        merge_parts([part_dir(tmp_path / "s", i, 2) for i in range(2)], tmp_path / "s")
    assert not (tmp_path / "s").exists()


@pytest.mark.integration
def test_cli_prepare_parts_and_merge_equal_one_prepare(tiny_bert_dir, data_dir, tmp_path, capsys):
    text = tmp_path / "raw.txt.gz"
    import gzip

    lines = corpus(400, seed=5)
    text.write_bytes(gzip.compress(("\n".join(lines + lines[:30]) + "\n").encode("utf-8")))
    shards = {"seq_len": 32, "sequences_per_sample": 8, "samples_per_shard": 2, "block_sentences": 60}
    recipe = write_recipe(tmp_path / "r.yaml", tiny_bert_dir, [{"kind": "text", "path": str(text)}],
                          data_dir / "swa", tmp_path / "run", shards=shards)
    assert main(["data", "prepare", str(recipe), "--out", str(tmp_path / "single")]) == 0
    for i in range(3):
        assert main(["data", "prepare", str(recipe), "--part", f"{i}/3"]) == 0
    assert "mlc data merge" in capsys.readouterr().out
    assert main(["data", "merge", str(recipe)]) == 0
    merged = read_manifest(tmp_path / "run" / "shards")
    single = read_manifest(tmp_path / "single")
    assert merged["settings"]["corpus"] == single["settings"]["corpus"]
    assert merged["sentences"] == single["sentences"] == single["settings"]["corpus"]["kept"]
    assert sequences(tmp_path / "run" / "shards") == sequences(tmp_path / "single")
    assert main(["data", "prepare", str(recipe), "--part", "3/3"]) == 2
    assert "0..N-1" in capsys.readouterr().err


def test_merge_refuses_parts_of_another_corpus(tiny_xlmr_dir, tmp_path):
    sents = corpus(200)
    for i, stats in enumerate(({"kept": 200}, {"kept": 199})):
        prepare_shards(sents, tiny_xlmr_dir, part_dir(tmp_path / "s", i, 2), ShardSpec(**SPEC),
                       settings={"corpus": stats, "recipe_file": f"/machine{i}/r.yaml"}, part=(i, 2))
    with pytest.raises(MlcError, match="settings differs"):
        merge_parts([part_dir(tmp_path / "s", i, 2) for i in range(2)], tmp_path / "s")
