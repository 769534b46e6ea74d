"""The stages of `mlc compress`, in order (:data:`STAGES`). Each reads the recipe and earlier stages' folders
only, and finds every folder through the run's :class:`~mlc.layout.RunLayout` (``ctx.layout``)."""
from __future__ import annotations

import json
from pathlib import Path

from mlc.paths import atomic_dir, atomic_write_json
from mlc.models.teacher import EMBEDDED_TEACHER
from mlc.pipeline.stage import Stage


# --- teacher ------------------------------------------------------------------------------------

def _run_teacher(ctx, out: Path) -> None:
    from mlc.models.teacher import hub_repo, materialize_teacher
    from mlc.recipe import check_teacher_fit

    source = ctx.recipe.teacher.source
    materialize_teacher(source, out)
    if hub_repo(source) is not None:  # downloaded into out: now the checks validation deferred
        check_teacher_fit(ctx.recipe, out)
        ctx.log(f"    teacher: {source} from the Hugging Face Hub in {out}")
    elif source != EMBEDDED_TEACHER:  # a folder given by the user is used in place; the stage records where it is
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "source.json", {"folder": str(Path(source).resolve())})


# --- corpus -------------------------------------------------------------------------------------

def _run_corpus(ctx, out: Path) -> None:
    """One file of sentences per language: sentences.<language>.txt."""
    from mlc.data.corpus import iter_corpus
    from mlc.data.text import CorpusStats
    from mlc.errors import MlcError

    stats = CorpusStats()
    files = {}
    with atomic_dir(out, what="mlc compress (corpus stage)") as tmp:
        try:
            for language, sentence in iter_corpus(ctx.recipe, stats, with_language=True):
                if language not in files:
                    files[language] = open(tmp / f"sentences.{language}.txt", "w", encoding="utf-8")
                files[language].write(sentence + "\n")
        finally:
            for f in files.values():
                f.close()
        if stats.kept == 0:
            raise MlcError(f"no sentence is left after cleaning ({stats.as_dict()})", "corpus.sources")
        atomic_write_json(tmp / "stats.json", {**stats.as_dict(), "languages": sorted(files)})
    ctx.log(f"    corpus: {stats.kept} sentences kept of {stats.read} ({stats.duplicates} duplicates, "
            f"{stats.in_eval_sets} in dev/test sets)")


def corpus_languages(ctx) -> list[str]:
    return json.loads((ctx.layout.corpus / "stats.json").read_text())["languages"]


def corpus_sentences(ctx, language: str | None = None):
    """The corpus stage's sentences, of one language or of all."""
    for lang in [language] if language else corpus_languages(ctx):
        with open(ctx.layout.corpus / f"sentences.{lang}.txt", encoding="utf-8") as f:
            for line in f:
                yield line.rstrip("\n")


def _custom_tasks(r) -> dict:
    """The recipe's custom tasks, for the fingerprints of the stages that read their files (none: nothing, so that
    the fingerprints of recipes without them are what they were before custom tasks)."""
    return {"custom_tasks": r.evaluate.custom_tasks} if r.evaluate and r.evaluate.custom_tasks else {}


def _corpus_sections(r):
    # custom tasks: a task_train source may read one, and their dev/test text is kept out of the corpus
    return {"corpus": r.corpus, "language": r.language,
            "eval_data": r.evaluate.data_dir if r.evaluate else None, **_custom_tasks(r)}


def _sentences_by_language(ctx) -> dict:
    return {lang: corpus_sentences(ctx, lang) for lang in corpus_languages(ctx)}


# --- model cards ---------------------------------------------------------------------------------

FINAL_CARD = "The final student (layers truncated, distilled, pruned)"


def _card(ctx, folder: Path, what: str, trained: bool) -> None:
    """The Hub card of an exported folder (``trained``: distilled on the corpus, so its data terms bind it)."""
    from mlc.models.card import build_card, recipe_card_inputs, write_card

    write_card(folder, build_card(folder, what=what, teacher_dir=ctx.layout.imported_teacher,
                                  name=f"{ctx.recipe.name}-{folder.name}", **recipe_card_inputs(ctx.recipe, trained)))


# --- vocabulary -----------------------------------------------------------------------------------

def _run_vocab(ctx, out: Path) -> None:
    from mlc.surgery.vocab import trim_from_recipe

    r = trim_from_recipe(ctx.recipe, ctx.layout.imported_teacher, out, _sentences_by_language(ctx))
    _card(ctx, out, f"The teacher with its vocabulary trimmed to {ctx.recipe.language} "
                    f"({r['tokens_kept']:,} of {r['vocab_before']:,} tokens)", trained=False)
    ctx.log(f"    vocabulary: kept {r['tokens_kept']:,} of {r['vocab_before']:,} tokens (corpus coverage "
            f"{r['coverage']:.4f}); parameters {r['parameters_before'] / 1e6:.1f}M -> "
            f"{r['parameters_after'] / 1e6:.1f}M")


# --- shards -------------------------------------------------------------------------------------

def _run_shards(ctx, out: Path) -> None:
    from mlc.data.shards import prepare_shards

    stats = json.loads((ctx.layout.corpus / "stats.json").read_text())
    settings = {"recipe": ctx.recipe.name, "language": ctx.recipe.language, "corpus": stats}
    m = prepare_shards(corpus_sentences(ctx), ctx.layout.model_source, out, ctx.recipe.shards, settings,
                       total=stats.get("kept"))
    ctx.log(f"    shards: {m['sequences']:,} sequences of {m['seq_len']} tokens in {len(m['shards'])} shards")


# --- distillation steps (each a DeepSpeed launch on this machine) --------------------------------

def _launch(ctx, step: int, out: Path, **folders) -> None:
    from mlc.distill.checkpoint import find_checkpoint
    from mlc.distill.commands import launch
    from mlc.layout import RunLayout
    from mlc.errors import MlcError

    # a killed launch left a checkpoint: continue from it instead of starting over. Only a complete one
    # counts (a launch killed during its first save leaves just a .tmp- folder, and starts over); the
    # launch checks it against its manifest and refuses a damaged or foreign one, saying how to start over
    run_dir = RunLayout.run_dir(out)
    found = find_checkpoint(run_dir / "checkpoints")
    resume = found is not None
    if resume:
        ctx.log(f"    resuming from checkpoint {found['tag']} in {run_dir / 'checkpoints'}")
    rc = launch(ctx.recipe_path, step, num_gpus=ctx.num_gpus or _default_ranks(), resume=resume, out=out,
                **folders)
    if rc != 0:
        raise MlcError(f"the DeepSpeed launch of step {step} failed with exit status {rc} "
                       f"(its log: {run_dir / 'log.jsonl'}); rerun `mlc compress` to resume it")


def _default_ranks() -> int:
    """One rank per GPU; on a CPU-only machine two ranks (DeepSpeed's CPU accelerator, gloo)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 2


def _run_adapt(ctx, out: Path) -> None:
    _launch(ctx, 0, out, student=str(ctx.layout.model_source))


def _run_student(ctx, out: Path) -> None:
    from mlc.surgery.layers import make_student

    teacher = ctx.layout.distill_teacher
    make_student(teacher, ctx.recipe.student.layers, out)
    _card(ctx, out, f"A student initialised with the teacher's layers {ctx.recipe.student.layers} (not trained)",
          trained=False)
    ctx.log(f"    student: teacher layers {ctx.recipe.student.layers} of {teacher}")


def _run_step1(ctx, out: Path) -> None:
    _launch(ctx, 1, out, teacher=str(ctx.layout.distill_teacher), student=str(ctx.layout.student_init),
            shards=str(ctx.layout.shards))
    _card(ctx, out, "The layer-truncated student after distillation step 1", trained=True)


def _run_step2(ctx, out: Path) -> None:
    _launch(ctx, 2, out, teacher=str(ctx.layout.step2_teacher_dir), student=str(ctx.layout.step1),
            shards=str(ctx.layout.shards), final=str(ctx.layout.final))
    _card(ctx, out, "The masked student after distillation step 2 (pruned units zeroed, full shapes)", trained=True)
    _card(ctx, ctx.layout.final, FINAL_CARD, trained=True)


# --- evaluation and the report -------------------------------------------------------------------

def model_folders(ctx) -> dict[str, Path]:
    """The folders of the models the evaluate section names, by report name."""
    folders = ctx.layout.model_folders()
    return {name: folders[name] for name in ctx.recipe.evaluate.models}


def _run_evaluate(ctx, out: Path) -> None:
    from mlc.data.tasks import task_sentences
    from mlc.evaluate.facts import measure_speeds
    from mlc.evaluate.report import card_evaluation, write_report
    from mlc.models.card import build_card, recipe_card_inputs, write_card
    from mlc.evaluate.run import evaluate_baselines, evaluate_model

    r = ctx.recipe
    spec = r.evaluate
    folders = model_folders(ctx)
    results = {}
    for name, folder in folders.items():
        ctx.log(f"    evaluating {name} ({folder})")
        # per-model results are kept beside the report, so an interrupted evaluation resumes per task
        results[name] = evaluate_model(folder, spec, ctx.layout.eval / name, progress=True)
    baselines = None
    if spec.baselines:
        ctx.log("    baselines with no encoder (majority class, bag of words)")
        baselines = evaluate_baselines(spec, ctx.layout.eval / "baselines", progress=True)
    ctx.log(f"    speed of {', '.join(folders)}, measured together")
    speed_task = spec.tasks[0]
    speeds = measure_speeds(folders, task_sentences(spec.data_dir, speed_task, "dev"), spec.max_length,
                            source=f"{speed_task}/dev")
    for name, s in speeds.items():
        results[name]["model"]["speed"] = s
    notes = [f"recipe `{ctx.recipe_path}` ({r.name}), language {r.language}"]
    if spec.max_train_examples or spec.max_eval_examples:
        notes.append(f"quick protocol: at most {spec.max_train_examples or 'all'} training and "
                     f"{spec.max_eval_examples or 'all'} dev/test examples per task: scores are indicative only")
    teacher_key = spec.models[0]
    write_report(results, out, teacher_key=teacher_key, notes=notes, title=f"mlc report: {r.name}",
                 baselines=baselines)
    final_key = "final" if "final" in results else None
    if final_key:
        card = build_card(ctx.layout.final, what=FINAL_CARD,
                          teacher_dir=ctx.layout.imported_teacher, name=r.name,
                          **card_evaluation(results, final_key, teacher_key, baselines), **recipe_card_inputs(r))
        write_card(ctx.layout.final, card)
    ctx.log(f"    report: {out / 'report.md'}")


# --- the stages of a run, in order ------------------------------------------------------------

STAGES: tuple[Stage, ...] = (
    Stage("teacher", "teacher", (), lambda r: r.teacher.source, _run_teacher,
          describe="prepare the teacher as a Hugging Face folder"),
    Stage("corpus", "corpus", (), _corpus_sections, _run_corpus,
          describe="read, clean and deduplicate the raw text; drop dev/test sentences"),
    Stage("vocab", "trimmed", ("teacher", "corpus"),
          lambda r: {"vocab": r.vocab, "tasks": r.evaluate.tasks if r.evaluate else None, **_custom_tasks(r)},
          _run_vocab,
          enabled=lambda r: r.vocab.enabled,
          describe="trim tokenizer, embeddings and MLM head to the language's tokens"),
    Stage("shards", "shards", ("corpus", "vocab", "teacher"), lambda r: r.shards, _run_shards,
          describe="tokenize, pack and write the corpus as WebDataset shards"),
    Stage("adapt", "adapted", ("vocab", "shards", "teacher"), lambda r: r.adapt, _run_adapt,
          enabled=lambda r: r.adapt.enabled,
          describe="MLM fine-tuning of the teacher on the language (adds a tied MLM head if needed)"),
    Stage("student", "student_init", ("vocab", "adapt", "teacher"), lambda r: r.student, _run_student,
          describe="copy the chosen teacher layers and the embeddings into the student"),
    Stage("step1", "step1", ("student", "shards", "adapt", "vocab"), lambda r: {"step1": r.distill.step1,
          "seed": r.seed, "loader": r.loader, "teacher_dtype": r.teacher.dtype}, _run_step1,
          describe="distil the layer-truncated student (DeepSpeed)"),
    Stage("step2", "step2", ("step1", "shards", "adapt", "vocab"),
          lambda r: {"step2": r.distill.step2, "prune": r.prune, "seed": r.seed, "loader": r.loader,
                "teacher_dtype": r.teacher.dtype}, _run_step2,
          enabled=lambda r: r.distill.step2 is not None,
          describe="score importance and prune, distil the masked student, slice it dense into final/"),
    Stage("evaluate", "report", ("teacher", "vocab", "student", "step1", "step2"),
          lambda r: r.evaluate, _run_evaluate, enabled=lambda r: r.evaluate is not None,
          describe="score the teacher and every stage and the baselines; write the report"),
)
ORDER: tuple[str, ...] = tuple(s.name for s in STAGES)
