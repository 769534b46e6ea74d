"""What `deepspeed` starts on every rank: one distillation step of an mlc recipe.

    deepspeed --num_gpus 2 launcher/distill.py --recipe configs/recipes/demo.yaml --step 1

`mlc distill RECIPE --step N` builds this launch for one machine; for several machines run `deepspeed
--hostfile ...` yourself (docs/distill.md). Folders default to the recipe's run folder; the options
below override them (the `mlc` command passes them all explicitly).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# run from a source checkout, the mlc package of this checkout, not whichever one the environment would import
# (e.g. another worktree's editable install): the launcher and the library it drives must be the same version.
# Installed (mlc/launcher/distill.py), the mlc it belongs to is already the one imported.
_checkout = Path(__file__).resolve().parents[1]
if (_checkout / "mlc" / "__init__.py").is_file():
    sys.path.insert(0, str(_checkout))


def parse(argv=None):
    p = argparse.ArgumentParser(description="One mlc distillation step on this rank (started by deepspeed).")
    p.add_argument("--recipe", required=True, help="recipe YAML file")
    p.add_argument("--step", type=int, required=True, choices=[0, 1, 2],
                   help="0 = teacher MLM adaptation, 1 = distil the layer-truncated student, 2 = distil the pruned one")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint of this step")
    p.add_argument("--stop_after", type=int, default=None,
                   help="end this launch after that many optimizer steps (checkpointed; continue with --resume)")
    p.add_argument("--teacher", help="teacher HF folder (default from the recipe's run folder)")
    p.add_argument("--student", help="student HF folder to start from")
    p.add_argument("--shards", help="shard folder")
    p.add_argument("--out", help="output HF folder")
    p.add_argument("--final", help="step 2: folder for the sliced dense model")
    p.add_argument("--masks", help="step 2: mask file (default: R/masks.safetensors, else computed)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out and --final even if mlc did not write them")
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", "0")),
                   help="set by the deepspeed launcher")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from mlc.distill.loop import run
    from mlc.distill.plan import plan_step
    from mlc.errors import MlcError
    from mlc.recipe import load_recipe

    args = parse(argv)
    try:
        recipe = load_recipe(args.recipe)
        plan = plan_step(recipe, args.step, teacher=args.teacher, student=args.student, shards=args.shards,
                         out=args.out, final=args.final, masks=args.masks)
        summary = run(recipe, plan, resume=args.resume, stop_after=args.stop_after, overwrite=args.overwrite)
    except MlcError as e:
        print(f"mlc distill (rank {os.environ.get('RANK', '?')}): error: {e}", file=sys.stderr, flush=True)
        return 2
    if os.environ.get("RANK", "0") == "0":
        print(f"mlc distill: {plan.key} done {summary['steps_done']}/{summary['steps']} steps on "
              f"{summary['ranks']} ranks in {summary['seconds']:.1f} s; loss {summary['first_logged_loss']} -> "
              f"{summary['last_logged_loss']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
