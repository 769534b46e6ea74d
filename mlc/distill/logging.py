"""What a run reports: one JSON line per logging step, the same scalars to each tracker of the recipe's
``logging.report_to`` (TensorBoard by default; :mod:`mlc.distill.trackers`), a progress bar on rank 0.

Scalars (tracker tag = JSON key): ``loss/total``, ``loss/<term>`` for every active loss term
(unweighted, averaged over ranks and micro-batches since the last log), ``lr``, ``grad_norm``,
``tokens_per_s`` (non-padding tokens of all ranks), ``memory/max_rss_mb`` and, on CUDA,
``memory/cuda_max_allocated_mb``. Held-out evaluations (``eval_every``) are lines of their own,
``{"step": s, "heldout/loss/total": ..., "heldout/loss/<term>": ..., "heldout/sequences": n}``; pruning
rounds are ``{"step": s, "event": {...}}`` lines.
"""
from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import torch


def memory_stats() -> dict:
    out = {"memory/max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    if torch.cuda.is_available():
        out["memory/cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


class RunLog:
    """Accumulates per micro-batch values; ``flush`` (collective) averages over ranks and writes on rank 0."""

    def __init__(self, folder: Path | str, rank: int, total_steps: int, start_step: int, description: str,
                 resumed: bool, trackers: list | None = None):
        """``trackers`` (rank 0's, from :func:`mlc.distill.trackers.open_trackers`) get every scalar."""
        self.rank = rank
        self.folder = Path(folder)
        self.sums: dict[str, float] = {}
        self.count = 0
        self.tokens = 0
        self.t0 = time.perf_counter()
        self.trackers = list(trackers or []) if rank == 0 else []
        self.bar = None
        self.jsonl = None
        if rank == 0:
            from tqdm import tqdm

            self.folder.mkdir(parents=True, exist_ok=True)
            self.jsonl = open(self.folder / "log.jsonl", "a" if resumed else "w", encoding="utf-8")
            self.bar = tqdm(total=total_steps, initial=start_step, desc=description, dynamic_ncols=True)

    def _scalars(self, values: dict, step: int) -> None:
        for t in self.trackers:
            t.log(values, step)

    def add(self, total: torch.Tensor, terms: dict, tokens: int) -> None:
        """Add one micro-batch; its host values stay in ``last_total``/``last_terms`` for the finiteness check."""
        self.last_total = float(total.detach())
        self.last_terms = {k: float(v) for k, v in terms.items()}
        self.sums["loss/total"] = self.sums.get("loss/total", 0.0) + self.last_total
        for k, v in self.last_terms.items():
            self.sums[f"loss/{k}"] = self.sums.get(f"loss/{k}", 0.0) + v
        self.count += 1
        self.tokens += tokens

    def tick(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def flush(self, step: int, lr: float, grad_norm, extra: dict | None = None) -> dict:
        import torch.distributed as dist

        keys = sorted(self.sums)
        vec = torch.tensor([self.sums[k] for k in keys] + [float(self.count), float(self.tokens)],
                           dtype=torch.float64)
        world = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(vec)
            world = dist.get_world_size()
        count = vec[-2].item()
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        record = {"step": step}
        record.update({k: vec[i].item() / max(count, 1.0) for i, k in enumerate(keys)})
        record["lr"] = lr
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        record["tokens_per_s"] = vec[-1].item() / elapsed
        record["ranks"] = world
        record.update(extra or {})
        record.update(memory_stats())
        record["time"] = time.time()
        if self.rank == 0:
            self._scalars({k: v for k, v in record.items() if k not in ("step", "time", "ranks")}, step)
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
            self.bar.set_postfix(loss=f"{record['loss/total']:.4f}")
        self.sums, self.count, self.tokens, self.t0 = {}, 0, 0, time.perf_counter()
        return record

    def note(self, step: int, values: dict) -> None:
        """Rank 0: record an event (e.g. a pruning round) as scalars and one JSON line."""
        self._scalars(values, step)
        self.jsonl.write(json.dumps({"step": step, "event": values}) + "\n")
        self.jsonl.flush()

    def heldout(self, step: int, values: dict) -> None:
        """Rank 0: a held-out evaluation (``heldout/...`` scalars) as scalars and one JSON line."""
        self._scalars(values, step)
        self.jsonl.write(json.dumps({"step": step, **values, "time": time.time()}) + "\n")
        self.jsonl.flush()

    def close(self, status: str = "finished") -> None:
        """``status``: finished, stopped (--stop-after) or failed, which the trackers that keep one record."""
        if self.rank == 0:
            for t in self.trackers:
                t.close(status)
            self.jsonl.close()
            self.bar.close()
