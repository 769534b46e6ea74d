"""`mlc evaluate`: score model folders and the baselines on the recipe's tasks with its evaluation protocol."""
from __future__ import annotations

from pathlib import Path

from mlc.errors import MlcError
from mlc.layout import RunLayout
from mlc.recipe import TASKS


def _model_args(values: list[str] | None) -> list[tuple[str, Path]]:
    """``DIR`` or ``NAME=DIR`` -> (name, folder); names default to the folder name, made unique."""
    out, used = [], set()
    for v in values or []:
        name, sep, folder = v.partition("=")
        if not sep:
            name, folder = Path(v).name or "model", v
        if not name or not folder:
            raise MlcError(f"--model {v!r}: give DIR or NAME=DIR")
        if not (Path(folder) / "config.json").is_file():
            raise MlcError("not a Hugging Face model folder (no config.json)", f"--model {folder}")
        base, n = name, 2
        while name in used:
            name, n = f"{base}-{n}", n + 1
        used.add(name)
        out.append((name, Path(folder)))
    return out


def _cmd_evaluate(args) -> int:
    from mlc.data.tasks import task_sentences
    from mlc.evaluate.facts import measure_speeds
    from mlc.evaluate.run import evaluate_baselines, evaluate_model
    from mlc.models.teacher import materialize_teacher
    from mlc.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    spec = recipe.evaluate
    if spec is None:
        raise MlcError("the recipe has no 'evaluate' section", args.recipe)
    tasks = args.tasks or list(spec.tasks)
    models = _model_args(args.model)
    if not models:
        models = [("teacher", materialize_teacher(recipe.teacher.source, RunLayout.of(recipe).teacher))]
    out = Path(args.out) if args.out else RunLayout.of(recipe).eval
    how = (f"probe ({spec.layers} layer{'s' if spec.layers == 'mean' else ''})" if spec.mode == "probe" else
           f"full fine-tuning, seeds {spec.seeds}, {spec.epochs} epochs")
    results = {}
    for name, folder in models:
        print(f"evaluating {name} ({folder}) on {', '.join(tasks)}: {how}", flush=True)
        results[name] = evaluate_model(folder, spec, out / name, tasks=tasks, progress=not args.quiet,
                                       resume=not args.fresh)
    base = None
    if spec.baselines:
        base = evaluate_baselines(spec, out / "baselines", tasks=tasks, progress=not args.quiet,
                                  resume=not args.fresh)
    speeds = {}
    if not args.no_speed:
        speeds = measure_speeds(dict(models), task_sentences(spec.data_dir, tasks[0], "dev"), spec.max_length,
                                source=f"{tasks[0]}/dev")
    for name, folder in models:
        r = results[name]
        p = r["model"]["parameters"]
        sp = speeds.get(name)
        speed = f", {sp['batch_1']:.1f} / {sp['batch_32']:.1f} sentences/s at batch 1 / 32" if sp else ""
        print(f"{name}: {p['total'] / 1e6:.2f}M parameters ({p['embeddings'] / 1e6:.2f}M embeddings), "
              f"{r['model']['disk_bytes'] / 2**20:.1f} MiB{speed}")
        for task in tasks:
            tr = r["tasks"][task]
            m = tr["metrics"][tr["primary"]]
            flags = f"  [{', '.join(tr['flags'])}]" if tr.get("flags") else ""
            print(f"  {task:<9} {tr['primary']:<9} dev {m['dev_mean']:.4f} ± {m['dev_std']:.4f}   "
                  f"test {m['test_mean']:.4f} ± {m['test_std']:.4f}{flags}")
        print(f"  results: {out / name / 'results.json'}", flush=True)
    if base:
        print("baselines (test):")
        for task in tasks:
            b = base["tasks"][task]
            print(f"  {task:<9} {b['primary']:<9} majority {b['majority']['test'][b['primary']]:.4f}   "
                  f"bag of words {b['bag_of_words']['test'][b['primary']]:.4f}")
        print(f"  results: {out / 'baselines' / 'results.json'}", flush=True)
    return 0


def register(subparsers) -> None:
    help_ = "Score model folders on the recipe's tasks with its protocol (default: its teacher), and the baselines."
    p = subparsers.add_parser("evaluate", help=help_, description=help_ + " Each model's results go to "
                              "OUT/NAME/results.json; tasks already done for the same weights and protocol "
                              "are reused.")
    p.add_argument("recipe", help="recipe YAML file (its 'evaluate' section is the protocol)")
    p.add_argument("--model", action="append", metavar="[NAME=]DIR",
                   help="an HF encoder folder to evaluate (repeatable); default: the recipe's teacher")
    p.add_argument("--tasks", nargs="+", choices=TASKS, metavar="TASK",
                   help=f"tasks to run (of {', '.join(TASKS)}); default: the recipe's evaluate.tasks")
    p.add_argument("--out", help="output folder (default: RUN/eval)")
    p.add_argument("--fresh", action="store_true", help="ignore results of an earlier call and redo every task")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--no-speed", dest="no_speed", action="store_true",
                   help="do not measure the models' inference speed")
    p.set_defaults(func=_cmd_evaluate)
