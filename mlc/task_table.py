"""The evaluation tasks, in one table: what the recipe schema accepts, what the loaders read, how evaluation
scores each and how the report names it. Adding a task is one row here plus its reader in mlc/data/tasks.py
when its file layout is new.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "dev", "test")
SENTIMENT_LABELS = ("positive", "neutral", "negative")
NER_TYPES = ("PER", "ORG", "LOC", "DATE")
NER_LABELS = ("O",) + tuple(f"{p}-{t}" for t in NER_TYPES for p in ("B", "I"))
UPOS_LABELS = ("ADJ", "ADP", "ADV", "AUX", "CCONJ", "DET", "INTJ", "NOUN", "NUM", "PART", "PRON",
               "PROPN", "PUNCT", "SCONJ", "SYM", "VERB", "X")


@dataclass(frozen=True)
class Task:
    name: str
    title: str                      # as reports write it
    kind: str                       # "sequence" (one label a text) or "token" (one label a word)
    dataset: str                    # where the data comes from
    suffix: str                     # split files <split>.<suffix>: tab-separated (tsv) or CoNLL columns (txt)
    text_column: str | None         # sequence tasks: the TSV columns of the text and the label
    label_column: str | None
    labels: tuple[str, ...] | None  # None: read from <task>/labels.txt
    primary: str                    # the metric that selects and reports
    metrics: tuple[str, ...]        # every metric reported, the primary first
    hub_dataset: str = ""           # the dataset's id on the Hugging Face Hub (model cards)
    licence: str = ""               # its licence (Hub identifier); a model trained on its text inherits it

    @property
    def balanced(self) -> bool:
        """Scored by macro-F1: every class counts alike, so classifiers weigh classes inversely to frequency."""
        return self.primary == "macro_f1"


TABLE = (
    Task("topic", "topic", "sequence", "SIB-200", "tsv", "text", "category", None,
         "accuracy", ("accuracy", "macro_f1"), "Davlan/sib200", "cc-by-sa-4.0"),
    Task("sentiment", "sentiment", "sequence", "AfriSenti", "tsv", "tweet", "label", SENTIMENT_LABELS,
         "macro_f1", ("macro_f1", "accuracy"), "shmuhammad/AfriSenti-twitter-sentiment", "cc-by-4.0"),
    Task("ner", "NER", "token", "MasakhaNER 2.0", "txt", None, None, NER_LABELS,
         "entity_f1", ("entity_f1", "precision", "recall"), "masakhane/masakhaner2", "cc-by-nc-4.0"),
    Task("pos", "POS", "token", "MasakhaPOS", "txt", None, None, UPOS_LABELS, "accuracy", ("accuracy",),
         "masakhane/masakhapos", "mit"),
)
TASKS = {t.name: t for t in TABLE}
TASK_NAMES = tuple(TASKS)


def task_files(data_dir: Path | str, task: str) -> dict[str, Path]:
    """Where a task's splits are: ``<data_dir>/<task>/<split>.<suffix>``."""
    folder = Path(data_dir) / task
    return {s: folder / f"{s}.{TASKS[task].suffix}" for s in SPLITS}
