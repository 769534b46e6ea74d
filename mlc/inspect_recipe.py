"""`mlc inspect`: the recipe's teacher, corpus and task data, summarised before anything is trained."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from mlc.data import tasks as task_data
from mlc.data.corpus import iter_corpus
from mlc.data.text import CorpusStats
from mlc.layout import RunLayout
from mlc.models.stats import parameter_breakdown
from mlc.models.io import load_model, load_tokenizer
from mlc.models.teacher import materialize_teacher


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def inspect_run(recipe) -> str:
    lines = [f"recipe {recipe.name} ({recipe.source_file}), language {recipe.language}, output {recipe.out}"]

    folder = materialize_teacher(recipe.teacher.source, RunLayout.of(recipe).teacher)
    model, tokenizer = load_model(folder, with_head=False), load_tokenizer(folder)
    cfg = model.config
    counts = parameter_breakdown(model)
    emb = counts["word_embeddings"]
    lines += [
        "",
        f"teacher  {recipe.teacher.source} -> {folder}",
        f"  {cfg.model_type}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
        f"{cfg.num_attention_heads} heads, FFN {cfg.intermediate_size}, {cfg.max_position_embeddings} positions",
        f"  parameters {counts['total'] / 1e6:.1f}M, of which word embeddings {emb / 1e6:.1f}M "
        f"({emb / counts['total']:.0%}); on disk {_folder_bytes(folder) / 2**20:.0f} MiB",
        f"  tokenizer: {len(tokenizer)} tokens, {cfg.vocab_size} embedding rows, mask token "
        f"{tokenizer.mask_token!r} = {tokenizer.mask_token_id}",
    ]

    stats = CorpusStats()
    n_words = n_tokens = 0
    used = Counter()
    batch: list[str] = []

    def count(batch):  # a batch at a time: the fast tokenizer encodes it on every core
        nonlocal n_words, n_tokens
        for sentence, ids in zip(batch, tokenizer(batch, add_special_tokens=False)["input_ids"]):
            n_words += len(sentence.split())
            n_tokens += len(ids)
            used.update(ids)

    for sentence in iter_corpus(recipe, stats):
        batch.append(sentence)
        if len(batch) == 2048:
            count(batch)
            batch = []
    if batch:
        count(batch)
    lines += [
        "",
        f"corpus   {len(recipe.corpus.sources)} source(s): {stats.read} lines read, {stats.kept} kept "
        f"({stats.duplicates} duplicates, {stats.in_eval_sets} in dev/test sets, "
        f"{stats.too_short} too short, {stats.too_long} too long)",
    ]
    for label, c in stats.per_source.items():
        lines.append(f"  {label}: {c['read']} read, {c['kept']} kept")
    if stats.kept:
        lines.append(f"  {n_words} words, {n_tokens} tokens ({n_tokens / max(n_words, 1):.2f} per word), "
                     f"{len(used)} distinct token ids of {len(tokenizer)}")

    if recipe.evaluate:
        data_dir = Path(recipe.evaluate.data_dir)
        lines += ["", f"tasks    {data_dir}"]
        for task in recipe.evaluate.tasks:
            sizes = []
            for split in task_data.SPLITS:
                ds = task_data.load_task(data_dir, task, split)
                sizes.append(f"{split} {len(ds)}")
            labels = task_data.task_labels(data_dir, task)
            lines.append(f"  {task:<9} {', '.join(sizes)}; {len(labels)} labels")
    return "\n".join(lines)
