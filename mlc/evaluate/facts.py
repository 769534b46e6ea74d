"""Facts about a model folder that are not scores: parameters, disk size, fingerprint, CPU inference speed.

Speed is only comparable between models measured together: :func:`measure_speeds` loads every model in one
process and measures them in interleaved rounds, taking the median per model, so that a moment of load on
a shared machine touches all of them alike (two models of the same shape then show the same speed within
noise).
"""
from __future__ import annotations

import hashlib
import statistics
import time
from pathlib import Path

from mlc.errors import MlcError
from mlc.evaluate.data import load_tokenizer
from mlc.models.io import load_encoder

SPEED_BATCH1_SENTENCES = 32
SPEED_BATCH32_BATCHES = 4
SPEED_ROUNDS = 3
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth")


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for pattern in WEIGHT_FILES for p in Path(folder).glob(pattern))


def model_fingerprint(folder: Path) -> str:
    """SHA-256 over config.json, the tokenizer files and the weight files (names and contents)."""
    h = hashlib.sha256()
    names = sorted({p.name for pattern in WEIGHT_FILES + ("config.json", "tokenizer*.json", "*.model")
                    for p in Path(folder).glob(pattern)})
    for name in names:
        h.update(name.encode() + b"\0")
        with open(Path(folder) / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def parameter_counts(encoder) -> dict:
    from mlc.models.stats import parameter_breakdown

    b = parameter_breakdown(encoder)
    emb = b["word_embeddings"] + b["position_embeddings"]
    return {"total": b["total"], "embeddings": emb, "rest": b["total"] - emb, "breakdown": b}


def inference_speed(encoder, tokenizer, sentences: list[str], max_length: int) -> dict:
    """Sentences per second of the bare encoder forward (tokenization included) on CPU at batch 1 and 32,
    torch's default threads, after one warm-up call each: from the median call (``mean_*``: from the total
    time); ``sentences`` are cycled as needed. One measurement: compare models with :func:`measure_speeds`."""
    import torch

    if not sentences:
        raise MlcError("no sentences to measure the inference speed on")
    need = max(SPEED_BATCH1_SENTENCES, 32 * SPEED_BATCH32_BATCHES)
    pool = [sentences[i % len(sentences)] for i in range(need)]
    encoder.eval()

    def run(batch):
        enc = tokenizer(batch, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        encoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])

    def timed(batch) -> float:
        t = time.perf_counter()
        run(batch)
        return time.perf_counter() - t

    result = {}
    with torch.inference_mode():
        run(pool[:1])
        one = [timed([s]) for s in pool[:SPEED_BATCH1_SENTENCES]]
        run(pool[:32])
        many = [timed(pool[b * 32:(b + 1) * 32]) for b in range(SPEED_BATCH32_BATCHES)]
    # the median call, so that a moment of contention on a shared machine does not decide the number
    result["batch_1"] = 1 / statistics.median(one)
    result["batch_32"] = 32 / statistics.median(many)
    result["mean_batch_1"] = len(one) / sum(one)
    result["mean_batch_32"] = 32 * len(many) / sum(many)
    result.update({"threads": torch.get_num_threads(), "device": "cpu",
                   "sentences_batch_1": SPEED_BATCH1_SENTENCES, "sentences_batch_32": 32 * SPEED_BATCH32_BATCHES,
                   "max_length": max_length, "includes_tokenization": True})
    return result


def measure_speeds(folders: dict[str, Path], sentences: list[str], max_length: int, *,
                   rounds: int = SPEED_ROUNDS, source: str | None = None) -> dict[str, dict]:
    """Every model's speed measured together: all loaded in this process, ``rounds`` interleaved rounds of
    :func:`inference_speed`, the median of the rounds per model."""
    loaded = {name: (load_encoder(Path(f)), load_tokenizer(Path(f))) for name, f in folders.items()}
    got: dict[str, list[dict]] = {name: [] for name in loaded}
    for _ in range(rounds):
        for name, (encoder, tokenizer) in loaded.items():
            got[name].append(inference_speed(encoder, tokenizer, sentences, max_length))
    out = {}
    for name, runs in got.items():
        s = dict(runs[0])
        for k in ("batch_1", "batch_32", "mean_batch_1", "mean_batch_32"):
            s[k] = statistics.median(r[k] for r in runs)
        s.update({"rounds": rounds, "interleaved_with": list(loaded), "sentences_from": source})
        out[name] = s
    return out


def describe_model(model_dir: Path | str) -> dict:
    """Architecture, parameters (total, embeddings, rest, by component) and disk size."""
    model_dir = Path(model_dir)
    encoder = load_encoder(model_dir)
    cfg = encoder.config
    return {
        "model_type": cfg.model_type,
        "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size, "heads": cfg.num_attention_heads,
        "ffn": cfg.intermediate_size, "vocab_size": cfg.vocab_size,
        "parameters": parameter_counts(encoder),
        "disk_bytes": folder_bytes(model_dir), "weights_bytes": weights_bytes(model_dir),
    }
