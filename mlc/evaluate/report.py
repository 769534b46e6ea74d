"""The report of a run (report.md, results.json, plots).

Input: ``results_by_model``, a mapping from a model's name (``teacher``, ``student-init``, ``step1``,
``final``, ...) to what :func:`mlc.evaluate.run.evaluate_model` returned for it. One of them is the
teacher; every other model's scores are also given as the share of the teacher's score it keeps (only for
tasks where the teacher is a valid reference: unflagged and above both baselines of
:mod:`mlc.evaluate.baselines`), and its size as a compression rate against the teacher.
"""
from __future__ import annotations

import datetime as _dt
from pathlib import Path

from mlc.errors import MlcError
from mlc.paths import atomic_dir, atomic_write_json, atomic_write_text
from mlc.task_table import TASK_NAMES, column

TASK_ORDER = TASK_NAMES  # the task table's order and titles (mlc/task_table.py; other tasks follow in results order)
TASK_TITLES = column("title")  # live: a recipe's custom tasks too (a task the table lacks is shown by its name)
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


def _valid_reference(teacher_score: dict | None, base: dict | None) -> tuple[bool, str]:
    """Whether the teacher's score of a task can be the reference for "kept", and if not, why."""
    if teacher_score is None:
        return False, "teacher not evaluated"
    if teacher_score["flags"]:
        return False, "teacher run flagged: " + ", ".join(teacher_score["flags"])
    if base is None:
        return True, "no baselines measured"
    worse = [name for name, key in (("majority class", "majority"), ("bag of words", "bag_of_words"))
             if teacher_score["test_mean"] <= base[key]]
    if worse:
        return False, "teacher at or below the " + " and the ".join(worse)
    return True, "teacher above both baselines"


def baseline_scores(baselines: dict | None, tasks: list[str]) -> dict:
    """Per task: the majority and bag-of-words test and dev scores of the task's primary metric."""
    out = {}
    for t in tasks:
        b = (baselines or {}).get("tasks", {}).get(t)
        if b is None:
            continue
        p = b["primary"]
        out[t] = {"metric": p, "majority": b["majority"]["test"][p], "bag_of_words": b["bag_of_words"]["test"][p],
                  "majority_dev": b["majority"]["dev"][p], "bag_of_words_dev": b["bag_of_words"]["dev"][p]}
    return out


def summarise(results_by_model: dict, teacher_key: str = "teacher", baselines: dict | None = None) -> dict:
    """Per model: parameters, disk, speed, each task's primary test/dev score and flags, the share of the
    teacher's score kept where the teacher is a valid reference, average and compression.

    "Kept" is the model's test score over the teacher's, per task, only where the teacher's run is not
    flagged and beats both baselines; ``average_kept`` is the mean of those shares and ``kept_over`` names
    the tasks it runs over. Raises MlcError when the teacher is missing or has no results."""
    if teacher_key not in results_by_model:
        raise MlcError(f"the results have no teacher entry {teacher_key!r} (models: "
                       f"{', '.join(results_by_model) or 'none'})")
    for key, r in results_by_model.items():
        if "model" not in r or "tasks" not in r:
            raise MlcError(f"the results of {key!r} are not evaluation results (no 'model'/'tasks')")
    tasks = _tasks_of(results_by_model, teacher_key)
    base = baseline_scores(baselines, tasks)
    teacher = results_by_model[teacher_key]
    t_params = teacher["model"]["parameters"]["total"]
    t_disk = teacher["model"]["disk_bytes"]

    def task_score(r, t):
        tr = r["tasks"].get(t)
        if tr is None:
            return None
        s = tr["metrics"][tr["primary"]]
        return {"metric": tr["primary"], "test_mean": s["test_mean"], "test_std": s["test_std"],
                "dev_mean": s["dev_mean"], "dev_std": s["dev_std"], "seeds": len(tr["runs"]),
                "flags": list(tr.get("flags", []))}

    teacher_scores = {t: task_score(teacher, t) for t in tasks}
    validity = {}
    for t in tasks:
        ok, why = _valid_reference(teacher_scores[t], base.get(t))
        validity[t] = {"valid": ok, "reason": why}
    valid = [t for t in tasks if validity[t]["valid"]]
    out = {}
    for key, r in results_by_model.items():
        m = r["model"]
        scores = {}
        for t in tasks:
            v = task_score(r, t)
            if v is None:
                continue
            b = base.get(t)
            v["at_or_below_majority"] = b is not None and v["test_mean"] <= b["majority"]
            v["below_bag_of_words"] = b is not None and v["test_mean"] < b["bag_of_words"]
            ref = teacher_scores[t]["test_mean"] if t in valid else None
            v["kept"] = v["test_mean"] / ref if ref else None
            scores[t] = v
        complete = len(scores) == len(tasks) and bool(tasks)
        avg = sum(v["test_mean"] for v in scores.values()) / len(scores) if complete else None
        kept = [scores[t]["kept"] for t in valid if t in scores and scores[t]["kept"] is not None]
        params = m["parameters"]
        out[key] = {
            "parameters": {k: params[k] for k in ("total", "embeddings", "rest")},
            "disk_bytes": m["disk_bytes"],
            "speed": {"batch_1": m["speed"]["batch_1"], "batch_32": m["speed"]["batch_32"]} if m.get("speed") else None,
            "scores": scores,
            "average": avg,
            "average_kept": sum(kept) / len(kept) if kept and len(kept) == len(valid) else None,
            "kept_over": valid if kept and len(kept) == len(valid) else [],
            "evaluation_seconds": sum(tr.get("seconds", 0.0) for tr in r["tasks"].values()),
            "compression": {"parameters_share": params["total"] / t_params,
                            "parameters_ratio": t_params / params["total"],
                            "parameters_removed": 1 - params["total"] / t_params,
                            "disk_share": m["disk_bytes"] / t_disk if t_disk else None},
            "shape": {k: m.get(k) for k in ("layers", "hidden", "heads", "ffn", "vocab_size")},
        }
    return {"teacher": teacher_key, "tasks": tasks, "baselines": base, "validity": validity, "valid_tasks": valid,
            "models": out}


# --- tables ----------------------------------------------------------------------------------------

def _row(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def _cell(mean: float, std: float, runs: int) -> str:
    """One run (the deterministic probe) has no spread to show."""
    return _score(mean, std) if runs > 1 else f"{mean:.3f}"


def _marked(v: dict) -> str:
    cell = _cell(v["test_mean"], v["test_std"], v["seeds"])
    if v.get("at_or_below_majority"):
        cell += " ▼"
    elif v.get("below_bag_of_words"):
        cell += " ▽"
    if v.get("flags"):
        cell += " ⚑"
    return cell


def _kept_avg_cell(s: dict, summary: dict) -> str:
    if s["average_kept"] is not None:
        return _pct(s["average_kept"]) + (f" ({len(s['kept_over'])} of {len(summary['tasks'])})"
                                          if len(s["kept_over"]) != len(summary["tasks"]) else "")
    if not summary["valid_tasks"]:
        return "not measured (no valid teacher score)"
    return "incomplete"


def results_table(summary: dict) -> str:
    """The main table: size, speed, test score per task, average, mean share of the teacher's score kept
    over the tasks where the teacher is a valid reference; then the baselines' rows."""
    tasks = summary["tasks"]
    metric_of = {}
    for s in summary["models"].values():
        for t, v in s["scores"].items():
            metric_of.setdefault(t, v["metric"])
    head = ["model", "parameters", "embeddings", "rest", "compression", "disk", "sent/s (b=1)", "sent/s (b=32)"]
    head += [f"{TASK_TITLES.get(t, t)} {METRIC_TITLES.get(metric_of.get(t), metric_of.get(t))}" for t in tasks]
    head += ["average", "kept (mean over valid tasks)"]
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
            cells.append(_marked(v) if v else "not evaluated")
        cells.append(f"{s['average']:.3f}" if s["average"] is not None else "incomplete")
        cells.append(_kept_avg_cell(s, summary))
        lines.append(_row(cells))
    base = summary["baselines"]
    for name, key in (("baseline: majority class", "majority"), ("baseline: bag of words", "bag_of_words")):
        if not base:
            break
        cells = [name, "-", "-", "-", "-", "-", "-", "-"]
        vals = []
        for t in tasks:
            b = base.get(t)
            cells.append(f"{b[key]:.3f}" if b else "not measured")
            if b:
                vals.append(b[key])
        cells.append(f"{sum(vals) / len(vals):.3f}" if len(vals) == len(tasks) else "incomplete")
        cells.append("-")
        lines.append(_row(cells))
    return "\n".join(lines)


def kept_table(summary: dict) -> str:
    tasks = summary["tasks"]
    head = ["model"] + [TASK_TITLES.get(t, t) for t in tasks] + ["mean over valid tasks"]
    lines = [_row(head), _row(["---"] * len(head))]
    for key, s in summary["models"].items():
        cells = [key]
        for t in tasks:
            v = s["scores"].get(t)
            if not summary["validity"][t]["valid"]:
                cells.append("not measured")
            elif v is None:
                cells.append("not evaluated")
            else:
                cells.append(_pct(v["kept"]))
        cells.append(_kept_avg_cell(s, summary))
        lines.append(_row(cells))
    return "\n".join(lines)


def validity_lines(summary: dict) -> list[str]:
    lines = []
    for t in summary["tasks"]:
        v = summary["validity"][t]
        state = "measures" if v["valid"] else "**does not measure**"
        lines.append(f"- {TASK_TITLES.get(t, t)}: the protocol {state} this task ({v['reason']}).")
    flagged = [(key, t, v) for key, s in summary["models"].items() for t, v in s["scores"].items()
               if v["flags"] or v["at_or_below_majority"]]
    for key, t, v in flagged:
        what = list(v["flags"]) + (["at or below the majority baseline"] if v["at_or_below_majority"] else [])
        lines.append(f"- `{key}` {TASK_TITLES.get(t, t)}: {', '.join(what)}.")
    for key, s in summary["models"].items():  # above chance, yet no better than word counts without an encoder
        below = [TASK_TITLES.get(t, t) for t, v in s["scores"].items()
                 if v.get("below_bag_of_words") and not v["at_or_below_majority"]]
        if below:
            lines.append(f"- `{key}` is below the bag-of-words baseline on {', '.join(below)}: on "
                         f"{'that task' if len(below) == 1 else 'those tasks'} it adds nothing over word features "
                         "without an encoder.")
    return lines


def dev_table(summary: dict) -> str:
    tasks = summary["tasks"]
    head = ["model"] + [f"{TASK_TITLES.get(t, t)} (dev)" for t in tasks]
    lines = [_row(head), _row(["---"] * len(head))]
    for key, s in summary["models"].items():
        cells = [key]
        for t in tasks:
            v = s["scores"].get(t)
            cells.append(_cell(v["dev_mean"], v["dev_std"], v["seeds"]) if v else "not evaluated")
        lines.append(_row(cells))
    base = summary["baselines"]
    for name, key in (("baseline: majority class", "majority_dev"), ("baseline: bag of words", "bag_of_words_dev")):
        if base:
            lines.append(_row([name] + [f"{base[t][key]:.3f}" if t in base else "not measured" for t in tasks]))
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
            runs = len(tr.get("runs", ())) or 1  # one deterministic run has no spread to show
            for m in metric_names:
                v = tr["metrics"][m]
                cells += [_cell(v["dev_mean"], v["dev_std"], runs), _cell(v["test_mean"], v["test_std"], runs)]
            lines.append(_row(cells))
        lines.append("")
    return "\n".join(lines)


def _protocol_lines(results_by_model: dict, teacher_key: str, tasks: list[str], summary: dict) -> list[str]:
    teacher = results_by_model[teacher_key]
    p = teacher.get("protocol", {})
    lines = []
    if p.get("mode") == "probe":
        lines.append(f"- **Probe** (frozen encoder): features computed once per split ({p['layers']} layer"
                     f"{'s averaged' if p['layers'] == 'mean' else ''}; mean over the tokens for topic and "
                     f"sentiment, each word's first sub-word for NER and POS, max length {p['max_length']}), "
                     f"standardised on the training split; a multinomial logistic regression fit by L-BFGS "
                     f"to convergence (at most {p['max_iter']} iterations) for each L2 strength C in "
                     f"{', '.join(f'{c:g}' for c in p['c_grid'])} (widened at an edge), C chosen on dev. "
                     f"Sentiment (macro-F1) weighs the classes by inverse frequency. Deterministic within one "
                     f"environment (the library versions and the machine's kernels are below): one run per task, "
                     f"so the tables show no spread (another environment moved scores by up to about half a "
                     f"point, also with the same library versions).")
    elif p:
        lines.append(f"- **Full fine-tuning** (encoder and head): {p['epochs']} epochs, AdamW at lr {p['lr']:g} "
                     f"(head {p['head_lr'] or p['lr']:g}), batch {p['batch_size']}, max length {p['max_length']} "
                     f"tokens, warm-up {p['warmup']:.0%} then linear decay, weight decay {p['weight_decay']:g}; "
                     f"seeds {', '.join(map(str, p['seeds']))}; the epoch with the best dev score is kept. "
                     f"Scores are mean ± standard deviation over the seeds.")
    if p:
        lines.append("- Selection on dev only; test is scored once, with the selected model. NER: seqeval "
                     "entity F1; POS: accuracy per word; topic: accuracy; sentiment: macro-F1.")
        lines.append("- Baselines with no encoder, on the same splits: the majority class of the training "
                     "split; a bag-of-words logistic regression (TF-IDF word 1-2-grams and character 2-5-grams "
                     "for topic and sentiment; per-word indicator features - the word, its prefixes, suffixes, "
                     "shape and neighbours - for NER and POS), C chosen on dev the same way.")
        lines.append("- Marks: ▼ at or below the majority baseline (a failed measurement, not a result); ▽ above "
                     "it but below the bag-of-words baseline (the encoder adds nothing over word features); ⚑ a "
                     "flagged run (collapsed to one label, best epoch = the last, C at the grid's edge, or not "
                     "converged). \"Kept\" = model test score / teacher test score, only for tasks where the "
                     "teacher's run is unflagged and above both baselines.")
        if p.get("max_train_examples") or p.get("max_eval_examples"):
            lines.append(f"- **Subsets** (quick run, not comparable with full-data numbers): at most "
                         f"{p.get('max_train_examples') or 'all'} training and "
                         f"{p.get('max_eval_examples') or 'all'} dev/test examples per task, the same fixed "
                         f"random subset (seed {p.get('subset_seed', 0)}) for every model.")
        lines.append(f"- Task data: `{p['data_dir']}`.")
        if p.get("libraries"):
            lines.append("- Libraries: " + ", ".join(f"{k} {v}" for k, v in p["libraries"].items() if v) + ".")
        if p.get("machine"):
            m = p["machine"]
            lines.append(f"- Machine: PyTorch CPU kernels {m.get('cpu_kernels')}, BLAS {m.get('blas')}"
                         + (f", GPU {m['gpu']}" if m.get("gpu") else "") + " (results of other kernels are "
                         "not reused: they round differently).")
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
        together = speed.get("interleaved_with")
        how = (f"all {len(together)} models loaded in one process and measured in {speed['rounds']} "
               f"interleaved rounds, the median round per model") if together else "one measurement"
        lines.append(f"- Speed: sentences per second of the bare encoder forward (tokenization included) on "
                     f"the CPU with {speed['threads']} torch threads, {speed['sentences_batch_1']} sentences one "
                     f"at a time and {speed['sentences_batch_32']} in batches of 32, from "
                     f"{speed.get('sentences_from') or 'the given sentences'}, after a warm-up; {how}.")
    times = [f"{key} {s['evaluation_seconds']:.0f} s" for key, s in summary["models"].items()]
    lines.append("- Evaluation time (all tasks, features included): " + ", ".join(times) + ".")
    lines.append("- Parameters: the encoder without MLM head or pooler; embeddings = word + position "
                 "(+ token type) embeddings, rest = everything else. Compression = teacher parameters / "
                 "model parameters. Disk: the whole model folder (weights, config, tokenizer).")
    return lines


# --- plots -----------------------------------------------------------------------------------------

MARKERS = ("o", "s", "D", "^", "v", "P", "X", "h", "<", ">")


def _plot(summary: dict, task: str | None, path: Path) -> dict:
    """Test score against parameters: one marker and legend entry per model (no labels to overlap), the
    teacher as a star, error bars = std over seeds, the baselines as horizontal lines; every point inside.
    Returns the axes' limits and what was drawn (for checks)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
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
    ys = []
    for n, (key, x, y, err) in enumerate(points):
        is_teacher = key == summary["teacher"]
        ax.errorbar([x], [y], yerr=[err], fmt="*" if is_teacher else MARKERS[n % len(MARKERS)],
                    markersize=14 if is_teacher else 8, capsize=3, label=key, color=f"C{n % 10}")
        ys += [y - err, y + err]
    base = summary["baselines"]
    for name, key, style in (("majority class", "majority", ":"), ("bag of words", "bag_of_words", "--")):
        if task is None:
            vals = [b[key] for b in base.values()]
            value = sum(vals) / len(vals) if base and len(vals) == len(summary["tasks"]) else None
        else:
            value = base.get(task, {}).get(key)
        if value is not None:
            ax.axhline(value, linestyle=style, color="gray", linewidth=1.2, label=f"baseline: {name}")
            ys.append(value)
    xs = [p[1] for p in points]
    if xs:
        if max(xs) / max(min(xs), 1) > 5:
            ax.set_xscale("log")
            ax.set_xlim(min(xs) / 1.6, max(xs) * 1.6)
        else:
            span = max(max(xs) - min(xs), 0.1 * max(xs))
            ax.set_xlim(min(xs) - 0.15 * span, max(xs) + 0.15 * span)
    if ys:
        lo, hi = min(ys), max(ys)
        pad = max(0.08 * (hi - lo), 0.01)
        ax.set_ylim(lo - pad, hi + pad)
    metric = None
    if task is not None:
        metric = next((s["scores"][task]["metric"] for s in summary["models"].values() if task in s["scores"]), None)
    ax.set_xlabel("parameters")
    ax.set_ylabel("average test score" if task is None else f"test {METRIC_TITLES.get(metric, metric)}")
    ax.set_title("average over tasks" if task is None else TASK_TITLES.get(task, task))
    ax.grid(True, alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    drawn = {"xlim": ax.get_xlim(), "ylim": ax.get_ylim(), "points": [(k, x, y) for k, x, y, _ in points],
             "legend": [t.get_text() for t in ax.get_legend().get_texts()]}
    plt.close(fig)
    return drawn


# --- writers ---------------------------------------------------------------------------------------

def write_report(results_by_model: dict[str, dict], out_dir: Path | str, *, teacher_key: str = "teacher",
                 notes: list[str] | tuple[str, ...] = (), title: str = "Evaluation report",
                 baselines: dict | None = None) -> Path:
    """Write ``out_dir`` (replaced atomically) with report.md, results.json and plots/*.png; return report.md.
    ``baselines``: what :func:`mlc.evaluate.run.evaluate_baselines` returned (rows, lines, validity)."""
    summary = summarise(results_by_model, teacher_key, baselines)
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
        mode = results_by_model[teacher_key].get("protocol", {}).get("mode")
        spread = "one deterministic run per task" if mode == "probe" else \
            f"mean ± std over {seeds} seed{'s' if seeds != 1 else ''}"
        md = [f"# {title}", "",
              f"Generated {when}. Teacher: `{teacher_key}` "
              f"({results_by_model[teacher_key].get('model_dir', 'folder not recorded')}).", "",
              f"## Results (test, {spread})", "",
              results_table(summary), "",
              "▼ at or below the majority baseline; ▽ below the bag-of-words baseline; ⚑ flagged run (see below).",
              "",
              "## What the protocol measures", ""] + validity_lines(summary) + [
              "", "## Share of the teacher's score kept (test)", "", kept_table(summary), "",
              "## Dev scores (the selected model)", "", dev_table(summary), "",
              "## Every metric", "", all_metrics_table(results_by_model, tasks),
              "## Protocol", ""] + _protocol_lines(results_by_model, teacher_key, tasks, summary) + [""]
        if baselines is None:
            md += ["**No baselines were measured** (`evaluate.baselines: false`): the teacher's validity is "
                   "checked only by its flags.", ""]
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
                                                 "models": results_by_model, "baselines": baselines})
    return out_dir / "report.md"


def card_evaluation(results_by_model: dict, model_key: str, teacher_key: str = "teacher",
                    baselines: dict | None = None) -> dict:
    """What a model card shows of an evaluation (:func:`mlc.models.card.build_card`'s keyword arguments)."""
    if model_key not in results_by_model:
        raise MlcError(f"the results have no entry {model_key!r} (they have {', '.join(results_by_model)})")
    summary = summarise(results_by_model, teacher_key, baselines)
    return {"summary": summary, "model_key": model_key, "tables": (results_table(summary), kept_table(summary))}

