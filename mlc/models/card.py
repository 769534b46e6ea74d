"""Model cards that the Hugging Face Hub reads: every folder mlc exports (trimmed teacher, student, step 1,
step 2, final) gets a ``README.md`` built with ``huggingface_hub.ModelCard`` / ``ModelCardData``: language,
licence, base model, datasets, the evaluation as ``model-index`` when there are results, and a usage snippet
that runs. No local path is written (a folder's name only), and the card says which data terms a model
trained on that data inherits.
"""
from __future__ import annotations

import os
from pathlib import Path

from mlc.errors import MlcError
from mlc.task_table import TASKS

# what the embedded teacher is on the Hub, and its licence (its package's card: intfloat/multilingual-e5-small)
EMBEDDED_BASE_MODEL = "intfloat/multilingual-e5-small"
EMBEDDED_LICENSE = "mit"
# the Hub's task type of each task kind (model-index)
_TASK_TYPE = {"sequence": "text-classification", "token": "token-classification"}
# licences from the most to the least restrictive, for the one the card states
_RESTRICTIVE = ("cc-by-nc-sa-4.0", "cc-by-nc-4.0", "cc-by-sa-4.0", "cc-by-4.0", "mit", "apache-2.0")


def teacher_identity(teacher_source: str, teacher_dir: Path | str | None = None) -> tuple[str | None, str | None]:
    """(base model id on the Hub, licence) of a teacher: the embedded one's, a Hub id as given, or what a
    teacher folder's own card says (None where nothing says)."""
    from mlc.models.teacher import EMBEDDED_TEACHER, hub_repo

    if teacher_source == EMBEDDED_TEACHER:
        return EMBEDDED_BASE_MODEL, EMBEDDED_LICENSE
    base = hub_repo(teacher_source)
    readme = Path(teacher_dir or teacher_source) / "README.md"
    if readme.is_file():
        from huggingface_hub import ModelCard

        try:
            data = ModelCard.load(readme).data
        except Exception:  # a README that is no card: nothing is known from it
            return base, None
        base = base or (data.base_model if isinstance(data.base_model, str) else None)
        return base, data.license
    return base, None


def most_restrictive(licences) -> str | None:
    known = [lic for lic in licences if lic]
    for lic in _RESTRICTIVE:
        if lic in known:
            return lic
    return known[0] if known else None


def _eval_results(summary: dict, model_key: str, language: str | None):
    from huggingface_hub import EvalResult

    out = []
    for task, score in summary["models"][model_key]["scores"].items():
        t = TASKS[task]
        out.append(EvalResult(task_type=_TASK_TYPE[t.kind], task_name=t.title, dataset_type=t.hub_dataset,
                              dataset_name=t.dataset, dataset_config=language, dataset_split="test",
                              metric_type=score["metric"], metric_name=score["metric"],
                              metric_value=round(float(score["test_mean"]), 4)))
    return out


def usage_snippet(repo_or_folder: str, sentence_transformers: bool) -> str:
    """Python that loads the model and embeds two sentences (run by the tests on a real folder)."""
    if sentence_transformers:
        return (f'from sentence_transformers import SentenceTransformer\n\n'
                f'model = SentenceTransformer("{repo_or_folder}")\n'
                f'embeddings = model.encode(["Habari ya asubuhi.", "Mvua imenyesha leo."])\n'
                f'print(embeddings.shape)\n')
    return (f'import torch\nfrom transformers import AutoModel, AutoTokenizer\n\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{repo_or_folder}")\n'
            f'model = AutoModel.from_pretrained("{repo_or_folder}")\n'
            f'batch = tokenizer(["Habari ya asubuhi.", "Mvua imenyesha leo."], padding=True, return_tensors="pt")\n'
            f'with torch.no_grad():\n'
            f'    hidden = model(**batch).last_hidden_state\n'
            f'mask = batch["attention_mask"].unsqueeze(-1).float()\n'
            f'embeddings = (hidden * mask).sum(1) / mask.sum(1)  # mean pooling\n'
            f'print(embeddings.shape)\n')


def build_card(model_dir: Path | str, *, what: str, teacher_source: str, teacher_dir: Path | str | None = None,
               language: str | None = None, name: str | None = None, trained_on: tuple[str, ...] = (),
               corpus: tuple[str, ...] = (), summary: dict | None = None, model_key: str | None = None,
               tables: tuple[str, str] | None = None, repo_id: str | None = None):
    """The card of an exported folder. ``what``: the stage in a sentence; ``trained_on``: the tasks whose
    train text entered the distillation corpus (their licences bind the model); ``corpus``: the corpus
    sources, by name; with ``summary`` (the evaluation's, :func:`mlc.evaluate.report.summarise`) and
    ``model_key``, the evaluation as model-index, and ``tables`` (its results and kept-share tables) in the
    text."""
    from huggingface_hub import ModelCard, ModelCardData

    from mlc.models.io import read_config
    from mlc.models.sentence import is_sentence_transformers

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise MlcError("model folder not found", str(model_dir))
    cfg = read_config(model_dir)
    base, teacher_licence = teacher_identity(teacher_source, teacher_dir)
    data_licences = [TASKS[t].licence for t in trained_on if t in TASKS]
    licence = most_restrictive([teacher_licence] + data_licences)
    st = is_sentence_transformers(model_dir)
    name = name or model_dir.name
    eval_results = None
    if summary is not None:
        if model_key not in summary["models"]:
            raise MlcError(f"the results have no entry {model_key!r} (they have {', '.join(summary['models'])})")
        eval_results = _eval_results(summary, model_key, language)
    tasks = list(summary["tasks"]) if summary else []
    datasets = sorted({TASKS[t].hub_dataset for t in set(trained_on) | set(tasks) if t in TASKS})
    data = ModelCardData(
        language=[language] if language else None, license=licence, base_model=base,
        datasets=datasets or None, library_name="sentence-transformers" if st else "transformers",
        pipeline_tag="feature-extraction", tags=["mlc", "distillation", "pruning", "vocabulary-trimming"],
        model_name=name, eval_results=eval_results)
    lines = [f"# {name}", "",
             f"{what}, made with `mlc` from "
             + (f"[{base}](https://huggingface.co/{base})" if base else "its teacher")
             + (f" for the language `{language}`" if language else "") + ".", "",
             f"{cfg.get('model_type')}: {cfg.get('num_hidden_layers')} layers, hidden {cfg.get('hidden_size')}, "
             f"{cfg.get('num_attention_heads')} heads, FFN {cfg.get('intermediate_size')}, vocabulary "
             f"{cfg.get('vocab_size')}.", ""]
    if summary:
        s = summary["models"][model_key]
        if s.get("average_kept"):
            lines += [f"It keeps {100 * s['average_kept']:.1f}% of the teacher's test score on average over "
                      f"{', '.join(s['kept_over'])} ({s['parameters']['total'] / 1e6:.2f}M parameters, "
                      f"{s['compression']['parameters_ratio']:.1f}x fewer than the teacher).", ""]
        lines += ["## Evaluation", "", "Linear probe on frozen features (docs/evaluation.md of mlc); test scores:", ""]
        if tables:
            lines += [tables[0], "", "Share of the teacher's score kept:", "", tables[1], ""]
        else:
            lines += [f"- {t}: {v['metric']} {v['test_mean']:.4f}" for t, v in s["scores"].items()] + [""]
    lines += ["## Use", "", "```python", usage_snippet(repo_id or name, st).rstrip("\n"), "```", ""]
    if st:
        lines += ["As for its teacher, prefix queries with `query: ` and documents with `passage: ` "
                  "(`model.encode(texts, prompt_name=\"query\")`).", ""]
    lines += ["## Training data and licence", ""]
    lines += [f"- teacher: {base or 'a local folder'}" + (f" ({teacher_licence})" if teacher_licence else "")]
    for src in corpus:
        lines.append(f"- distillation text: {src}")
    for t in trained_on:
        if t in TASKS:
            lines.append(f"- distillation text: the train split of {TASKS[t].dataset} ({TASKS[t].licence})")
    if licence and licence != teacher_licence:
        lines += ["", f"The card states `{licence}`, the most restrictive terms of the data the model was trained "
                      "on: a model distilled on that text inherits them."]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")


def write_card(model_dir: Path | str, card) -> Path:
    """``model_dir/README.md``, written atomically."""
    from mlc.paths import atomic_write_text

    path = Path(model_dir) / "README.md"
    atomic_write_text(path, str(card))
    return path


def recipe_card_inputs(recipe, trained: bool = True) -> dict:
    """What a run's cards say of its teacher and training data, from the recipe (paths reduced to names).
    ``trained``: the folder was distilled on the corpus, so the corpus and its data terms bind it (a trimmed
    teacher or a copied student is not)."""
    trained_on, corpus = [], []
    for src in recipe.corpus.sources if trained else ():
        if src.kind == "task_train":
            trained_on.append(src.task)
        elif src.path:
            corpus.append(f"{os.path.basename(str(src.path).rstrip('/')) or src.path} ({src.kind})")
        else:
            corpus.append(src.kind)
    return {"teacher_source": recipe.teacher.source, "language": recipe.language,
            "trained_on": tuple(dict.fromkeys(trained_on)), "corpus": tuple(corpus)}


def push_to_hub(folder: Path | str, repo_id: str, *, private: bool = False) -> str:
    """Upload a model folder to a Hub repository (created if missing); needs the network and a token."""
    from mlc.models.teacher import HUB_ID

    # huggingface_hub's switch for uploads (TRANSFORMERS_OFFLINE is transformers' and does not govern them)
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
        raise MlcError("HF_HUB_OFFLINE is set: uploading needs the network (unset it, log in with `hf auth login` "
                       "or set HF_TOKEN, and rerun with --push-to-hub)", "--push-to-hub")
    if not HUB_ID.match(repo_id):
        raise MlcError(f"a Hub repository is OWNER/NAME, not {repo_id!r}", "--push-to-hub")
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                                 commit_message="model compressed with mlc")
    except Exception as e:  # no network, no token, no permission: the Hub's own message says which
        raise MlcError(f"the upload failed: {e}", "--push-to-hub") from None
    return str(getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}")
