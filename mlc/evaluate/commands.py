"""`mlc evaluate`: fine-tune and score model folders on the recipe's tasks with its evaluation protocol."""
from __future__ import annotations

from pathlib import Path

from mlc.errors import MlcError
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
    from mlc.evaluate.finetune import evaluate_model
    from mlc.models.teacher import materialize_teacher
    from mlc.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    spec = recipe.evaluate
    if spec is None:
        raise MlcError("the recipe has no 'evaluate' section", args.recipe)
    tasks = args.tasks or list(spec.tasks)
    models = _model_args(args.model)
    if not models:
        models = [("teacher", materialize_teacher(recipe.teacher.source, recipe.out / "teacher"))]
    out = Path(args.out) if args.out else recipe.out / "eval"
    for name, folder in models:
        print(f"evaluating {name} ({folder}) on {', '.join(tasks)}; seeds {spec.seeds}, {spec.epochs} epochs, "
              f"mode {spec.mode}", flush=True)
        r = evaluate_model(folder, spec, out / name, tasks=tasks, progress=not args.quiet, resume=not args.fresh)
        p = r["model"]["parameters"]
        sp = r["model"]["speed"]
        print(f"{name}: {p['total'] / 1e6:.2f}M parameters ({p['embeddings'] / 1e6:.2f}M embeddings), "
              f"{r['model']['disk_bytes'] / 2**20:.1f} MiB, {sp['batch_1']:.1f} / {sp['batch_32']:.1f} "
              f"sentences/s at batch 1 / 32")
        for task in tasks:
            tr = r["tasks"][task]
            m = tr["metrics"][tr["primary"]]
            print(f"  {task:<9} {tr['primary']:<9} dev {m['dev_mean']:.4f} ± {m['dev_std']:.4f}   "
                  f"test {m['test_mean']:.4f} ± {m['test_std']:.4f}")
        print(f"  results: {out / name / 'results.json'}", flush=True)
    return 0


def register(subparsers) -> None:
    help_ = "Fine-tune and score model folders on the recipe's tasks (default: its teacher)."
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
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_evaluate)
