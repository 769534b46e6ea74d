"""The evaluation of model folders under a recipe's protocol, the baselines, and the flags that keep a failed
measurement from being read as a score.

``evaluate_model`` writes ``out_dir/results.json`` (atomically after every task, ``complete`` false until
the last one); a rerun with the same model weights and protocol reuses the tasks already done, and the
probe's features are cached in ``out_dir/features/`` per weights, so a rerun under another ``C`` grid
skips the encoder. ``evaluate_baselines`` does the same for the models with no encoder.

Flags (``tasks.<task>.flags`` in results.json; the report prints them and never takes a flagged teacher
score as the reference for "kept"):

- ``collapsed``: some run predicted one label for every test example (every word, for token tasks);
- ``best_epoch_last`` (full fine-tuning): the dev score was still rising at the last epoch;
- ``c_at_edge`` (probe): the best ``C`` was at an end of the grid even after widening it;
- ``not_converged`` (probe): L-BFGS stopped at ``max_iter`` for the selected ``C``.
"""
from __future__ import annotations

import dataclasses
import json
import statistics
import time
from pathlib import Path

from mlc.errors import MlcError
from mlc.evaluate.data import METRICS, PRIMARY, SUBSET_SEED, TaskData, load_tokenizer
from mlc.evaluate.facts import describe_model, model_fingerprint
from mlc.models.io import load_encoder
from mlc.paths import atomic_write_json
from mlc.runtime import numeric_libraries, numeric_machine
from mlc.task_table import TASKS

PROBE_KEYS = ("layers", "c_grid", "max_iter")
FULL_KEYS = ("seeds", "epochs", "lr", "head_lr", "batch_size", "warmup", "weight_decay")


def protocol(spec) -> dict:
    """Everything in the evaluation settings that changes a task's scores (and nothing else, so that a
    full fine-tuning key does not invalidate probe results)."""
    p = {"mode": spec.mode, "data_dir": str(Path(spec.data_dir).resolve()), "max_length": spec.max_length,
         "max_train_examples": spec.max_train_examples, "max_eval_examples": spec.max_eval_examples,
         "subset_seed": SUBSET_SEED}
    if spec.mode == "probe":
        from mlc.evaluate.probe import SELECTION_VERSION

        p.update({k: getattr(spec, k) for k in PROBE_KEYS})
        p["selection_version"] = SELECTION_VERSION
        p["selection"] = "C with the best dev score of the task's primary metric (ties: the smaller C)"
    else:
        p.update({k: getattr(spec, k) for k in FULL_KEYS})
        p["selection"] = "best dev epoch by the task's primary metric"
    p["libraries"] = numeric_libraries()  # results of other versions are not reused (their numbers move)
    p["machine"] = numeric_machine()  # nor those of other CPU or BLAS kernels
    return p


def _mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarise_runs(task: str, runs: list[dict]) -> dict:
    out = {}
    for m in METRICS[task]:
        d = _mean_std([r["dev"][m] for r in runs])
        t = _mean_std([r["test"][m] for r in runs])
        out[m] = {"dev_mean": d["mean"], "dev_std": d["std"], "test_mean": t["mean"], "test_std": t["std"]}
    return out


def task_flags(runs: list[dict]) -> list[str]:
    """The flags of one task's runs (see the module docstring)."""
    flags = []
    if any(r["spread"]["distinct"] <= 1 for r in runs):
        flags.append("collapsed")
    if any(r.get("best_epoch") is not None and r.get("epochs", 1) > 1 and r["best_epoch"] == r["epochs"]
           for r in runs):
        flags.append("best_epoch_last")
    if any(r.get("selection", {}).get("c_at_edge") for r in runs):
        flags.append("c_at_edge")
    if any(r.get("selection", {}).get("converged") is False for r in runs):
        flags.append("not_converged")
    return flags


def task_definition(task: str) -> dict | None:
    """A custom task's row of the task table as JSON data (its files, kind, columns, metric), None for a built-in
    one: recorded with its results, which are reused only under the same definition."""
    t = TASKS[task]
    return json.loads(json.dumps(dataclasses.asdict(t))) if t.custom else None


def same_task_data(old: dict, data: TaskData) -> bool:
    """Whether results recorded earlier were made from these splits, labels and task definition (results written
    before mlc recorded the data's fingerprint are taken as made from the files there now, as they were then)."""
    return (old.get("labels", data.labels) == data.labels
            and old.get("data_fingerprint", data.fingerprint) == data.fingerprint
            and old.get("definition") == task_definition(data.task))


def evaluate_task(model_dir: Path, task: str, spec, *, encoder=None, tokenizer=None, fingerprint: str | None = None,
                  cache_dir: Path | None = None, progress: bool = True, data: TaskData | None = None) -> dict:
    """Score one task under ``spec``; the per-task entry of results.json."""
    import torch

    from mlc.evaluate import finetune, probe

    model_dir = Path(model_dir)
    started = time.perf_counter()
    data = data or TaskData(spec.data_dir, task, spec.max_train_examples, spec.max_eval_examples)
    tokenizer = tokenizer or load_tokenizer(model_dir)
    if spec.mode == "probe":
        encoder = encoder or load_encoder(model_dir)
        got = probe.probe_task(encoder, tokenizer, data, spec, fingerprint or model_fingerprint(model_dir),
                               cache_dir)
    else:
        got = finetune.finetune_task(model_dir, data, spec, tokenizer, progress=progress)
    runs = got.pop("runs")
    out = {"primary": PRIMARY[task], "metrics": summarise_runs(task, runs), "flags": task_flags(runs),
           "labels": data.labels, "runs": runs, **got, "seconds": time.perf_counter() - started,
           "torch_threads": torch.get_num_threads(), "data_fingerprint": data.fingerprint}
    if TASKS[task].custom:
        out["definition"] = task_definition(task)
    if progress:
        m = out["metrics"][PRIMARY[task]]
        flags = f" [{', '.join(out['flags'])}]" if out["flags"] else ""
        print(f"{model_dir.name}: {task}: dev {PRIMARY[task]} {m['dev_mean']:.4f}, test {m['test_mean']:.4f} "
              f"({out['seconds']:.0f} s){flags}", flush=True)
    return out


def _check_inputs(spec, tasks):
    for t in tasks:
        if t not in PRIMARY:
            raise MlcError(f"unknown task {t!r} (known: {', '.join(PRIMARY)})")
    if not Path(spec.data_dir).is_dir():
        raise MlcError("task data folder not found", str(spec.data_dir))


def _previous(path: Path, **match) -> dict:
    if not path.is_file():
        return {}
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return old if all(old.get(k) == v for k, v in match.items()) else {}


def evaluate_model(model_dir: Path | str, spec, out_dir: Path | str, *, tasks=None, progress: bool = True,
                   resume: bool = True) -> dict:
    """Evaluate the encoder in ``model_dir`` on ``tasks`` (default: ``spec.tasks``) under ``spec``
    (an :class:`mlc.recipe.EvalSpec`); write and return ``out_dir/results.json``'s content."""
    model_dir = Path(model_dir)
    out_dir = Path(out_dir)
    if not (model_dir / "config.json").is_file():
        raise MlcError("not a Hugging Face model folder (no config.json)", str(model_dir))
    tasks = list(tasks) if tasks is not None else list(spec.tasks)
    _check_inputs(spec, tasks)
    started = time.perf_counter()
    fingerprint = model_fingerprint(model_dir)
    proto = protocol(spec)
    path = out_dir / "results.json"
    previous = _previous(path, fingerprint=fingerprint, protocol=proto) if resume else {}
    results = {"model_dir": str(model_dir.resolve()), "fingerprint": fingerprint, "protocol": proto,
               "model": previous.get("model") or describe_model(model_dir), "tasks": {}, "complete": False}
    done = previous.get("tasks", {})
    encoder = tokenizer = None
    for task in tasks:
        data = TaskData(spec.data_dir, task, spec.max_train_examples, spec.max_eval_examples)
        if task in done and same_task_data(done[task], data):
            results["tasks"][task] = done[task]
            if progress:
                print(f"{model_dir.name}: {task}: reusing the results in {path}", flush=True)
        else:
            if spec.mode == "probe" and encoder is None:
                encoder, tokenizer = load_encoder(model_dir), load_tokenizer(model_dir)
            results["tasks"][task] = evaluate_task(model_dir, task, spec, encoder=encoder, tokenizer=tokenizer,
                                                   fingerprint=fingerprint, cache_dir=out_dir / "features",
                                                   progress=progress, data=data)
        # keep finished tasks of an earlier call with other tasks too
        for t, r in done.items():
            if t not in results["tasks"] and t not in tasks:
                results["tasks"][t] = r
        atomic_write_json(path, results)
    results["complete"] = True
    results["seconds"] = time.perf_counter() - started
    atomic_write_json(path, results)
    return results


def baseline_protocol(spec) -> dict:
    return {"data_dir": str(Path(spec.data_dir).resolve()), "max_train_examples": spec.max_train_examples,
            "max_eval_examples": spec.max_eval_examples, "subset_seed": SUBSET_SEED, "c_grid": spec.c_grid,
            "max_iter": spec.max_iter, "libraries": numeric_libraries(), "machine": numeric_machine()}


def evaluate_baselines(spec, out_dir: Path | str, *, tasks=None, progress: bool = True, resume: bool = True) -> dict:
    """The majority-class and bag-of-words baselines of every task on the protocol's splits; written to and
    reused from ``out_dir/results.json`` (per task, while its data and the protocol are unchanged)."""
    from mlc.evaluate.baselines import BASELINE_VERSION, task_baselines

    out_dir = Path(out_dir)
    tasks = list(tasks) if tasks is not None else list(spec.tasks)
    _check_inputs(spec, tasks)
    proto = baseline_protocol(spec)
    path = out_dir / "results.json"
    previous = _previous(path, protocol=proto, version=BASELINE_VERSION) if resume else {}
    results = {"protocol": proto, "version": BASELINE_VERSION, "tasks": dict(previous.get("tasks", {}))}
    for task in tasks:
        data = TaskData(spec.data_dir, task, spec.max_train_examples, spec.max_eval_examples)
        old = results["tasks"].get(task)
        if old and old.get("data_fingerprint") == data.fingerprint and same_task_data(old, data):
            continue
        t0 = time.perf_counter()
        results["tasks"][task] = {"primary": PRIMARY[task], **task_baselines(data, spec.c_grid, spec.max_iter),
                                  "labels": data.labels}
        if TASKS[task].custom:
            results["tasks"][task]["definition"] = task_definition(task)
        if progress:
            b = results["tasks"][task]
            p = PRIMARY[task]
            print(f"baselines: {task}: majority test {p} {b['majority']['test'][p]:.4f}, bag of words "
                  f"{b['bag_of_words']['test'][p]:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
        atomic_write_json(path, results)
    atomic_write_json(path, results)
    return results
