"""`mlc data ...`: the corpus as WebDataset shards."""
from __future__ import annotations

from pathlib import Path

from mlc.errors import MlcError


def default_tokenizer(recipe) -> Path:
    """The trimmed teacher's folder when the vocabulary stage wrote one, else the teacher's."""
    from mlc.models.teacher import materialize_teacher

    trimmed = recipe.out / "teacher-trimmed"
    if (trimmed / "tokenizer.json").is_file() or (trimmed / "tokenizer_config.json").is_file():
        return trimmed
    return materialize_teacher(recipe.teacher.source, recipe.out / "teacher")


def prepare_from_recipe(recipe, tokenizer_dir=None, out_dir=None, *, overwrite: bool = False) -> dict:
    """The recipe's corpus (cleaned, deduplicated, without dev/test text) written as shards; the manifest."""
    from mlc.data.corpus import iter_corpus
    from mlc.data.shards import prepare_shards
    from mlc.data.text import CorpusStats
    from mlc.paths import check_replaceable

    out_dir = check_replaceable(out_dir if out_dir else recipe.out / "shards", overwrite)  # before any work
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir else default_tokenizer(recipe)
    stats = CorpusStats()
    settings = {"recipe": recipe.name, "recipe_file": recipe.source_file, "language": recipe.language,
                "corpus_spec": recipe.corpus.model_dump(), "corpus": stats}
    manifest = prepare_shards(iter_corpus(recipe, stats), tokenizer_dir, out_dir, recipe.shards, settings,
                              overwrite=overwrite)
    if manifest["sentences"] != stats.kept:  # the reader and the writer must agree, or the counts lie
        raise MlcError(f"the corpus yielded {stats.kept} sentences but {manifest['sentences']} were written",
                       str(out_dir))
    return manifest


def _cmd_prepare(args) -> int:
    from mlc.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    out = Path(args.out) if args.out else recipe.out / "shards"
    m = prepare_from_recipe(recipe, args.tokenizer, out, overwrite=args.overwrite)
    corpus = m["settings"]["corpus"]
    print(f"read {corpus['read']} sentences, kept {corpus['kept']} ({corpus['duplicates']} duplicates, "
          f"{corpus['in_eval_sets']} in dev/test sets, {corpus['too_short']} too short, "
          f"{corpus['too_long']} too long)")
    print(f"wrote {m['sequences']} sequences of {m['seq_len']} tokens ({m['tokens']} tokens, "
          f"{m['padding_tokens'] / max(1, m['sequences'] * m['seq_len']):.1%} padding, "
          f"{m['split_sentences']} sentences longer than a sequence split) in {len(m['shards'])} shards "
          f"to {out} in {m['seconds']:.1f} s")
    print(f"tokenizer {m['tokenizer']['dir']} ({m['tokenizer']['hash']})")
    return 0


def register(subparsers) -> None:
    d = subparsers.add_parser("data", help="Corpus data: write the recipe's corpus as WebDataset shards.",
                              description="Corpus data for distillation.")
    dsub = d.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    p = dsub.add_parser(
        "prepare", help="Clean, deduplicate, tokenize and pack the recipe's corpus into WebDataset shards.",
        description="Read the recipe's corpus (cleaned, deduplicated, every dev/test sentence removed), "
                    "tokenize it, pack it into fixed-length sequences and write WebDataset tar shards "
                    "with a manifest.json (counts, checksums, tokenizer hash). The output folder is "
                    "replaced atomically.")
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("--tokenizer", metavar="DIR",
                   help="HF folder whose tokenizer to use (default: <output_dir>/teacher-trimmed if it exists, "
                        "else the recipe's teacher)")
    p.add_argument("--out", metavar="DIR", help="folder to write (default: <output_dir>/shards)")
    p.add_argument("--overwrite", action="store_true",
                    help="replace the output folder even if mlc did not write it (its contents are deleted)")
    p.set_defaults(func=_cmd_prepare)
