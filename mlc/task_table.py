"""The evaluation tasks, in one table: what the recipe schema accepts, what the loaders read, how evaluation
scores each and how the report names it. Adding a task is one row here plus its reader in mlc/data/tasks.py
when its file layout is new.

A recipe adds rows of its own (``evaluate.custom_tasks``): :func:`set_custom_tasks`, called when the recipe is
validated, puts them into :data:`TASKS` beside the built-in ones, so every reader of the table (loaders,
metrics, the corpus's decontamination, the report) treats them alike. Columns that modules read by task name
are live views of the table (:func:`column`), never copies made at import.

A task's labels (mlc/data/tasks.py ``task_labels``): its ``labels`` here (or ``<task>/labels.txt``) first, in
that order and all of them, then every other label of its train split, sorted; a dev or test label that is in
neither is an error naming the file and line.
"""
from __future__ import annotations

from collections.abc import Mapping
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
    labels: tuple[str, ...] | None  # the labels' canonical order (None: <task>/labels.txt, if any); the train
                                    # split's other labels follow, sorted
    primary: str                    # the metric that selects and reports
    metrics: tuple[str, ...]        # every metric reported, the primary first
    hub_dataset: str = ""           # the dataset's id on the Hugging Face Hub (model cards)
    licence: str = ""               # its licence (Hub identifier); a model trained on its text inherits it
    files: tuple[tuple[str, str], ...] | None = None  # a custom task's (split, file) pairs; None: under data_dir

    @property
    def custom(self) -> bool:
        return self.files is not None

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
TASKS: dict[str, Task] = {t.name: t for t in TABLE}  # the built-in rows, then the recipe's (set_custom_tasks)
TASK_NAMES = tuple(t.name for t in TABLE)  # the built-in tasks, in the report's order
SUFFIX = {"sequence": "tsv", "token": "txt"}  # the file layouts the readers know, by kind
# the metrics each kind can select on, and what is reported with each
KIND_METRICS = {"sequence": {"accuracy": ("accuracy", "macro_f1"), "macro_f1": ("macro_f1", "accuracy")},
                "token": {"accuracy": ("accuracy",), "entity_f1": ("entity_f1", "precision", "recall")}}


def custom_task(name: str, kind: str, files: dict[str, Path | str], metric: str, text_column: str | None = None,
                label_column: str | None = None, title: str | None = None) -> Task:
    """A row for a task the recipe defines: its split files, kind, columns and metric (checked by mlc.recipe)."""
    return Task(name, title or name, kind, "custom", SUFFIX[kind], text_column, label_column, None, metric,
                KIND_METRICS[kind][metric], files=tuple((s, str(files[s])) for s in SPLITS))


def set_custom_tasks(rows) -> None:
    """Make ``rows`` the table's custom tasks (those of the recipe validated last), replacing any earlier ones."""
    for name in [n for n, t in TASKS.items() if t.custom]:
        del TASKS[name]
    for row in rows:
        if row.name in TASKS:
            raise ValueError(f"task {row.name!r} is a built-in task")
        TASKS[row.name] = row


class column(Mapping):
    """One field of every row by task name, read from the table at each look-up (custom rows included)."""

    def __init__(self, field: str):
        self.field = field

    def __getitem__(self, name: str):
        return getattr(TASKS[name], self.field)

    def __iter__(self):
        return iter(TASKS)

    def __len__(self):
        return len(TASKS)


def task_files(data_dir: Path | str, task: str) -> dict[str, Path]:
    """Where a task's splits are: a custom task's own files, else ``<data_dir>/<task>/<split>.<suffix>``."""
    t = TASKS[task]
    if t.files is not None:
        return {s: Path(f) for s, f in t.files}
    folder = Path(data_dir) / task
    return {s: folder / f"{s}.{t.suffix}" for s in SPLITS}
