"""The compression-quality ablation (docs/results.md): rows that each differ from a reference recipe in one
thing, run with the stages they share (teacher .. step1) made once, then one table and one trade-off plot.

    python scripts/ablate.py write configs/recipes/swahili-e5small.yaml --out /tmp/abl --step2-steps 200 \
        [--teacher-cache /tmp/abl/teacher-cache] [--combined tokens4x+dropout0 ...]
    python scripts/ablate.py run --out /tmp/abl short teacher-original dropout0 ...   # in this order
    python scripts/ablate.py stages --out /tmp/abl        # student-init and step1 of the reference, scored
    python scripts/ablate.py table --out /tmp/abl > table.md                          # and /tmp/abl/pareto.png

``write`` makes ``ref.yaml`` (the recipe, output in ``OUT/ref``) and one ``ROW.yaml`` per row (output in
``OUT/ROW``), each the reference with step 2 shortened to ``--step2-steps`` ("short") and one change.
``run`` runs ``mlc compress ref.yaml --to step1`` once, then each row: its folder starts as hard links of the
reference's stages whose fingerprints it shares (all up to step1 for a step-2 change, which then skip) and of
the newest evaluation of the teacher and the baselines in any row, so a row costs its step 2 and one evaluation.
Rows that change an earlier stage (the seed, which teacher layers seed the student) link the stages before it
and rerun from there in their own folders. ``table`` reads every row's ``report/results.json`` (and the stage rows' of ``OUT/stages/report``).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED = ("teacher", "corpus", "teacher-trimmed", "shards", "student-init", "step1")


def _s2(r):
    return r["distill"]["step2"]


def _shape(hidden, heads, ffn):
    def change(r):
        r["prune"].update(hidden_size=hidden, heads=heads, ffn_dim=ffn)
    return change


# name -> (what differs from the short reference, how)
ROWS = {
    # the first reference distilled step 2 from the step-1 student; the row teacher-original (the recipes'
    # default since) is the reference of every later row, which differs from it in one thing
    "short": ("the first reference: step 2 shortened, distilled from the step-1 student",
              lambda r: _s2(r).update(teacher="step1")),
    "teacher-original": ("step 2 distils from the original teacher, not the step-1 student (the reference of "
                         "the rows below)", lambda r: _s2(r).update(teacher="teacher")),
    "tokens2x": ("2x the step-2 tokens", lambda r: _s2(r).update(steps=2 * _s2(r)["steps"])),
    "tokens4x": ("4x the step-2 tokens", lambda r: _s2(r).update(steps=4 * _s2(r)["steps"])),
    "dropout0": ("no student dropout in step 2", lambda r: _s2(r).update(student_dropout=0.0)),
    "original-inputs": ("step 2 reads the unmasked text (its losses predict nothing; the probe reads unmasked "
                        "text too)", lambda r: _s2(r).update(inputs="original")),
    "hidden-only": ("hidden-state MSE alone (no attention-map loss)", lambda r: _s2(r)["losses"].pop("attention")),
    "attention-x100": ("attention-map loss weight 100 (at weight 1 it was measured at about 0.1% of the total)",
                       lambda r: _s2(r)["losses"]["attention"].update(weight=100.0)),
    "cosine": ("hidden-state cosine instead of MSE",
               lambda r: _s2(r)["losses"].update(hidden_cos=_s2(r)["losses"].pop("hidden_mse"))),
    "one-shot": ("pruning in one shot before step 2", lambda r: r["prune"].update(rounds=1)),
    "rounds4": ("pruning in 4 rounds over step 2", lambda r: r["prune"].update(rounds=4)),
    "heads12": ("all 12 heads kept (9.1M parameters)", lambda r: r["prune"].update(heads=12)),
    "ffn1280": ("FFN 1280 instead of 1024 (9.1M parameters)", lambda r: r["prune"].update(ffn_dim=1280)),
    "layers-odd": ("the student seeded with teacher layers 1, 3, ..., 11 (the last one included) instead of 0, 2, ..., 10",
                   lambda r: r["student"].update(layers=[1, 3, 5, 7, 9, 11])),
    "hidden320": ("hidden 320, 10 heads, FFN 352: the same 8.3M budget, wider residual",
                  _shape(320, 10, 352)),
    "hidden192": ("hidden 192, 6 heads, FFN 768: a smaller budget (about 5.4M), for the smallest student that "
                  "keeps 90%", _shape(192, 6, 768)),
    "seed2": ("seed 2 instead of 1: step 1's and step 2's batches, masks and pruning calibration redrawn",
              lambda r: r.update(seed=2)),
}


def row_spec(name: str):
    """(what differs, how) of a row: one of ROWS, or rows joined by ``+`` (their changes applied in order)."""
    parts = name.split("+")
    unknown = [p for p in parts if p not in ROWS]
    if unknown:
        raise SystemExit(f"unknown row {unknown[0]!r}; rows: {', '.join(ROWS)} (or several joined by +)")
    if len(parts) == 1:
        return ROWS[name]

    def change(r):
        for p in parts:
            ROWS[p][1](r)
    return "; ".join(ROWS[p][0] for p in parts), change


def _row_names(out: Path) -> list[str]:
    """ROWS in their order, then the combined rows written in ``out`` (``a+b.yaml``)."""
    combined = sorted(p.stem for p in out.glob("*+*.yaml"))
    return list(ROWS) + [c for c in combined if c not in ROWS]


def cmd_write(a) -> int:
    base = yaml.safe_load(Path(a.recipe).read_text(encoding="utf-8"))
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if a.teacher_cache:  # one folder for every row: each step 2 reads what an earlier one stored
        base.setdefault("distill", {})["teacher_cache"] = {"enabled": True, "dir": str(Path(a.teacher_cache).resolve()),
                                                           "max_gb": a.teacher_cache_gb}
    ref = copy.deepcopy(base)
    ref["output_dir"] = str(out / "ref")
    (out / "ref.yaml").write_text(yaml.safe_dump(ref, sort_keys=False), encoding="utf-8")
    short = copy.deepcopy(base)
    if a.step2_steps:
        _s2(short)["steps"] = a.step2_steps
    short["evaluate"]["models"] = ["teacher", "final"]
    for name in list(ROWS) + list(a.combined or []):
        _, change = row_spec(name)
        r = copy.deepcopy(short)
        change(r)
        r["name"], r["output_dir"] = f"{base['name']}-{name.replace('+', '_')}", str(out / name)  # no + in a name
        (out / f"{name}.yaml").write_text(yaml.safe_dump(r, sort_keys=False), encoding="utf-8")
    print(f"wrote ref.yaml and {len(ROWS) + len(a.combined or [])} rows in {out}")
    return 0


def _mlc(*args, log: Path | None = None) -> int:
    cmd = [sys.executable, "-m", "mlc.cli", *args]
    if log is None:
        return subprocess.call(cmd)
    with open(log, "w") as f:
        return subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)


def _reusable_stages(row_recipe: Path, ref_recipe: Path) -> list[str]:
    """The shared stages' folders whose fingerprint under the row's recipe is the reference's, up to the first
    that differs: only those are linked, so a row that changes an earlier stage (the seed, the seeding layers)
    reruns it in a folder of its own instead of writing into hard links of the reference's files."""
    from mlc.layout import RunLayout
    from mlc.pipeline.run import plan
    from mlc.recipe import load_recipe

    ref = load_recipe(ref_recipe)
    ref_layout = RunLayout.of(ref)
    ref_done = {stage.name: (fp, complete) for stage, fp, complete in plan(ref)}
    reusable = []
    for stage, fp, _ in plan(load_recipe(row_recipe)):
        folder = stage.path(ref_layout).name
        if folder not in SHARED:
            continue  # a stage rows never share (the adaptation, when enabled, is compared like the rest)
        if ref_done.get(stage.name) != (fp, True):
            break
        reusable.append(folder)
    return reusable


def cmd_run(a) -> int:
    out = Path(a.out).resolve()
    if not (out / "ref" / "step1" / ".mlc-stage.json").is_file():
        print("reference: mlc compress ref.yaml --to step1", flush=True)
        if _mlc("compress", str(out / "ref.yaml"), "--to", "step1", log=out / "ref-step1.log"):
            return 1
    for name in a.rows:
        row_spec(name)  # an unknown name stops here
        if not (out / f"{name}.yaml").is_file():
            raise SystemExit(f"{out / (name + '.yaml')} is missing: write it first (write --combined {name})")
        row = out / name
        if (row / "report" / ".mlc-stage.json").is_file():
            print(f"{name}: done already", flush=True)
            continue
        row.mkdir(exist_ok=True)
        for stage in _reusable_stages(out / f"{name}.yaml", out / "ref.yaml"):
            if not (row / stage).exists():
                subprocess.check_call(["cp", "-al", str(out / "ref" / stage), str(row / stage)])
        for model in ("teacher", "baselines"):  # scored once: the newest result of any row (this call's or earlier)
            found = [out / r / "eval" / model for r in _row_names(out)
                     if r != name and (out / r / "eval" / model / "results.json").is_file()]
            done = max(found, key=lambda d: (d / "results.json").stat().st_mtime, default=None)
            if done is not None and not (row / "eval" / model).exists():
                (row / "eval").mkdir(exist_ok=True)
                subprocess.check_call(["cp", "-al", str(done), str(row / "eval" / model)])
        print(f"{name}: running", flush=True)
        rc = _mlc("compress", str(out / f"{name}.yaml"), log=out / f"{name}.log")
        print(f"{name}: exit {rc}", flush=True)
    return 0


STAGE_ROWS = {"student-init": "stage: the copied teacher layers, before distillation",
              "step1": "stage: after step 1 (the reference's, shared by every row)"}


def _summary_rows(out: Path):
    """(row, what, summary, model key) of every finished row: each row's final student, and the stage rows
    (``OUT/stages``, scored by ``mlc evaluate ... --out OUT/stages`` and ``mlc report``)."""
    for name in _row_names(out):
        what = row_spec(name)[0]
        f = out / name / "report" / "results.json"
        if f.is_file():
            yield name, what, json.loads(f.read_text())["summary"], "final"
    f = out / "stages" / "report" / "results.json"
    if f.is_file():
        s = json.loads(f.read_text())["summary"]
        for name, what in STAGE_ROWS.items():
            if name in s["models"]:
                yield name, what, s, name


def cmd_stages(a) -> int:
    """The stage rows: the reference's student-init and step1 scored like the rows' finals (the teacher's
    evaluation of the first finished row reused), then their report."""
    out = Path(a.out).resolve()
    stages = out / "stages"
    stages.mkdir(exist_ok=True)
    done = next((out / r / "eval" / "teacher" for r in _row_names(out) if (out / r / "eval" / "teacher").is_dir()),
                None)
    if done is not None and not (stages / "teacher").exists():
        subprocess.check_call(["cp", "-al", str(done), str(stages / "teacher")])
    models = ["--model", f"teacher={out / 'ref' / 'teacher'}"]
    for name in STAGE_ROWS:
        models += ["--model", f"{name}={out / 'ref' / name}"]
    if _mlc("evaluate", str(out / "ref.yaml"), *models, "--out", str(stages), "--no-speed", log=out / "stages.log"):
        return 1
    return _mlc("report", str(stages), "--out", str(stages / "report"), "--teacher", "teacher")


def _rows(out: Path) -> list[dict]:
    rows = []
    for name, what, s, key in _summary_rows(out):
        m, t = s["models"][key], s["models"][s["teacher"]]
        rows.append({"row": name, "what": what, "parameters": m["parameters"]["total"],
                     "teacher_parameters": t["parameters"]["total"],
                     "scores": {k: v["test_mean"] for k, v in m["scores"].items()},
                     "dev": {k: v["dev_mean"] for k, v in m["scores"].items()},
                     "kept": {k: v.get("kept") for k, v in m["scores"].items()},
                     "teacher_scores": {k: v["test_mean"] for k, v in t["scores"].items()},
                     "teacher_dev": {k: v["dev_mean"] for k, v in t["scores"].items()},
                     "valid": s["valid_tasks"]})
    return rows


def cmd_table(a) -> int:
    out = Path(a.out).resolve()
    rows = _rows(out)
    if not rows:
        raise SystemExit(f"no finished row in {out}")
    tasks = list(rows[0]["scores"])
    head = (["row", "what differs", "parameters"] + [f"{t} test" for t in tasks] + ["mean kept (test)"]
            + [f"{t} dev" for t in tasks] + ["mean dev"])
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    # the teacher as the reference row's evaluation scored it (each row's "kept" is against its own)
    ref = next((r for r in rows if r["row"] == "teacher-original"), rows[0])
    teacher, teacher_dev = ref["teacher_scores"], ref["teacher_dev"]
    print("| teacher | - | " + f"{ref['teacher_parameters'] / 1e6:.1f}M | "
          + " | ".join(f"{teacher[t]:.3f}" for t in tasks) + " | 100% | "
          + " | ".join(f"{teacher_dev[t]:.3f}" for t in tasks) + f" | {sum(teacher_dev.values()) / len(tasks):.3f} |")
    for r in rows:
        kept = [r["kept"][t] for t in r["valid"] if r["kept"].get(t) is not None]
        dev = sum(r["dev"].values()) / len(r["dev"])
        print(f"| {r['row']} | {r['what']} | {r['parameters'] / 1e6:.2f}M | "
              + " | ".join(f"{r['scores'][t]:.3f}" for t in tasks)
              + f" | {100 * sum(kept) / len(kept):.1f}% ({len(kept)} of {len(tasks)}) | "
              + " | ".join(f"{r['dev'][t]:.3f}" for t in tasks) + f" | {dev:.3f} |")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        kept = [r["kept"][t] for t in r["valid"] if r["kept"].get(t) is not None]
        ax.scatter(r["parameters"] / 1e6, 100 * sum(kept) / len(kept))
        ax.annotate(r["row"], (r["parameters"] / 1e6, 100 * sum(kept) / len(kept)), fontsize=8,
                    xytext=(4, 2), textcoords="offset points")
    ax.axhline(95, linestyle="--", linewidth=0.8, color="grey")
    ax.axvline(0.08 * rows[0]["teacher_parameters"] / 1e6, linestyle=":", linewidth=0.8, color="grey")
    ax.set_xlabel("parameters of the final student (M)")
    ax.set_ylabel("share of the teacher's test score kept (%)")
    ax.set_title("ablation: quality against size (dashed: 95% kept, dotted: 8% of the teacher)")
    fig.tight_layout()
    tmp = out / ".pareto.png.tmp"
    fig.savefig(tmp, format="png", dpi=120)
    os.replace(tmp, out / "pareto.png")
    (out / "rows.json").write_text(json.dumps(rows, indent=1))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write")
    w.add_argument("recipe")
    w.add_argument("--out", required=True)
    w.add_argument("--step2-steps", type=int, default=None)
    w.add_argument("--combined", nargs="*", metavar="A+B", help="also rows that make several rows' changes")
    w.add_argument("--teacher-cache", default=None, metavar="DIR",
                   help="distill.teacher_cache of the reference and every row, in DIR (a speed setting)")
    w.add_argument("--teacher-cache-gb", type=float, default=40.0, help="its max_gb (default 40)")
    w.set_defaults(func=cmd_write)
    r = sub.add_parser("run")
    r.add_argument("--out", required=True)
    r.add_argument("rows", nargs="+")
    r.set_defaults(func=cmd_run)
    st = sub.add_parser("stages")
    st.add_argument("--out", required=True)
    st.set_defaults(func=cmd_stages)
    t = sub.add_parser("table")
    t.add_argument("--out", required=True)
    t.set_defaults(func=cmd_table)
    a = p.parse_args(argv)
    return a.func(a)


if __name__ == "__main__":
    sys.exit(main())
