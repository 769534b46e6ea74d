"""The report of a run (report.md, results.json, plots) and the model card of an exported model.

Input: ``results_by_model``, a mapping from a model's name (``teacher``, ``student-init``, ``step1``,
``final``, ...) to what :func:`mlc.evaluate.finetune.evaluate_model` returned for it. One of them is the
teacher; every other model's scores are also given as the share of the teacher's score it keeps, and its
size as a compression rate against the teacher.
"""
from __future__ import annotations

import datetime as _dt
from pathlib import Path

from mlc.errors import MlcError
from mlc.paths import atomic_dir, atomic_write_json, atomic_write_text

TASK_ORDER = ("topic", "sentiment", "ner", "pos")
TASK_TITLES = {"topic": "topic", "sentiment": "sentiment", "ner": "NER", "pos": "POS"}
METRIC_TITLES = {"accuracy": "acc", "macro_f1": "macro-F1", "entity_f1": "entity F1", "precision": "precision",
                 "recall": "recall"}


# --- numbers ---------------------------------------------------------------------------------------

def _count(n: int) -> str:
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}k"
    return str(n)


def _bytes(n: int) -> str:
    if n >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 2**10:.1f} KiB"


def _score(mean: float, std: float) -> str:
    return f"{mean:.3f} ± {std:.3f}"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _tasks_of(results_by_model: dict, teacher_key: str) -> list[str]:
    teacher_tasks = results_by_model[teacher_key].get("tasks", {})
    seen = [t for t in TASK_ORDER if t in teacher_tasks]
    for r in results_by_model.values():
        for t in r.get("tasks", {}):
            if t not in seen:
                seen.append(t)
    return seen


def summarise(results_by_model: dict, teacher_key: str = "teacher") -> dict:
    """Per model: parameters, disk, speed, each task's primary test/dev score, share of the teacher's score
    kept, average and compression. Raises MlcError when the teacher is missing or has no results."""
    if teacher_key not in results_by_model:
        raise MlcError(f"the results have no teacher entry {teacher_key!r} (models: "
                       f"{', '.join(results_by_model) or 'none'})")
    for key, r in results_by_model.items():
        if "model" not in r or "tasks" not in r:
            raise MlcError(f"the results of {key!r} are not evaluation results (no 'model'/'tasks')")
    tasks = _tasks_of(results_by_model, teacher_key)
    teacher = results_by_model[teacher_key]
    t_params = teacher["model"]["parameters"]["total"]
    t_disk = teacher["model"]["disk_bytes"]
    t_scores = {t: teacher["tasks"][t]["metrics"][teacher["tasks"][t]["primary"]]["test_mean"]
                for t in tasks if t in teacher["tasks"]}
    t_avg = sum(t_scores.values()) / len(t_scores) if len(t_scores) == len(tasks) and tasks else None
    out = {}
    for key, r in results_by_model.items():
        m = r["model"]
        scores = {}
        for t in tasks:
            if t not in r["tasks"]:
                continue
            tr = r["tasks"][t]
            s = tr["metrics"][tr["primary"]]
            kept = s["test_mean"] / t_scores[t] if t in t_scores and t_scores[t] > 0 else None
            scores[t] = {"metric": tr["primary"], "test_mean": s["test_mean"], "test_std": s["test_std"],
                         "dev_mean": s["dev_mean"], "dev_std": s["dev_std"], "kept": kept,
                         "seeds": len(tr["runs"])}
        avg = sum(v["test_mean"] for v in scores.values()) / len(scores) if len(scores) == len(tasks) and tasks \
            else None
        params = m["parameters"]
        out[key] = {
            "parameters": {k: params[k] for k in ("total", "embeddings", "rest")},
            "disk_bytes": m["disk_bytes"],
            "speed": {"batch_1": m["speed"]["batch_1"], "batch_32": m["speed"]["batch_32"]} if "speed" in m else None,
            "scores": scores,
            "average": avg,
            "average_kept": avg / t_avg if avg is not None and t_avg else None,
            "compression": {"parameters_share": params["total"] / t_params,
                            "parameters_ratio": t_params / params["total"],
                            "parameters_removed": 1 - params["total"] / t_params,
                            "disk_share": m["disk_bytes"] / t_disk if t_disk else None},
            "shape": {k: m.get(k) for k in ("layers", "hidden", "heads", "ffn", "vocab_size")},
        }
    return {"teacher": teacher_key, "tasks": tasks, "models": out}


# --- tables ----------------------------------------------------------------------------------------

def _row(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def results_table(summary: dict) -> str:
    """The main table: size, speed, test score per task, average, share of the teacher's average kept."""
    tasks = summary["tasks"]
    metric_of = {}
    for s in summary["models"].values():
        for t, v in s["scores"].items():
            metric_of.setdefault(t, v["metric"])
    head = ["model", "parameters", "embeddings", "rest", "compression", "disk", "sent/s (b=1)", "sent/s (b=32)"]
    head += [f"{TASK_TITLES.get(t, t)} {METRIC_TITLES.get(metric_of.get(t), metric_of.get(t))}" for t in tasks]
    head += ["average", "kept (avg)"]
    lines = [_row(head), _row(["---"] * len(head))]
    for key, s in summary["models"].items():
        p, c = s["parameters"], s["compression"]
        comp = "1.0× (teacher)" if key == summary["teacher"] else \
            f"{c['parameters_ratio']:.1f}× ({_pct(c['parameters_removed'])} fewer)"
        sp = s["speed"]
        cells = [key, _count(p["total"]), _count(p["embeddings"]), _count(p["rest"]), comp, _bytes(s["disk_bytes"]),
                 f"{sp['batch_1']:.1f}" if sp else "not measured", f"{sp['batch_32']:.1f}" if sp else "not measured"]
        for t in tasks:
            v = s["scores"].get(t)
            cells.append(_score(v["test_mean"], v["test_std"]) if v else "not evaluated")
        cells.append(f"{s['average']:.3f}" if s["average"] is not None else "incomplete")
        cells.append(_kept_cell(s["average_kept"], s["average"] is not None))
        lines.append(_row(cells))
    return "\n".join(lines)


def _kept_cell(kept, scored: bool) -> str:
    if kept is not None:
        return _pct(kept)
    return "n/a (teacher scored 0)" if scored else "incomplete"


def kept_table(summary: dict) -> str:
    tasks = summary["tasks"]
    head = ["model"] + [TASK_TITLES.get(t, t) for t in tasks] + ["average"]
    lines = [_row(head), _row(["---"] * len(head))]
    for key, s in summary["models"].items():
        cells = [key]
        for t in tasks:
            v = s["scores"].get(t)
            cells.append(_kept_cell(v["kept"], True) if v else "not evaluated")
        cells.append(_kept_cell(s["average_kept"], s["average"] is not None))
        lines.append(_row(cells))
    return "\n".join(lines)


def dev_table(summary: dict) -> str:
    tasks = summary["tasks"]
    head = ["model"] + [f"{TASK_TITLES.get(t, t)} (dev)" for t in tasks]
    lines = [_row(head), _row(["---"] * len(head))]
    for key, s in summary["models"].items():
        cells = [key]
        for t in tasks:
            v = s["scores"].get(t)
            cells.append(_score(v["dev_mean"], v["dev_std"]) if v else "not evaluated")
        lines.append(_row(cells))
    return "\n".join(lines)


def all_metrics_table(results_by_model: dict, tasks: list[str]) -> str:
    lines = []
    for t in tasks:
        metric_names = []
        for r in results_by_model.values():
            for m in r["tasks"].get(t, {}).get("metrics", {}):
                if m not in metric_names:
                    metric_names.append(m)
        head = ["model"] + [f"{METRIC_TITLES.get(m, m)} {split}" for m in metric_names for split in ("dev", "test")]
        lines += [f"**{TASK_TITLES.get(t, t)}**", "", _row(head), _row(["---"] * len(head))]
        for key, r in results_by_model.items():
            tr = r["tasks"].get(t)
            if tr is None:
                continue
            cells = [key]
            for m in metric_names:
                v = tr["metrics"][m]
                cells += [_score(v["dev_mean"], v["dev_std"]), _score(v["test_mean"], v["test_std"])]
            lines.append(_row(cells))
        lines.append("")
    return "\n".join(lines)


def _protocol_lines(results_by_model: dict, teacher_key: str, tasks: list[str]) -> list[str]:
    teacher = results_by_model[teacher_key]
    p = teacher.get("protocol", {})
    lines = []
    if p:
        lines.append(f"- Fine-tuning: {'full (encoder and head)' if p['mode'] == 'full' else 'frozen encoder, head only'}; "
                     f"{p['epochs']} epochs, AdamW at lr {p['lr']:g} (head {p['head_lr'] or p['lr']:g}), "
                     f"batch {p['batch_size']}, max length {p['max_length']} tokens, warm-up {p['warmup']:.0%} "
                     f"then linear decay, weight decay {p['weight_decay']:g}; seeds {', '.join(map(str, p['seeds']))}.")
        lines.append("- The epoch with the best dev score is kept (selection on dev only); test is scored once, "
                     "with that epoch. Scores are mean ± standard deviation over the seeds.")
        lines.append("- Heads: mean pooling + linear for topic and sentiment; linear on the first sub-word of "
                     "each word for NER and POS, scored per word (NER: seqeval entity F1).")
        if p.get("max_train_examples") or p.get("max_eval_examples"):
            lines.append(f"- **Subsets** (quick run, not comparable with full-data numbers): at most "
                         f"{p.get('max_train_examples') or 'all'} training and "
                         f"{p.get('max_eval_examples') or 'all'} dev/test examples per task, the same fixed "
                         f"random subset (seed {p.get('subset_seed', 0)}) for every model.")
        lines.append(f"- Task data: `{p['data_dir']}`.")
    protos = {key: r.get("protocol") for key, r in results_by_model.items()}
    differing = [k for k, v in protos.items() if v != protos[teacher_key]]
    if differing:
        lines.append(f"- **Warning**: evaluated under a different protocol than the teacher, so not "
                     f"comparable with it: {', '.join(differing)}.")
    sizes = []
    for t in tasks:
        ex = teacher["tasks"].get(t, {}).get("examples")
        if ex:
            sizes.append(f"{TASK_TITLES.get(t, t)} " + ", ".join(
                f"{s} {v['used']}/{v['total']}" for s, v in ex.items()))
    if sizes:
        lines.append("- Examples used (used/total): " + "; ".join(sizes) + ".")
    speed = teacher["model"].get("speed")
    if speed:
        lines.append(f"- Speed: sentences per second of the bare encoder forward (tokenization included) on "
                     f"the CPU with {speed['threads']} torch threads, {speed['sentences_batch_1']} sentences one "
                     f"at a time and {speed['sentences_batch_32']} in batches of 32, from "
                     f"{speed.get('sentences_from', 'the task data')}, after a warm-up; one measurement, so "
                     f"noisy on a shared machine.")
    lines.append("- Parameters: the encoder without MLM head or pooler; embeddings = word + position "
                 "(+ token type) embeddings, rest = everything else. Compression = teacher parameters / "
                 "model parameters. Disk: the whole model folder (weights, config, tokenizer).")
    return lines


# --- plots -----------------------------------------------------------------------------------------

def _plot(summary: dict, task: str | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    points = []
    for key, s in summary["models"].items():
        if task is None:
            if s["average"] is None:
                continue
            y, err = s["average"], 0.0
        else:
            v = s["scores"].get(task)
            if v is None:
                continue
            y, err = v["test_mean"], v["test_std"]
        points.append((key, s["parameters"]["total"], y, err))
    for key, x, y, err in points:
        is_teacher = key == summary["teacher"]
        ax.errorbar([x], [y], yerr=[err], fmt="*" if is_teacher else "o", markersize=12 if is_teacher else 7,
                    capsize=3, color="tab:red" if is_teacher else "tab:blue")
        ax.annotate(key, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    xs = [p[1] for p in points]
    if xs and max(xs) / max(min(xs), 1) > 5:
        ax.set_xscale("log")
    metric = None
    if task is not None:
        metric = next((s["scores"][task]["metric"] for s in summary["models"].values() if task in s["scores"]), None)
    ax.set_xlabel("parameters")
    ax.set_ylabel("average test score" if task is None else f"test {METRIC_TITLES.get(metric, metric)}")
    ax.set_title("average over tasks" if task is None else TASK_TITLES.get(task, task))
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --- writers ---------------------------------------------------------------------------------------

def write_report(results_by_model: dict[str, dict], out_dir: Path | str, *, teacher_key: str = "teacher",
                 notes: list[str] | tuple[str, ...] = (), title: str = "Evaluation report") -> Path:
    """Write ``out_dir`` (replaced atomically) with report.md, results.json and plots/*.png; return report.md."""
    summary = summarise(results_by_model, teacher_key)
    tasks = summary["tasks"]
    out_dir = Path(out_dir)
    when = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    with atomic_dir(out_dir, what="mlc evaluate (report)") as tmp:
        (tmp / "plots").mkdir()
        plot_names = []
        for t in tasks:
            _plot(summary, t, tmp / "plots" / f"{t}.png")
            plot_names.append((TASK_TITLES.get(t, t), f"plots/{t}.png"))
        if any(s["average"] is not None for s in summary["models"].values()):
            _plot(summary, None, tmp / "plots" / "average.png")
            plot_names.append(("average", "plots/average.png"))
        seeds = max((v["seeds"] for s in summary["models"].values() for v in s["scores"].values()), default=0)
        md = [f"# {title}", "",
              f"Generated {when}. Teacher: `{teacher_key}` "
              f"({results_by_model[teacher_key].get('model_dir', 'folder not recorded')}).", "",
              f"## Results (test, mean ± std over {seeds} seed{'s' if seeds != 1 else ''})", "",
              results_table(summary), "",
              "## Share of the teacher's score kept (test)", "", kept_table(summary), "",
              "## Dev scores (the epoch selected on dev)", "", dev_table(summary), "",
              "## Every metric", "", all_metrics_table(results_by_model, tasks),
              "## Protocol", ""] + _protocol_lines(results_by_model, teacher_key, tasks) + [""]
        md += ["## Models", ""]
        for key, r in results_by_model.items():
            m = r["model"]
            md.append(f"- `{key}`: {m.get('model_type')}, {m.get('layers')} layers, hidden {m.get('hidden')}, "
                      f"{m.get('heads')} heads, FFN {m.get('ffn')}, vocabulary {m.get('vocab_size')}; "
                      f"`{r.get('model_dir', '?')}`")
        md.append("")
        if notes:
            md += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
        md += ["## Plots", ""] + [f"![{name}]({p})" for name, p in plot_names] + [""]
        atomic_write_text(tmp / "report.md", "\n".join(md))
        atomic_write_json(tmp / "results.json", {"generated": when, "summary": summary, "notes": list(notes),
                                                 "models": results_by_model})
    return out_dir / "report.md"


def write_model_card(model_dir: Path | str, results_by_model: dict[str, dict], *, model_key: str,
                     teacher_key: str = "teacher", language: str | None = None, name: str | None = None,
                     notes: list[str] | tuple[str, ...] = ()) -> Path:
    """Write ``model_dir/README.md``: what the model is, the results table, the protocol and how to load it."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise MlcError("model folder not found", str(model_dir))
    if model_key not in results_by_model:
        raise MlcError(f"the results have no entry {model_key!r} for this model")
    summary = summarise(results_by_model, teacher_key)
    s = summary["models"][model_key]
    m = results_by_model[model_key]["model"]
    teacher_dir = results_by_model[teacher_key].get("model_dir", teacher_key)
    name = name or model_dir.name
    front = ["---", "library_name: transformers", "pipeline_tag: feature-extraction",
             "tags: [mlc, distillation, pruning, compressed-encoder]"]
    if language:
        front.append(f"language: [{language}]")
    front.append("---")
    kept = f"; it keeps {_pct(s['average_kept'])} of the teacher's average score" if s["average_kept"] else ""
    lines = front + [
        "", f"# {name}", "",
        f"A compressed encoder made with `mlc` from the teacher `{teacher_dir}`"
        + (f" for the language `{language}`" if language else "") + ".",
        "",
        f"{m.get('model_type')}: {m.get('layers')} layers, hidden {m.get('hidden')}, {m.get('heads')} heads, "
        f"FFN {m.get('ffn')}, vocabulary {m.get('vocab_size')}; {_count(s['parameters']['total'])} parameters "
        f"({s['compression']['parameters_ratio']:.1f}× fewer than the teacher){kept}.",
        "", "## Results", "", results_table(summary), "",
        "Share of the teacher's score kept:", "", kept_table(summary), "",
        "## Evaluation protocol", ""] + _protocol_lines(results_by_model, teacher_key, summary["tasks"]) + [""]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    lines += ["## Use", "", "```python", "from transformers import AutoModel, AutoTokenizer", "",
              f'tokenizer = AutoTokenizer.from_pretrained("{name}")',
              f'model = AutoModel.from_pretrained("{name}")', "```", "",
              "The model is an ordinary Hugging Face encoder; fine-tune it with a task head as for its teacher.", ""]
    path = model_dir / "README.md"
    atomic_write_text(path, "\n".join(lines))
    return path
