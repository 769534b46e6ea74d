"""`mlc data ...`: the corpus as WebDataset shards."""
from __future__ import annotations

from pathlib import Path

from mlc.errors import MlcError
from mlc.layout import RunLayout
from mlc.paths import add_overwrite_flag


READ_AHEAD_SENTENCES = 200_000  # cleaned sentences the corpus reader may hold ahead of the shards (~60 MB)


def default_tokenizer(recipe) -> Path:
    """The tokenizer of the recipe's shards: the trimmed teacher's (``R/teacher-trimmed``) when the recipe trims
    the vocabulary, else the teacher's. Before the vocabulary is trimmed (``mlc data prepare`` run on its own),
    the teacher's, with a warning: such shards fit the untrimmed teacher, not this recipe's students."""
    import warnings

    from mlc.models.teacher import materialize_teacher

    layout = RunLayout.of(recipe)
    if recipe.vocab.enabled:
        trimmed = layout.trimmed
        if (trimmed / "tokenizer.json").is_file() or (trimmed / "tokenizer_config.json").is_file():
            return trimmed
        warnings.warn(f"the recipe trims the vocabulary but {trimmed} does not exist yet: these shards use the "
                      "teacher's full tokenizer, which this recipe's distillation does not read; run `mlc trim "
                      "RECIPE` first (`mlc compress` writes its own shards after trimming)", UserWarning,
                      stacklevel=2)
    return materialize_teacher(recipe.teacher.source, layout.teacher)


def prepare_from_recipe(recipe, tokenizer_dir=None, out_dir=None, *, overwrite: bool = False,
                        part: tuple[int, int] | None = None, progress: bool | None = None) -> dict:
    """The recipe's corpus (cleaned, deduplicated, without dev/test text) written as shards; the manifest.

    With ``part=(i, N)`` only the blocks ``b % N == i`` of the cleaned corpus are tokenized and written (the
    whole corpus is still read and cleaned, since deduplication needs every earlier sentence), to
    :func:`~mlc.data.shards.part_dir` of ``out_dir``; :func:`merge_from_recipe` joins the N parts."""
    import itertools

    from mlc.data.corpus import ReadAhead, exclusion_keys, iter_corpus_batches
    from mlc.data.shards import part_dir, prepare_shards
    from mlc.data.text import CorpusStats
    from mlc.paths import check_replaceable

    out_dir = Path(out_dir) if out_dir else RunLayout.of(recipe).shards
    if part is not None:
        out_dir = part_dir(out_dir, *part)
    out_dir = check_replaceable(out_dir, overwrite)  # before any work
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir else default_tokenizer(recipe)
    stats = CorpusStats()
    settings = {"recipe": recipe.name, "recipe_file": recipe.source_file, "language": recipe.language,
                "corpus_spec": recipe.corpus.model_dump(), "corpus": stats}
    # the corpus is read in a thread ahead of the shards (up to READ_AHEAD_SENTENCES cleaned sentences): its
    # worker processes start and clean files while this thread loads the tokenizer, when the tokenizer's
    # threads do not use the cores yet. The dev/test sentences to exclude are read here first (0.4 s for the
    # Swahili tasks): read in the reader thread, they took 4 s, waiting for the GIL while the tokenizer's JSON
    # was parsed. transformers is imported first, whole: a source read through `datasets` (hf_dataset) looks up
    # transformers.PreTrainedTokenizerBase in a module this thread might still be importing (an AttributeError)
    from transformers import PreTrainedTokenizerBase  # noqa: F401
    batches = ReadAhead(iter_corpus_batches(recipe, stats, exclude=exclusion_keys(recipe)),
                        depth=1024, cost=lambda item: len(item[1]), budget=READ_AHEAD_SENTENCES)
    sentences = itertools.chain.from_iterable(batch for _, batch in batches)
    try:
        manifest = prepare_shards(sentences, tokenizer_dir, out_dir, recipe.shards, settings,
                                  overwrite=overwrite, part=part, progress=progress)
    finally:
        batches.close()  # stops the reader (and its worker processes) if the shards failed
    if part is None and manifest["sentences"] != stats.kept:  # the reader and the writer must agree
        raise MlcError(f"the corpus yielded {stats.kept} sentences but {manifest['sentences']} were written",
                       str(out_dir))
    return manifest


def merge_from_recipe(recipe, out_dir=None, parts: int | None = None, *, overwrite: bool = False) -> dict:
    """The parts ``<out_dir>.parts/i-of-N`` written by ``prepare_from_recipe(part=(i, N))`` merged into
    ``out_dir`` (default <output_dir>/shards); ``parts`` (N) is needed only if parts of several N are there."""
    from mlc.data.shards import merge_parts, part_dir

    out_dir = Path(out_dir) if out_dir else RunLayout.of(recipe).shards
    root = part_dir(out_dir, 0, 1).parent
    if not root.is_dir():
        raise MlcError("no parts to merge: run 'mlc data prepare RECIPE --part i/N' for every i first", str(root))
    found = sorted(p for p in root.iterdir() if p.is_dir() and "-of-" in p.name and not p.name.startswith("."))
    counts = sorted({int(p.name.split("-of-")[1]) for p in found})
    if parts is None:
        if len(counts) != 1:
            raise MlcError(f"parts of several splits are here (N = {counts}); say which with --parts N", str(root))
        parts = counts[0]
    dirs = [part_dir(out_dir, i, parts) for i in range(parts)]
    missing = [str(d) for d in dirs if not d.is_dir()]
    if missing:
        raise MlcError(f"{len(missing)} of {parts} parts are missing: {', '.join(missing[:5])}", str(root))
    return merge_parts(dirs, out_dir, overwrite=overwrite)


def _summary(m, out) -> None:
    print(f"wrote {m['sequences']} sequences of {m['seq_len']} tokens ({m['tokens']} tokens, "
          f"{m['padding_tokens'] / max(1, m['sequences'] * m['seq_len']):.1%} padding, "
          f"{m['split_sentences']} sentences longer than a sequence split) in {len(m['shards'])} shards "
          f"to {out} in {m['seconds']:.1f} s")
    print(f"tokenizer {m['tokenizer']['dir']} ({m['tokenizer']['hash']})")


def _cmd_prepare(args) -> int:
    from mlc.data.shards import parse_part, part_dir
    from mlc.recipe import load_recipe

    part = parse_part(args.part) if args.part else None
    recipe = load_recipe(args.recipe)
    out = Path(args.out) if args.out else RunLayout.of(recipe).shards
    m = prepare_from_recipe(recipe, args.tokenizer, out, overwrite=args.overwrite, part=part)
    corpus = m["settings"]["corpus"]
    print(f"read {corpus['read']} sentences, kept {corpus['kept']} ({corpus['duplicates']} duplicates, "
          f"{corpus['in_eval_sets']} in dev/test sets, {corpus['too_short']} too short, "
          f"{corpus['too_long']} too long)")
    if part is not None:
        print(f"part {part[0]}/{part[1]}: {m['sentences']} of these sentences")
    _summary(m, part_dir(out, *part) if part else out)
    if part is not None:
        print(f"when every part is written: mlc data merge {args.recipe}" + (f" --out {args.out}" if args.out else ""))
    return 0


def _cmd_merge(args) -> int:
    from mlc.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    out = Path(args.out) if args.out else RunLayout.of(recipe).shards
    m = merge_from_recipe(recipe, out, args.parts, overwrite=args.overwrite)
    print(f"merged {m['merged']['parts']} parts ({m['sentences']} sentences)")
    _summary(m, out)
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
    p.add_argument("--part", metavar="i/N",
                   help="write only part i of N (0 <= i < N; the blocks b of shards.block_sentences sentences of "
                        "the cleaned corpus with b %% N == i) to <out>.parts/i-of-N, e.g. one part per machine; "
                        "then 'mlc data merge' joins them")
    add_overwrite_flag(p)
    p.set_defaults(func=_cmd_prepare)
    m = dsub.add_parser(
        "merge", help="Join the parts written by 'mlc data prepare --part i/N' into one shard folder.",
        description="Check the N parts in <out>.parts/ (the same tokenizer, layout and corpus; each i once; "
                    "every shard's checksum), hard-link their shards into <out> (default <output_dir>/shards) "
                    "and write one manifest. The result holds the same packed sequences as one "
                    "'mlc data prepare' without --part.")
    m.add_argument("recipe", help="recipe YAML file")
    m.add_argument("--out", metavar="DIR", help="folder to write (default: <output_dir>/shards); the parts are "
                                                "read from DIR.parts/")
    m.add_argument("--parts", type=int, metavar="N", help="the number of parts, if parts of several N are there")
    add_overwrite_flag(m)
    m.set_defaults(func=_cmd_merge)
