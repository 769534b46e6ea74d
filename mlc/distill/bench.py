"""Training-throughput benchmark of one distillation step (``mlc bench RECIPE``), in one process.

The step is the engine's own: :class:`~mlc.distill.engine.Teacher`, :class:`~mlc.distill.engine.Harness`
wrapped by :func:`~mlc.distill.engine.initialize` (DeepSpeed, world size 1, set up in-process), fed by the
run's :class:`~mlc.data.stream.ShardStream`. Nothing of the step is re-implemented here: the time split
comes from clocks around the calls the loop makes (``next(batches)``, ``teacher(...)``, ``engine(...)``,
``engine.backward``, ``engine.step``) and from forward hooks on the student's encoder (``base_model``), which
separate the student forward from the losses inside ``engine(...)``.

FLOPs are counted analytically (:func:`step_flops`): matrix multiplications only (2 FLOPs per
multiply-add), embeddings, softmax, layer norms and element-wise work left out.

- encoder layer, per token: ``2 (4 H^2 + 2 H F)`` (Q, K, V, output projection, the two FFN matrices) +
  ``4 L H`` (scores and the weighted sum over the ``L`` positions of the packed sequence);
- MLM head transform, per token (every position, as the engine runs it): ``2 H^2``;
- vocabulary projection, per selected row: ``2 H V`` (teacher: the logit loss's rows; student: the logit
  loss's rows and the MLM rows);
- student backward = 2 x its forward (input and weight gradients), teacher forward only.

MFU = achieved FLOP/s / the peak given by ``--peak-tflops`` (default: :data:`DEFAULT_PEAK_TFLOPS`, by device).
"""
from __future__ import annotations

import contextlib
import os
import resource
import socket
import time
from dataclasses import dataclass

import torch

from mlc.errors import MlcError
from mlc.models.arch import Shape
from mlc.runtime import resolve_precision

# Dense peak TFLOP/s used when --peak-tflops is not given: H100 SXM bf16 dense 989; on CPU a nominal 1.0
# (two cores with AVX-512 FMA at ~3 GHz in fp32 give ~0.2; pass the measured or datasheet value instead).
DEFAULT_PEAK_TFLOPS = {"cuda": 989.0, "cpu": 1.0}
PHASES = ("data", "teacher", "student_forward", "losses", "backward", "optimizer")


# --- analytic FLOPs -----------------------------------------------------------------------------

def encoder_flops(shape: Shape, tokens: int, seq_len: int) -> int:
    """Forward FLOPs of the encoder layers on ``tokens`` tokens in sequences of ``seq_len``."""
    h, f = shape.hidden, shape.ffn
    per_token = 2 * (4 * h * h + 2 * h * f) + 4 * seq_len * h
    return shape.layers * per_token * tokens


def step_flops(teacher: Shape | None, student: Shape, *, tokens: int, seq_len: int, logit_rows: int = 0,
               mlm_rows: int = 0, teacher_head: bool = False, student_head: bool = False) -> dict:
    """FLOPs of one micro-batch, by part: ``teacher`` (forward), ``student_forward``, ``student_backward``
    (2x forward), ``losses`` (the vocabulary projections: teacher logits forward, student logits forward and
    backward), and ``total``. ``tokens`` counts every position (padding included: it is computed)."""
    t = 0
    if teacher is not None:
        t = encoder_flops(teacher, tokens, seq_len)
        if teacher_head:
            t += 2 * teacher.hidden * teacher.hidden * tokens
    s = encoder_flops(student, tokens, seq_len)
    if student_head:
        s += 2 * student.hidden * student.hidden * tokens
    losses = 3 * 2 * student.hidden * student.vocab_size * (logit_rows + mlm_rows)
    if teacher is not None and logit_rows:
        losses += 2 * teacher.hidden * teacher.vocab_size * logit_rows
    out = {"teacher": t, "student_forward": s, "student_backward": 2 * s, "losses": losses}
    out["total"] = sum(out.values())
    return out


# --- in-process DeepSpeed (world size 1) --------------------------------------------------------

def single_process_env() -> None:
    """The launcher variables of a one-rank run, where they are not set (before deepspeed is imported)."""
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    if "MASTER_PORT" not in os.environ:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("LOCAL_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if os.environ["WORLD_SIZE"] != "1":
        raise MlcError("mlc bench runs in one process; WORLD_SIZE must be 1")


# --- the variants -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Variant:
    """``losses``: "fused" (``kernels``) or "naive" (``kernels.reference``); ``positions``: the logit loss on
    "all" or "masked" positions (None: as the recipe says); ``zero``: a ZeRO stage (None: the recipe's);
    ``compile``: torch.compile the encoder layers; ``side_stream``: the teacher one micro-batch ahead on a
    second CUDA stream (None: as the recipe says); ``cached``: the teacher behind a teacher cache (in a
    temporary folder) that holds the targets of every measured micro-batch, filled by an untimed pass over the
    same batches first: the step as step 2 runs it after step 1 stored its targets."""
    losses: str = "fused"
    positions: str | None = None
    zero: int | None = None
    compile: bool | None = None
    side_stream: bool | None = None
    cached: bool = False

    @property
    def name(self) -> str:
        parts = [self.losses]
        if self.positions:
            parts.append(f"logits@{self.positions}")
        if self.zero is not None:
            parts.append(f"zero{self.zero}")
        if self.compile is not None:
            parts.append("compiled" if self.compile else "eager")
        if self.side_stream is not None:
            parts.append("side_stream" if self.side_stream else "one_stream")
        if self.cached:
            parts.append("cached")
        return " ".join(parts)


@contextlib.contextmanager
def loss_backend(kind: str):
    """The losses module calls ``kernels.<loss>``; "naive" points those names at ``kernels.reference``."""
    from mlc import kernels
    from mlc.kernels import reference

    if kind not in ("fused", "naive"):
        raise MlcError(f"loss implementation must be 'fused' or 'naive', not {kind!r}", "--losses")
    names = ("hidden_mse", "linear_logit_distill", "attention_map_mse")
    saved = {n: getattr(kernels, n) for n in names}
    if kind == "naive":
        for n in names:
            setattr(kernels, n, getattr(reference, n))
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(kernels, n, f)


class _Clock:
    """Phase clocks; on CUDA each reading synchronises (``sync``), which a side-stream variant must not do."""

    def __init__(self, device: torch.device, sync: bool = True):
        self.cuda = device.type == "cuda" and sync
        self.totals = {p: 0.0 for p in PHASES}
        self.on = False

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    @contextlib.contextmanager
    def phase(self, name: str):
        t0 = self.now()
        yield
        if self.on:
            self.totals[name] += self.now() - t0


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _step_spec(recipe, step: int, variant: Variant):
    from mlc.distill.plan import step_spec

    spec = step_spec(recipe, step)
    if step == 0:
        return spec
    losses = spec.losses
    if variant.positions is not None:
        if losses.logits is None:
            raise MlcError("--positions needs a logit loss in the step's losses", "losses.logits")
        losses = losses.model_copy(update={"logits": losses.logits.model_copy(update={"positions": variant.positions})})
    update = {"losses": losses}
    if variant.zero is not None:
        update["deepspeed"] = f"zero{variant.zero}"
    if variant.compile is not None:
        update["compile"] = variant.compile
    if variant.side_stream is not None:
        update["teacher_side_stream"] = variant.side_stream
    return spec.model_copy(update=update)


def run_variant(recipe, plan, variant: Variant, *, steps: int, warmup: int, peak_tflops: float | None = None,
                batch_size: int | None = None, on_done=None, on_step=None) -> dict:
    """Warm-up, then ``steps`` optimizer steps of the plan's distillation step; returns the measurements.

    ``on_done(harness)``, when given, is called with the trained harness before it is released;
    ``on_step(n, harness)`` after each optimizer step ``n`` (1-based, warm-up included), outside the clock."""
    single_process_env()
    import deepspeed

    from mlc.distill.build import build_step
    from mlc.distill.ds_config import step_deepspeed
    from mlc.distill.engine import TeacherFeed, to_device
    from mlc.distill.plan import check_plan, check_settings
    from mlc.distill.ranks import rank_device

    if steps < 1 or warmup < 0:
        raise MlcError("--steps must be >= 1 and --warmup >= 0")
    check_settings(recipe, plan)
    check_plan(recipe, plan)
    spec = _step_spec(recipe, plan.step, variant)
    if batch_size is not None:
        spec = spec.model_copy(update={"batch_size": batch_size})
    deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else None)
    device = rank_device(0)
    ds = step_deepspeed(spec, plan.key, 1, plan.student_dir)
    # the loop's own set-up, so step 2 is measured with its pruning masks applied, as it trains
    # the recipe's own teacher cache is never used: a plain variant runs the teacher on every micro-batch, a
    # cached one reads a cache of its own, filled first
    cache_dir = None
    if variant.cached:
        import tempfile

        if plan.step == 0:
            raise MlcError("the cached variant needs a step with a teacher (1 or 2)", "--variants")
        cache_dir = tempfile.mkdtemp(prefix="mlc-bench-cache-")
    cache = recipe.distill.teacher_cache.model_copy(update={"enabled": cache_dir is not None, "dir": cache_dir})
    recipe = recipe.model_copy(update={"distill": recipe.distill.model_copy(update={"teacher_cache": cache})})
    parts = build_step(recipe, plan, spec, ds, device, masks_file=plan.masks_file)
    if cache_dir is not None:
        _fill_cache(recipe, plan, spec, parts.teacher, device, (warmup + steps) * spec.grad_accum)
    teacher, student, harness, engine, stream = parts.teacher, parts.student, parts.harness, parts.engine, parts.stream
    losses, compiled, s_cfg, t_cfg = parts.losses, parts.compiled, parts.student_cfg, parts.teacher_cfg
    side = bool(getattr(spec, "teacher_side_stream", False))
    if side:  # the teacher's time overlaps the student's: only the total is measured
        feed = TeacherFeed(teacher, stream, device, side_stream=True, key=f"{plan.key}.teacher_side_stream")
    else:
        batches = stream.forever()

    clock = _Clock(device, sync=not side)
    mark = {}

    def pre(module, args, kwargs):
        mark["t"] = clock.now()

    def post(module, args, kwargs, output):
        mark["student"] = mark.get("student", 0.0) + clock.now() - mark.pop("t")

    handles = [student.base_model.register_forward_pre_hook(pre, with_kwargs=True),
               student.base_model.register_forward_hook(post, with_kwargs=True)]
    logit_spec = losses.spec.get("logits")
    t_shape = Shape.of(t_cfg) if teacher is not None else None
    s_shape = Shape.of(s_cfg)
    flops = {k: 0 for k in ("teacher", "student_forward", "student_backward", "losses", "total")}
    counted = {"tokens": 0, "content_tokens": 0, "samples": 0, "loss": 0.0, "micro": 0}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        with loss_backend(variant.losses):
            t_start = None
            outside = 0.0  # time spent in on_step, taken out of the measured seconds
            for i in range(warmup + steps):
                if i == warmup:
                    clock.on = True
                    _synchronize(device)
                    t_start = clock.now()
                for _ in range(spec.grad_accum):
                    if side:
                        batch, t_out = feed.next()
                    else:
                        with clock.phase("data"):
                            batch = to_device(next(batches), device)
                        with clock.phase("teacher"):
                            t_out = teacher(batch["input_ids"], batch["attention_mask"]) if teacher else None
                    mark["student"] = 0.0
                    t0 = clock.now()
                    total, _ = engine(batch["input_ids"], batch["attention_mask"], batch["labels"], t_out)
                    fwd = clock.now() - t0
                    with clock.phase("backward"):
                        engine.backward(total)
                    with clock.phase("optimizer"):
                        engine.step()
                    if not clock.on:
                        continue
                    clock.totals["student_forward"] += mark["student"]
                    clock.totals["losses"] += fwd - mark["student"]
                    ids = batch["input_ids"]
                    mask = batch["attention_mask"] != 0
                    masked = int((batch["labels"] != -100).sum())
                    rows = 0
                    if logit_spec is not None:
                        rows = masked if logit_spec.positions == "masked" else int(mask.sum())
                    f = step_flops(t_shape, s_shape, tokens=ids.numel(), seq_len=ids.shape[1], logit_rows=rows,
                                   mlm_rows=masked if "mlm" in losses.spec else 0,
                                   teacher_head=teacher is not None and teacher.with_head,
                                   student_head=harness.with_head)
                    for k in flops:
                        flops[k] += f[k]
                    counted["tokens"] += ids.numel()
                    counted["content_tokens"] += int(mask.sum())
                    counted["samples"] += ids.shape[0]
                    counted["loss"] += float(total.detach())
                    counted["micro"] += 1
                if on_step is not None:
                    t0 = clock.now()
                    on_step(i + 1, harness)
                    if clock.on:
                        outside += clock.now() - t0
            _synchronize(device)
            seconds = clock.now() - t_start - outside
        if on_done is not None:
            on_done(harness)
    finally:
        for h in handles:
            h.remove()
        stream.close()
        if cache_dir is not None:
            import shutil

            shutil.rmtree(cache_dir, ignore_errors=True)
    peak = peak_tflops if peak_tflops is not None else DEFAULT_PEAK_TFLOPS.get(device.type, 1.0)
    achieved = flops["total"] / seconds / 1e12
    if device.type == "cuda":
        memory = torch.cuda.max_memory_allocated() / 2**20
        memory_kind = "cuda max allocated"
    else:
        memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        memory_kind = "process peak RSS (cumulative over the run)"
    return {
        "variant": variant.name, "step": plan.step, "device": str(device), "steps": steps, "warmup": warmup,
        "batch_size": spec.batch_size, "grad_accum": spec.grad_accum, "seq_len": int(ids.shape[1]),
        "zero_stage": ds.zero_stage,
        "precision": resolve_precision(spec.precision), "compiled": compiled,
        "student_dropout": spec.student_dropout,
        "losses": sorted(losses.spec), "student_vocab": s_shape.vocab_size,
        "seconds": seconds, "tokens": counted["tokens"], "content_tokens": counted["content_tokens"],
        "tokens_per_s": counted["tokens"] / seconds, "content_tokens_per_s": counted["content_tokens"] / seconds,
        "samples_per_s": counted["samples"] / seconds, "mean_loss": counted["loss"] / counted["micro"],
        "flops_per_step": flops["total"] / steps, "flops_split": flops, "tflops": achieved,
        "peak_tflops": peak, "mfu": achieved / peak, "peak_memory_mib": memory, "memory_kind": memory_kind,
        "time_split": None if side else {p: clock.totals[p] / seconds for p in PHASES},
        "teacher_side_stream": side,
        # step 2 trains the pruned student: the sizes its masks keep (None for steps 0 and 1)
        "masks": parts.masks.kept() if parts.masks is not None else None,
        # the measured micro-batches' targets read from the cache (all of them, unless max_gb was reached)
        "teacher_cache": dict(teacher.cache.counts) if cache_dir is not None else None,
    }


def _fill_cache(recipe, plan, spec, teacher, device, micro_batches: int) -> None:
    """Store the teacher's targets of the first ``micro_batches`` of the step's stream (the ones the measured
    run reads: the same seed), then zero the cache's counts."""
    from mlc.distill.build import heldout_batches, shard_stream
    from mlc.distill.engine import to_device

    stream = shard_stream(recipe, plan, spec.batch_size, 0, 1, plan.student_dir, heldout=heldout_batches(spec))
    # outside the training RNG: a loader worker draws its seed from it, which would shift the student's dropout
    with torch.random.fork_rng(devices=[]):
        try:
            batches = stream.forever()
            for _ in range(micro_batches):
                b = to_device(next(batches), device)
                teacher(b["input_ids"], b["attention_mask"])
        finally:
            stream.close()
    teacher.cache.counts = {k: 0 for k in teacher.cache.counts}


def parse_variants(text: str) -> list[Variant]:
    """``fused,naive`` x positions: comma-separated items such as ``fused``, ``naive``, ``fused:all``,
    ``naive:masked``, ``fused:masked:zero3``, ``fused:compiled``, ``fused:side_stream`` (CUDA)."""
    out = []
    for item in [p.strip() for p in text.split(",") if p.strip()]:
        parts = item.split(":")
        kind, positions, zero, compiled, side, cached = parts[0], None, None, None, None, False
        for p in parts[1:]:
            if p in ("all", "masked"):
                positions = p
            elif p.startswith("zero") and p[4:] in ("0", "1", "2", "3"):
                zero = int(p[4:])
            elif p in ("compiled", "eager"):
                compiled = p == "compiled"
            elif p in ("side_stream", "one_stream"):
                side = p == "side_stream"
            elif p == "cached":
                cached = True
            else:
                raise MlcError(f"unknown variant part {p!r} in {item!r} (all, masked, zero0..zero3, compiled, "
                               "eager, side_stream, one_stream, cached)", "--variants")
        if kind not in ("fused", "naive"):
            raise MlcError(f"a variant starts with 'fused' or 'naive', not {kind!r}", "--variants")
        out.append(Variant(kind, positions, zero, compiled, side, cached))
    if not out:
        raise MlcError("no variant given", "--variants")
    return out


def format_table(rows: list[dict]) -> str:
    """A Markdown table of :func:`run_variant` results."""
    head = ("| variant | vocab | tokens/s | samples/s | TFLOP/s | MFU | peak MiB | mean loss | "
            "data / teacher / student fwd / losses / backward / optimizer (%) |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        split = " / ".join(f"{100 * r['time_split'][p]:.0f}" for p in PHASES) if r.get("time_split") \
            else "(overlapped: not split)"
        lines.append(f"| {r['variant']} | {r['student_vocab']} | {r['tokens_per_s']:.0f} | {r['samples_per_s']:.2f} | "
                     f"{r['tflops']:.3f} | {100 * r['mfu']:.1f}% | {r['peak_memory_mib']:.0f} | "
                     f"{r['mean_loss']:.4f} | {split} |")
    return "\n".join(lines)
