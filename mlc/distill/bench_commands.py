"""`mlc bench RECIPE`: training throughput of a distillation step, in one process (see mlc/distill/bench.py)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from mlc.errors import MlcError


def bench(recipe_path, *, step: int, steps: int, warmup: int, variants: str, peak_tflops: float | None,
          batch_size: int | None = None, full_vocab: list[str] | None = None, json_out: str | None = None,
          **folders) -> list[dict]:
    """Run every variant on the plan's folders (and on ``full_vocab`` = teacher, student, shards folders of the
    untrimmed vocabulary when given); print a Markdown table; return the rows."""
    from mlc.distill.bench import format_table, parse_variants, run_variant
    from mlc.distill.commands import prepare
    from mlc.distill.plan import plan_step

    chosen = parse_variants(variants)
    recipe, plan = prepare(recipe_path, step, overwrite=True, **folders)  # exports nothing: --out is not checked
    plans = [plan]
    if full_vocab:
        t, s, sh = full_vocab
        plans.append(plan_step(recipe, step, teacher=t if step else None, student=s, shards=sh))
    rows = []
    try:
        for p in plans:
            for v in chosen:
                row = run_variant(recipe, p, v, steps=steps, warmup=warmup, peak_tflops=peak_tflops,
                                  batch_size=batch_size)
                print(json.dumps(row), file=sys.stderr, flush=True)
                rows.append(row)
    finally:
        # DeepSpeed's CPU all-reduce file of this one-rank group (66 MB of RAM in /dev/shm) outlives the process
        # unless removed; unlinked while mapped, it is freed when the process ends
        import os

        from mlc.distill.commands import remove_shm_buffers

        if os.environ.get("MASTER_PORT", "").isdigit():
            remove_shm_buffers(int(os.environ["MASTER_PORT"]))
    print(format_table(rows))
    if json_out:
        from mlc.paths import atomic_write_json

        atomic_write_json(Path(json_out), {"rows": rows})
    return rows


def _cmd(args) -> int:
    if args.full_vocab is not None and len(args.full_vocab) != 3:
        raise MlcError("--full-vocab takes three folders: TEACHER STUDENT SHARDS", "--full-vocab")
    bench(args.recipe, step=args.step, steps=args.steps, warmup=args.warmup, variants=args.variants,
          peak_tflops=args.peak_tflops, batch_size=args.batch_size, full_vocab=args.full_vocab,
          json_out=args.json, teacher=args.teacher, student=args.student, shards=args.shards)
    return 0


def register(subparsers) -> None:
    b = subparsers.add_parser(
        "bench", help="Measure the training throughput of a distillation step (tokens/s, TFLOP/s, MFU, time split).",
        description="Run the recipe's distillation step in this process (DeepSpeed with one rank) for --steps "
                    "optimizer steps after --warmup, once per variant, and print tokens/s, samples/s, "
                    "analytic TFLOP/s and MFU, peak memory and the time split (data, teacher, student forward, "
                    "losses, backward, optimizer). See docs/benchmarks.md.")
    b.add_argument("recipe", help="recipe YAML file")
    b.add_argument("--step", type=int, default=1, choices=[0, 1, 2], help="which distillation step (default 1)")
    b.add_argument("--steps", type=int, default=5, help="measured optimizer steps (default 5)")
    b.add_argument("--warmup", type=int, default=1, help="unmeasured optimizer steps first (default 1)")
    b.add_argument("--variants", default="fused,naive",
                   help="comma-separated: fused|naive[:all|:masked][:zero0..3][:compiled|:eager]"
                        "[:side_stream|:one_stream][:cached] (default fused,naive); cached: the teacher's "
                        "targets read from a teacher cache filled first")
    b.add_argument("--peak-tflops", type=float, default=None,
                   help="peak FLOP/s of the machine in TFLOP/s for MFU (default 989 on CUDA, 1.0 on CPU)")
    b.add_argument("--batch-size", type=int, default=None, help="micro-batch size (default: the recipe's)")
    b.add_argument("--full-vocab", nargs=3, metavar=("TEACHER", "STUDENT", "SHARDS"), default=None,
                   help="also run every variant on these untrimmed-vocabulary folders")
    b.add_argument("--json", default=None, help="also write the rows to this JSON file")
    b.add_argument("--teacher", help="teacher HF folder (default: from the run folder)")
    b.add_argument("--student", help="student HF folder (default: from the run folder)")
    b.add_argument("--shards", help="shard folder (default: R/shards)")
    b.set_defaults(func=_cmd)
