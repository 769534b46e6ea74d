"""`mlc compress RECIPE`: every stage in order, skipping those already complete for the same inputs."""
from __future__ import annotations

from pathlib import Path


def _cmd_compress(args) -> int:
    from mlc.layout import RunLayout
    from mlc.pipeline.run import plan, run_pipeline
    from mlc.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    if args.plan:
        layout = RunLayout.of(recipe)
        for i, (stage, fp, complete) in enumerate(plan(recipe), 1):
            state = "complete" if complete else "to run"
            print(f"[{i}] {stage.name:<10} {state:<9} {stage.path(layout)}  ({stage.describe})")
        return 0
    ran = run_pipeline(recipe, Path(args.recipe), start=args.start, stop=args.stop, num_gpus=args.num_gpus)
    print(f"mlc compress: {recipe.name} complete in {recipe.out} "
          f"({len(ran)} stage(s) run{': ' + ', '.join(ran) if ran else ''})")
    return 0


def register(subparsers) -> None:
    from mlc.pipeline.stages import ORDER

    help_ = "Run a whole compression recipe: every stage in order, skipping complete ones."
    p = subparsers.add_parser("compress", help=help_, description=help_ + " Stages: " + ", ".join(ORDER) +
                              ". A stage is skipped when its folder holds a marker for the same inputs; a "
                              "killed distillation step resumes from its last checkpoint.")
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("--from", dest="start", metavar="STAGE", choices=ORDER, help="rerun from this stage on")
    p.add_argument("--to", dest="stop", metavar="STAGE", choices=ORDER, help="stop after this stage")
    p.add_argument("--num-gpus", type=int, default=None,
                   help="ranks for the distillation steps (default: every GPU; 2 CPU ranks without one)")
    p.add_argument("--plan", action="store_true", help="list the stages and which are complete; run nothing")
    p.set_defaults(func=_cmd_compress)
