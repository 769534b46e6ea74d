"""Labels from the data (a MasakhaNER file with MISC tags) and tasks a recipe defines (evaluate.custom_tasks):
validated, probed, scored against the baselines, reported, and kept out of the corpus like the built-in ones."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mlc.cli import main
from mlc.errors import DataError, RecipeError
from mlc.recipe import EvalSpec, load_recipe, parse_recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WORDS = ["Juma", "Amina", "Nairobi", "Arusha", "Kiswahili", "Kombe", "leo", "alienda", "kwa", "na", "ya", "sana"]
TAGS = {"Juma": "B-PER", "Amina": "B-PER", "Nairobi": "B-LOC", "Arusha": "B-LOC", "Kiswahili": "B-MISC",
        "Kombe": "B-MISC"}
GENRES = {"michezo": ["Timu imeshinda mechi ya mpira", "Mchezaji amefunga bao zuri"],
          "siasa": ["Rais amehutubia bunge leo", "Serikali imetangaza sera mpya"],
          "afya": ["Hospitali mpya imefunguliwa", "Madaktari wametoa chanjo kwa watoto"]}


def _conll(n: int, seed: int, misc_tail: bool = True) -> str:
    """Sentences of ``token TAG`` lines; every fourth one ends in a two-word MISC entity (B-MISC I-MISC)."""
    out = []
    for i in range(n):
        words = [WORDS[(seed + i + k) % len(WORDS)] for k in range(5)]
        lines = [f"{w} {TAGS.get(w, 'O')}" for w in words]
        if misc_tail and i % 4 == 0:
            lines += ["Kombe B-MISC", "Afrika I-MISC"]
        out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


def _tsv(header: tuple[str, str], n: int, seed: int) -> str:
    rows = [f"{header[0]}\t{header[1]}"]
    for i in range(n):
        genre = sorted(GENRES)[(seed + i) % 3]
        rows.append(f"{GENRES[genre][i % 2]} namba {seed + i}\t{genre}")
    return "\n".join(rows) + "\n"


@pytest.fixture
def ner_with_misc(tmp_path) -> Path:
    root = tmp_path / "data"
    (root / "ner").mkdir(parents=True)
    for split, (n, seed) in {"train": (16, 0), "dev": (8, 3), "test": (8, 5)}.items():
        (root / "ner" / f"{split}.txt").write_text(_conll(n, seed), encoding="utf-8")
    return root


def test_ner_with_misc_tags_is_evaluated(ner_with_misc, tiny_bert_dir, tmp_path):
    """MasakhaNER's MISC (not in the task table's PER/ORG/LOC/DATE) comes from the train split."""
    from mlc.evaluate.run import evaluate_baselines, evaluate_model

    spec = EvalSpec(tasks=["ner"], data_dir=str(ner_with_misc), max_length=32, c_grid=[0.1, 1.0])
    r = evaluate_model(tiny_bert_dir, spec, tmp_path / "eval" / "tiny", progress=False)
    ner = r["tasks"]["ner"]
    assert ner["labels"][:9] == ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-DATE", "I-DATE"]
    assert ner["labels"][9:] == ["B-MISC", "I-MISC"]
    assert 0.0 <= ner["metrics"]["entity_f1"]["test_mean"] <= 1.0 and ner["data_fingerprint"]
    b = evaluate_baselines(spec, tmp_path / "eval" / "baselines", progress=False)
    assert b["tasks"]["ner"]["labels"] == ner["labels"]
    # a second call reuses the results; a changed label set (a tag train gains) does not
    again = evaluate_model(tiny_bert_dir, spec, tmp_path / "eval" / "tiny", progress=False)
    assert again["tasks"]["ner"]["seconds"] == ner["seconds"]
    train = ner_with_misc / "ner" / "train.txt"
    train.write_text(train.read_text() + "\nUNESCO B-ORGX\n", encoding="utf-8")
    changed = evaluate_model(tiny_bert_dir, spec, tmp_path / "eval" / "tiny", progress=False)
    assert "B-ORGX" in changed["tasks"]["ner"]["labels"]


def test_a_dev_label_absent_from_train_names_file_and_line(ner_with_misc):
    from mlc.evaluate.data import TaskData

    dev = ner_with_misc / "ner" / "dev.txt"
    dev.write_text("Juma B-PER\nWHO B-NORP\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"ner/dev.txt:2: unknown tag 'B-NORP': not among .*B-MISC.*train.txt"):
        TaskData(ner_with_misc, "ner", None, None)


# --- custom tasks ------------------------------------------------------------------------------

def _custom_recipe(tmp_path: Path, teacher: Path, **evaluate) -> Path:
    genre = tmp_path / "genre"
    genre.mkdir(exist_ok=True)
    for split, (n, seed) in {"train": (18, 0), "dev": (9, 1), "test": (9, 2)}.items():
        (genre / f"{split}.tsv").write_text(_tsv(("sentence", "genre"), n, seed), encoding="utf-8")
    chunks = tmp_path / "chunks"
    chunks.mkdir(exist_ok=True)
    for split, (n, seed) in {"train": (16, 0), "dev": (8, 1), "test": (8, 2)}.items():
        (chunks / f"{split}.conll").write_text(_conll(n, seed), encoding="utf-8")
    (tmp_path / "data").mkdir(exist_ok=True)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Habari za leo ni nzuri sana kwa wote.\nRais amehutubia bunge leo namba 9\n", encoding="utf-8")
    ev = {"data_dir": str(tmp_path / "data"), "tasks": ["news_genre", "chunks"], "max_length": 32,
          "c_grid": [0.1, 1.0],
          "custom_tasks": [
              {"name": "news_genre", "kind": "sequence", "path": str(genre), "text_column": "sentence",
               "label_column": "genre", "metric": "macro_f1", "title": "news genre"},
              {"name": "chunks", "kind": "token", "metric": "entity_f1",
               "files": {s: str(chunks / f"{s}.conll") for s in ("train", "dev", "test")}}]}
    ev.update(evaluate)
    recipe = {"name": "custom", "language": "swa", "output_dir": str(tmp_path / "run"),
              "teacher": {"source": str(teacher)},
              "corpus": {"sources": [{"kind": "text", "path": str(corpus)}] + [
                  {"kind": "task_train", "task": "news_genre"}
                  for t in ev["custom_tasks"] if t["name"] == "news_genre"]},
              "shards": {"seq_len": 32},
              "distill": {"step1": {"steps": 1, "batch_size": 1, "lr": 1e-4, "losses": {"mlm": {"weight": 1.0}}}},
              "evaluate": ev}
    path = tmp_path / "custom.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def test_custom_tasks_run_through_mlc_evaluate(tmp_path, tiny_bert_dir, capsys):
    path = _custom_recipe(tmp_path, tiny_bert_dir)
    assert main(["evaluate", str(path), "--model", f"tiny={tiny_bert_dir}", "--quiet", "--no-speed"]) == 0
    r = json.loads((tmp_path / "run" / "eval" / "tiny" / "results.json").read_text())
    assert list(r["tasks"]) == ["news_genre", "chunks"] and r["complete"]
    genre, chunks = r["tasks"]["news_genre"], r["tasks"]["chunks"]
    assert genre["primary"] == "macro_f1" and set(genre["metrics"]) == {"macro_f1", "accuracy"}
    assert genre["labels"] == ["afya", "michezo", "siasa"]
    assert chunks["primary"] == "entity_f1" and set(chunks["metrics"]) == {"entity_f1", "precision", "recall"}
    assert genre["definition"]["files"][0][1].endswith("genre/train.tsv")
    b = json.loads((tmp_path / "run" / "eval" / "baselines" / "results.json").read_text())
    assert set(b["tasks"]) == {"news_genre", "chunks"}
    report = (tmp_path / "run" / "eval" / "report" / "report.md").read_text()
    assert "news genre" in report and "chunks" in report
    # a changed definition is not taken for the same task: its results are made again
    path = _custom_recipe(tmp_path, tiny_bert_dir, tasks=["news_genre"], custom_tasks=[
        {"name": "news_genre", "kind": "sequence", "path": str(tmp_path / "genre"), "text_column": "sentence",
         "label_column": "genre", "metric": "accuracy"}])
    assert main(["evaluate", str(path), "--model", f"tiny={tiny_bert_dir}", "--no-speed"]) == 0
    assert "reusing" not in capsys.readouterr().out
    r = json.loads((tmp_path / "run" / "eval" / "tiny" / "results.json").read_text())
    assert r["tasks"]["news_genre"]["primary"] == "accuracy"


def test_custom_tasks_feed_the_corpus_and_its_decontamination(tmp_path, tiny_bert_dir):
    from mlc.data.corpus import iter_corpus
    from mlc.data.text import CorpusStats

    recipe = load_recipe(_custom_recipe(tmp_path, tiny_bert_dir))

    def texts(path, column=0):
        return [ln.split("\t")[column] if "\t" in ln else ln.split()[0]
                for ln in path.read_text().splitlines()[1:] if ln.strip()]

    genre, chunks = tmp_path / "genre", tmp_path / "chunks"
    held_out = set(texts(genre / "dev.tsv")) | set(texts(genre / "test.tsv"))
    dev_sentence = texts(genre / "dev.tsv")[0]
    chunk_dev = " ".join(ln.split()[0] for ln in (chunks / "dev.conll").read_text().split("\n\n")[0].splitlines())
    with open(tmp_path / "corpus.txt", "a", encoding="utf-8") as f:
        f.write(f"{dev_sentence}\n{chunk_dev}\n")
    stats = CorpusStats()
    got = list(iter_corpus(recipe, stats, processes=1, progress=False))
    assert set(texts(genre / "train.tsv")) - held_out <= set(got)  # task_train: the custom task's train text
    assert dev_sentence not in got and chunk_dev not in got and stats.in_eval_sets >= 2  # both tasks' dev text
    assert "Habari za leo ni nzuri sana kwa wote." in got


@pytest.mark.parametrize("change,key,message", [
    ({"custom_tasks": [{"name": "ner", "kind": "token", "path": "x"}], "tasks": ["ner"]},
     "evaluate.custom_tasks[0].name", "built-in task"),
    ({"tasks": ["news_genre", "chunks", "qa"]}, "evaluate.tasks", "unknown task 'qa'"),
    ({"tasks": ["news_genre"]}, "evaluate.custom_tasks", "chunks: defined but not in evaluate.tasks"),
    ({"custom_tasks": [{"name": "t", "kind": "token", "path": "x", "text_column": "a"}], "tasks": ["t"]},
     "evaluate.custom_tasks[0]", "text_column: a token task"),
    ({"custom_tasks": [{"name": "t", "kind": "sequence", "path": "x", "metric": "entity_f1"}], "tasks": ["t"]},
     "evaluate.custom_tasks[0]", "not one of a sequence task"),
    ({"custom_tasks": [{"name": "t", "kind": "sequence", "path": "x", "colour": 1}], "tasks": ["t"]},
     "evaluate.custom_tasks[0].colour", "unknown key"),
    ({"custom_tasks": [{"name": "t", "kind": "sequence", "files": {"train": "a"}}], "tasks": ["t"]},
     "evaluate.custom_tasks[0]", "files needs train, dev and test"),
    ({"custom_tasks": [{"name": "t", "kind": "sequence", "path": "/no/such/folder"}], "tasks": ["t"]},
     "evaluate.custom_tasks[0].path", "folder not found"),
])
def test_custom_task_validation(tmp_path, tiny_bert_dir, change, key, message):
    with pytest.raises(RecipeError) as err:
        load_recipe(_custom_recipe(tmp_path, tiny_bert_dir, **change))
    assert f"{key}: " in str(err.value) and message in str(err.value)


def test_a_recipe_without_custom_tasks_leaves_none_in_the_table(tmp_path, tiny_bert_dir):
    from mlc.task_table import TASK_NAMES, TASKS

    load_recipe(_custom_recipe(tmp_path, tiny_bert_dir))
    assert "news_genre" in TASKS
    data = yaml.safe_load((tmp_path / "custom.yaml").read_text())
    del data["evaluate"]["custom_tasks"]
    data["evaluate"]["tasks"] = ["topic"]
    data["corpus"]["sources"] = data["corpus"]["sources"][:1]
    parse_recipe(data, "inline", check_files=False)
    assert tuple(TASKS) == TASK_NAMES
