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
        if name in speeds:
            r["model"]["speed"] = speeds[name]
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
    teacher = args.teacher or models[0][0]
    if teacher not in results:
        raise MlcError(f"--teacher {teacher!r} is not one of the models evaluated ({', '.join(results)})",
                       "--teacher")
    from mlc.evaluate.report import write_report

    how_notes = [f"recipe `{args.recipe}` ({recipe.name}), language {recipe.language}; `mlc evaluate`"]
    report = write_report(results, out / "report", teacher_key=teacher, notes=how_notes,
                          title=f"mlc report: {recipe.name}", baselines=base)
    print(f"report: {report} (shares of {teacher}'s scores)", flush=True)
    return 0


def _results_files(paths: list[str]) -> tuple[dict[str, Path], Path | None]:
    """``EVAL_DIR`` (every sub-folder with a results.json), ``DIR`` (a results.json in it) or ``NAME=DIR``;
    a folder named ``baselines`` holds the baselines."""
    models, baselines = {}, None
    for p in paths:
        name, sep, folder = p.partition("=")
        folder = Path(folder if sep else p)
        if not folder.is_dir():
            raise MlcError("folder not found", str(folder))
        found = [folder] if (folder / "results.json").is_file() else sorted(
            d for d in folder.iterdir() if (d / "results.json").is_file()
            and not (d / "report.md").is_file())  # a report beside the evaluations is no model
        if not found:
            raise MlcError("no results.json in this folder or its sub-folders (run `mlc evaluate` first)",
                           str(folder))
        for d in found:
            if d.name == "baselines":
                baselines = d / "results.json"
                continue
            key = name if sep and len(found) == 1 else d.name
            if key in models:
                raise MlcError(f"two models are named {key!r}: give NAME=DIR", str(d))
            models[key] = d / "results.json"
    return models, baselines


def _load_results(paths: list[str], teacher: str | None, command: str):
    """(results by model name, baselines or None, the teacher's name, the files) of results folders."""
    import json

    files, base_file = _results_files(paths)
    if not files:
        raise MlcError("no model results given", "results")
    results = {}
    for name, f in files.items():
        try:
            results[name] = json.loads(f.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise MlcError(f"not valid JSON ({e.msg}, line {e.lineno})", str(f)) from None
        if not isinstance(results[name], dict) or "tasks" not in results[name] or "model" not in results[name]:
            raise MlcError("not the results.json `mlc evaluate` writes (no 'tasks' and 'model')", str(f))
        if not results[name].get("complete", False):
            print(f"{command}: note: {f} is incomplete (an evaluation stopped before its last task)")
    teacher = teacher or ("teacher" if "teacher" in results else next(iter(results)))
    if teacher not in results:
        raise MlcError(f"{teacher!r} is not one of the models ({', '.join(results)})", "--teacher")
    # the teacher first, a run's stages in the pipeline's order, other models in the order given
    from mlc.recipe import EVAL_MODELS

    given = list(results)
    rank = {name: i for i, name in enumerate(EVAL_MODELS)}
    results = {n: results[n] for n in sorted(given, key=lambda n: (n != teacher, rank.get(n, len(rank)),
                                                                   given.index(n)))}
    protocols = {json.dumps(r.get("protocol"), sort_keys=True) for r in results.values()}
    if len(protocols) > 1:
        raise MlcError("the results were made under different evaluation protocols; a report compares one "
                       "protocol's scores (evaluate every model with the same recipe)", "results")
    baselines = json.loads(base_file.read_text(encoding="utf-8")) if base_file else None
    return results, baselines, teacher, files


def _cmd_report(args) -> int:
    from mlc.evaluate.report import write_report

    results, baselines, teacher, files = _load_results(args.results, args.teacher, "mlc report")
    out = Path(args.out)
    report = write_report(results, out, teacher_key=teacher, title=args.title or "mlc report",
                          notes=[f"`mlc report` of {', '.join(files)}"], baselines=baselines)
    print(f"report: {report} (shares of {teacher}'s scores)")
    return 0


def _cmd_card(args) -> int:
    from mlc.evaluate.report import card_evaluation
    from mlc.models.card import build_card, push_to_hub, recipe_card_inputs, write_card

    folder = Path(args.folder)
    inputs = {"teacher_source": args.base_model or "", "language": args.language}
    teacher_dir = None
    if args.recipe:
        from mlc.layout import RunLayout
        from mlc.recipe import load_recipe

        recipe = load_recipe(args.recipe)
        inputs = recipe_card_inputs(recipe)
        teacher_dir = RunLayout.of(recipe).imported_teacher
        inputs["language"] = args.language or inputs["language"]
    scored = {}
    if args.results:
        results, baselines, teacher, _ = _load_results(args.results, args.teacher, "mlc card")
        key = args.model or folder.name
        if key not in results:
            raise MlcError(f"the results have no model {key!r} (they have {', '.join(results)}); name this "
                           "folder's entry with --model", "--model")
        scored = card_evaluation(results, key, teacher, baselines)
    card = build_card(folder, what=args.what, teacher_dir=teacher_dir, name=args.name, repo_id=args.push_to_hub,
                      **inputs, **scored)
    path = write_card(folder, card)
    print(f"model card: {path}")
    if args.push_to_hub:
        url = push_to_hub(folder, args.push_to_hub, private=args.private)
        print(f"pushed {folder} to {url}")
    return 0


def register(subparsers) -> None:
    help_ = "Score model folders on the recipe's tasks with its protocol (default: its teacher), and the baselines."
    p = subparsers.add_parser("evaluate", help=help_, description=help_ + " Each model's results go to "
                              "OUT/NAME/results.json; tasks already done for the same weights and protocol "
                              "are reused.")
    p.add_argument("recipe", help="recipe YAML file (its 'evaluate' section is the protocol)")
    p.add_argument("--model", action="append", metavar="[NAME=]DIR",
                   help="an HF encoder folder to evaluate (repeatable); default: the recipe's teacher")
    p.add_argument("--tasks", nargs="+", metavar="TASK",
                   help=f"tasks to run (of {', '.join(TASKS)} and the recipe's evaluate.custom_tasks); default: the "
                        "recipe's evaluate.tasks")
    p.add_argument("--out", help="output folder (default: RUN/eval)")
    p.add_argument("--fresh", action="store_true", help="ignore results of an earlier call and redo every task")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--no-speed", dest="no_speed", action="store_true",
                   help="do not measure the models' inference speed")
    p.add_argument("--teacher", metavar="NAME", help="the model whose scores the others' are shares of "
                                                     "(default: the first --model)")
    p.set_defaults(func=_cmd_evaluate)

    help_ = "Write the report (table, shares of the teacher's scores, baselines, plots) of evaluated models."
    r = subparsers.add_parser("report", help=help_, description=help_ + " Reads the results.json files that "
                              "`mlc evaluate` (or `mlc compress`) wrote: give their eval folder, or model result "
                              "folders one by one; a 'baselines' folder among them adds the baselines.")
    r.add_argument("results", nargs="+", metavar="[NAME=]DIR",
                   help="an eval folder (every sub-folder with a results.json) or one model's results folder")
    r.add_argument("--out", required=True, help="the report folder to write (replaced atomically)")
    r.add_argument("--teacher", metavar="NAME", help="the reference model (default: the one named teacher, else the first one found)")
    r.add_argument("--title", help="the report's title")
    r.set_defaults(func=_cmd_report)

    help_ = "Write a Hub model card (README.md) for a model folder, with its evaluation where results are given."
    c = subparsers.add_parser("card", help=help_, description=help_ + " The card is built with huggingface_hub "
                              "(language, licence, base model, datasets, model-index, a usage snippet) and holds "
                              "no local path.")
    c.add_argument("folder", help="the model folder (its README.md is written)")
    c.add_argument("--recipe", help="the recipe that made it (teacher, language, training data and their licences)")
    c.add_argument("--results", nargs="+", metavar="EVAL_DIR",
                   help="`mlc evaluate` results: EVAL_DIR, DIR or NAME=DIR, as for `mlc report`")
    c.add_argument("--model", help="this folder's name in the results (default: the folder's name)")
    c.add_argument("--teacher", help="the model whose scores the others' are shares of (default: the one named "
                   "teacher, else the first)")
    c.add_argument("--base-model", help="the Hub id of the teacher, without --recipe")
    c.add_argument("--language", help="the language code, without --recipe")
    c.add_argument("--name", help="the model's name in the card (default: the folder's name)")
    c.add_argument("--what", default="A compressed encoder", help="a sentence saying what the model is")
    c.add_argument("--push-to-hub", metavar="REPO", help="then upload the folder to this Hub repository "
                   "(needs the network and a token: `hf auth login` or HF_TOKEN)")
    c.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    c.set_defaults(func=_cmd_card)

