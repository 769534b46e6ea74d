"""Where every folder of a run lives: one :class:`RunLayout`, decided by the recipe alone.

Nothing here looks at which folders exist (but for telling a Hub id ``OWNER/NAME`` from a folder of that name,
:func:`mlc.models.teacher.hub_repo`): a folder left by an earlier recipe in the same output folder is
never taken for one of this recipe's (the stages' fingerprints, not the folders' presence, say what is
complete). Every command and stage asks the layout; no module writes a run folder's name itself.

=================  =================================  ===============================================
name               folder under the run folder ``R``  written by
=================  =================================  ===============================================
``teacher``        ``R/teacher``                      the teacher stage (the embedded teacher imported, a
                                                      Hub teacher downloaded; a folder given as
                                                      ``teacher.source`` is used in place)
``corpus``         ``R/corpus``                       the corpus stage
``trimmed``        ``R/teacher-trimmed``              the vocabulary stage / ``mlc trim``
``shards``         ``R/shards``                       the shard stage / ``mlc data prepare``
``adapted``        ``R/teacher-adapted``              step 0 (teacher adaptation)
``student_init``   ``R/student-init``                 the student stage
``step1``          ``R/step1``                        step 1
``step2``          ``R/step2``                        step 2 (masked form and its masks)
``final``          ``R/final``                        step 2 (sliced dense)
``eval``           ``R/eval``                         evaluation (per model, per task)
``report``         ``R/report``                       the evaluate stage
``teacher_cache``  ``R/teacher-cache``                the distillation steps (``distill.teacher_cache``,
                                                      unless its ``dir`` names another folder)
=================  =================================  ===============================================

A distillation step's own state (checkpoints, logs) goes beside its output: ``<output>.run``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mlc.models.teacher import EMBEDDED_TEACHER, hub_repo


@dataclass(frozen=True)
class RunLayout:
    root: Path
    teacher_source: str
    vocab_enabled: bool
    adapt_enabled: bool
    step2_teacher: str | None  # "teacher" | "step1", None without a step 2

    @classmethod
    def of(cls, recipe) -> "RunLayout":
        step2 = recipe.distill.step2
        return cls(root=recipe.out, teacher_source=recipe.teacher.source, vocab_enabled=recipe.vocab.enabled,
                   adapt_enabled=recipe.adapt.enabled, step2_teacher=step2.teacher if step2 is not None else None)

    # --- the folders the stages write ---------------------------------------------------------
    @property
    def teacher(self) -> Path:
        return self.root / "teacher"

    @property
    def corpus(self) -> Path:
        return self.root / "corpus"

    @property
    def trimmed(self) -> Path:
        return self.root / "teacher-trimmed"

    @property
    def shards(self) -> Path:
        return self.root / "shards"

    @property
    def adapted(self) -> Path:
        return self.root / "teacher-adapted"

    @property
    def student_init(self) -> Path:
        return self.root / "student-init"

    @property
    def step1(self) -> Path:
        return self.root / "step1"

    @property
    def step2(self) -> Path:
        return self.root / "step2"

    @property
    def final(self) -> Path:
        return self.root / "final"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def teacher_cache(self) -> Path:
        return self.root / "teacher-cache"

    @staticmethod
    def run_dir(out: Path | str) -> Path:
        """A distillation step's state (checkpoints, TensorBoard, log.jsonl) beside its output folder."""
        out = Path(out)
        return out.with_name(out.name + ".run")

    # --- which folder plays which part, by the recipe --------------------------------------------
    @property
    def imported_teacher(self) -> Path:
        """The teacher as an HF folder: R/teacher for the embedded one and a Hub one, else the folder the recipe
        names."""
        if self.teacher_source == EMBEDDED_TEACHER or hub_repo(self.teacher_source) is not None:
            return self.teacher
        return Path(self.teacher_source)

    @property
    def model_source(self) -> Path:
        """The teacher every later stage starts from (and whose tokenizer the shards use): the trimmed one
        when the recipe trims the vocabulary."""
        return self.trimmed if self.vocab_enabled else self.imported_teacher

    @property
    def distill_teacher(self) -> Path:
        """The teacher of step 1 (and the student stage's source): the adapted one when step 0 runs."""
        return self.adapted if self.adapt_enabled else self.model_source

    @property
    def step2_teacher_dir(self) -> Path:
        return self.step1 if self.step2_teacher == "step1" else self.distill_teacher

    @property
    def last_student(self) -> Path:
        """The recipe's end product: final/ with a step 2, else step1/."""
        return self.final if self.step2_teacher is not None else self.step1

    def model_folders(self) -> dict[str, Path]:
        """Every model an evaluation can name, by its report name."""
        return {"teacher": self.imported_teacher, "teacher-trimmed": self.trimmed,
                "student-init": self.student_init, "step1": self.step1, "final": self.last_student}
