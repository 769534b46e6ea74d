"""`mlc trim RECIPE`, `mlc prune MODEL ...` and `mlc size FOLDER...`."""
from __future__ import annotations

import json
from pathlib import Path

from mlc.errors import MlcError
from mlc.layout import RunLayout
from mlc.paths import add_overwrite_flag


def _cmd_trim(args) -> int:
    from mlc.models.stats import folder_sizes, format_sizes
    from mlc.models.teacher import materialize_teacher
    from mlc.paths import check_replaceable
    from mlc.recipe import load_recipe
    from mlc.surgery.vocab import trim_from_recipe

    recipe = load_recipe(args.recipe)
    layout = RunLayout.of(recipe)
    out = check_replaceable(args.out if args.out else layout.trimmed, args.overwrite)
    teacher = Path(args.teacher) if args.teacher else materialize_teacher(recipe.teacher.source, layout.teacher)
    r = trim_from_recipe(recipe, teacher, out, overwrite=args.overwrite)
    from mlc.models.card import build_card, recipe_card_inputs, write_card

    write_card(out, build_card(out, what=f"The teacher with its vocabulary trimmed to {recipe.language} "
                               f"({r['tokens_kept']:,} of {r['vocab_before']:,} tokens)", teacher_dir=teacher,
                               name=f"{recipe.name}-{Path(out).name}", **recipe_card_inputs(recipe, trained=False)))
    held = r["heldout"]
    print(f"kept {r['tokens_kept']:,} of {r['vocab_before']:,} tokens; corpus coverage {r['coverage']:.4f} "
          f"({r['corpus_tokens']:,} tokens, languages: {', '.join(r['languages'])})")
    if held["sentences"]:
        print(f"held-out <unk> rate {held['unk_rate']:.4%} (before {held['unk_rate_before']:.4%}) on "
              f"{held['sentences']} sentences")
    print(f"parameters {r['parameters_before']:,} -> {r['parameters_after']:,}; written to {out}")
    print(format_sizes(folder_sizes(out)))
    return 0


def _calibration_batches(folder: Path, text: Path, n: int, batch_size: int, seq_len: int, seed: int):
    import torch
    from transformers import AutoTokenizer, DataCollatorForLanguageModeling

    from mlc.data.text import read_text_file

    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    lines = []
    for line in read_text_file(text):
        if line.strip():
            lines.append(line.strip())
        if len(lines) >= n * batch_size:
            break
    if not lines:
        raise MlcError("no text to score importance on", str(text))
    collator = DataCollatorForLanguageModeling(tok, mlm=True, mlm_probability=0.15, seed=seed)
    batches = []
    for i in range(0, len(lines), batch_size):
        enc = tok(lines[i:i + batch_size], truncation=True, max_length=seq_len)
        rows = [{k: enc[k][j] for k in enc} for j in range(len(enc["input_ids"]))]
        batch = collator(rows)
        batches.append({k: v for k, v in batch.items() if isinstance(v, torch.Tensor)})
    return batches


def _cmd_prune(args) -> int:
    from mlc.models.stats import folder_sizes, format_sizes
    from mlc.surgery import prune as P
    from mlc.models.io import has_mlm_head, load_model
    from mlc.surgery.export import export_sliced

    from mlc.paths import check_replaceable

    model_dir = Path(args.model)
    check_replaceable(args.out, args.overwrite)  # before any model is loaded or scored
    scoring = (args.ffn_dim, args.heads, args.hidden_size, args.text, args.importance, args.hidden_importance,
               args.scope)
    if args.masks and any(v is not None for v in scoring):
        raise MlcError("give either --masks or pruning targets and importance options, not both", "--masks")
    args.importance = args.importance or "taylor"
    args.scope = args.scope or "per_layer"
    if not args.masks and not any(v is not None for v in (args.ffn_dim, args.heads, args.hidden_size)):
        raise MlcError("nothing to prune: give --ffn-dim, --heads or --hidden-size (or --masks)")
    uses_taylor = not args.masks and "taylor" in (args.importance, args.hidden_importance or args.importance)
    if uses_taylor:
        if not args.text:
            raise MlcError("Taylor importance needs calibration text: --text FILE (one sentence a line)", "--text")
        if not (model_dir / "config.json").is_file() or not has_mlm_head(model_dir):
            raise MlcError("Taylor importance here uses the MLM loss, so the model needs an MLM head "
                           "(use --importance magnitude/first, or score in `mlc distill --step 2`)", str(model_dir))
    if args.text and not uses_taylor:
        raise MlcError("only Taylor importance reads calibration text", "--text")
    calib_opts = {"--batches": args.batches, "--batch-size": args.batch_size, "--seq-len": args.seq_len,
                  "--seed": args.seed}
    for flag, value in calib_opts.items():
        if value is not None and not uses_taylor:
            raise MlcError("only Taylor importance reads calibration text", flag)
        if value is not None and value < (0 if flag == "--seed" else 1):
            raise MlcError(f"must be positive, not {value}", flag)
    model = load_model(model_dir).eval()
    if args.masks:
        masks = P.load_masks(args.masks)
        calib = None
    else:
        spec = P.PruneTargets(ffn_dim=args.ffn_dim, heads=args.heads, hidden_size=args.hidden_size,
                              scope=args.scope)
        calib = _calibration_batches(model_dir, Path(args.text), args.batches or 16, args.batch_size or 8,
                                     args.seq_len or 128, args.seed or 0) if uses_taylor else []
        scores = P.score_importance(model, calib, method=args.importance, hidden_method=args.hidden_importance)
        try:
            masks = P.make_masks(model, scores, spec)
        except MlcError as e:  # name the command-line flag rather than the recipe key
            flag = {"prune.ffn_dim": "--ffn-dim", "prune.heads": "--heads", "prune.hidden_size": "--hidden-size"}
            raise MlcError(e.message, flag.get(e.where, e.where)) from None
    check = None
    if calib:
        check = {k: v for k, v in calib[0].items() if k != "labels"}
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        check = dict(tok(["Habari za asubuhi, rafiki yangu.", "The quick brown fox."], padding=True,
                         return_tensors="pt"))
    summary = export_sliced(model, masks, args.out, model_dir, check_inputs=check, overwrite=args.overwrite)
    from mlc.models.card import build_card, write_card

    k = summary["kept"]
    write_card(args.out, build_card(args.out, what=f"{model_dir.name} pruned to FFN {max(k['ffn'])}, "
                                    f"{k['heads'][0]} heads, hidden {k['hidden']}", teacher_source=str(model_dir)))
    if args.masks_out:
        P.save_masks(masks, args.masks_out)
    print(f"kept FFN {k['ffn']}, heads {k['heads']} x {k['head_size']}, hidden {k['hidden']}; "
          f"max |masked - exported| {summary['max_abs_diff']:.2e}; written to {args.out}")
    print(format_sizes(folder_sizes(args.out)))
    return 0


def _cmd_size(args) -> int:
    from mlc.models.stats import folder_sizes, format_sizes

    reports = {f: folder_sizes(f) for f in args.folders}
    if args.json:
        print(json.dumps(reports, indent=2))
    else:
        print("\n\n".join(format_sizes(r, title=str(f)) for f, r in reports.items()))
    return 0


def register(subparsers) -> None:
    t = subparsers.add_parser(
        "trim", help="Trim the teacher's vocabulary to the recipe's corpus (tokenizer, embeddings, MLM head).",
        description="Keep the tokens the recipe's corpus (and its task text, vocab.task_splits) uses, by the "
                    "vocab section's rule; rewrite tokenizer.json, the SentencePiece model if any, the "
                    "embeddings and the MLM head. Prints coverage, <unk> rate on the tasks' dev text and sizes.")
    t.add_argument("recipe", help="recipe YAML file")
    t.add_argument("--teacher", help="teacher HF folder (default: the recipe's teacher, imported to R/teacher)")
    t.add_argument("--out", help="output folder (default: R/teacher-trimmed), replaced atomically")
    add_overwrite_flag(t)
    t.set_defaults(func=_cmd_trim)

    p = subparsers.add_parser(
        "prune", help="Prune FFN neurons, heads and hidden size of an HF model and export the dense result.",
        description="Score importance (taylor: |grad x weight| under the MLM loss on --text; magnitude; first), "
                    "make keep-masks for the targets, slice the model into a dense stock model and verify the "
                    "export equals the masked model. With --masks, export existing masks (e.g. step 2's).")
    p.add_argument("model", help="HF model folder to prune")
    p.add_argument("--out", required=True, help="folder for the dense pruned model (replaced atomically)")
    add_overwrite_flag(p)
    p.add_argument("--masks", help="existing mask file (safetensors) to export instead of scoring")
    p.add_argument("--masks-out", help="also write the masks to this file (for distillation step 2)")
    p.add_argument("--ffn-dim", type=int, help="FFN neurons kept per layer (global scope: on average)")
    p.add_argument("--heads", type=int, help="attention heads kept per layer")
    p.add_argument("--hidden-size", type=int, help="hidden dimensions kept")
    p.add_argument("--importance", choices=["taylor", "magnitude", "first"],
                   help="importance of FFN neurons and heads (default taylor)")
    p.add_argument("--hidden-importance", choices=["taylor", "magnitude", "first"],
                   help="importance of hidden dimensions (default: as --importance)")
    p.add_argument("--scope", choices=["per_layer", "global"],
                   help="rank FFN neurons per layer or across layers (default per_layer)")
    p.add_argument("--text", help="calibration text for Taylor importance, one sentence a line")
    p.add_argument("--batches", type=int, help="calibration batches (default 16)")
    p.add_argument("--batch-size", type=int, help="sentences per calibration batch (default 8)")
    p.add_argument("--seq-len", type=int, help="max tokens per sentence (default 128)")
    p.add_argument("--seed", type=int, help="seed of the MLM masking of the calibration text")
    p.set_defaults(func=_cmd_prune)

    s = subparsers.add_parser("size", help="Parameters and disk size per component of HF model folders.",
                              description="Parameters and bytes per component (embeddings, attention, FFN, "
                                          "LayerNorms, MLM head, pooler) and file sizes of HF model folders.")
    s.add_argument("folders", nargs="+", help="HF model folders")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.set_defaults(func=_cmd_size)

