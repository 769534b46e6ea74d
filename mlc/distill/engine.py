"""The distillation engine of one rank: a frozen teacher beside a DeepSpeed-wrapped student.

- :class:`Teacher`: an HF encoder (with its MLM head when it has one) in eval mode, outside the optimizer,
  replicated on every rank, run under ``torch.inference_mode``; fp16 on CUDA, bf16/fp32 on CPU.
- :class:`Harness`: the ``nn.Module`` DeepSpeed wraps. It holds the student, the learned projections of
  hidden-loss pairs whose widths differ, and computes the weighted loss inside its own forward, so ZeRO-3
  gathers every parameter the losses read (the MLM head weight is registered as an external parameter).
- :func:`deepspeed_config`: a ``configs/deepspeed/*.json`` completed from the recipe (batch size,
  accumulation, precision, clipping). The optimizer is a ``torch.optim.AdamW`` and the schedule a
  ``transformers`` warm-up + decay schedule, both handed to ``deepspeed.initialize``.
"""
from __future__ import annotations


import torch
from torch import nn

from mlc.distill.ds_config import DeepSpeedSetup
from mlc.distill.losses import LossSet, Outputs, Selection
from mlc.errors import MlcError
from mlc.models.arch import encoder_layers, head_parts, self_attention
from mlc.models.io import load_model

# --- models -------------------------------------------------------------------------------------

def compile_encoder(model) -> int:
    """``torch.compile`` each encoder layer of ``model`` in place (parameter names, hooks and checkpoints are
    unchanged: ``nn.Module.compile`` wraps the layer's forward); returns how many were compiled.

    The layers share one compiled graph unless their hooks differ. Dynamo does not guard on module hooks by
    default, so a graph traced on a layer with an attention-capture or pruning-mask hook would be reused on a
    layer with other hooks (or none): the hooks are guarded here (process-wide), and the recompilation limit
    raised so that every distinct layer gets its graph instead of falling back to eager mode."""
    import torch._dynamo.config as dynamo_config

    dynamo_config.skip_nnmodule_hook_guards = False
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
    layers = encoder_layers(model)
    for layer in layers:
        layer.compile(dynamic=False)
    return len(layers)


def check_compile(spec, ds_config: dict, key: str) -> bool:
    """Whether this step compiles; an error for ZeRO-3, whose parameter gathering hooks it does not trace."""
    if not getattr(spec, "compile", False):
        return False
    if ds_config.get("zero_optimization", {}).get("stage", 0) == 3:
        raise MlcError("compile: true works with ZeRO stages 0-2; this step's DeepSpeed config is ZeRO-3",
                       f"{key}.compile")
    return True


class QKCapture:
    """Forward hooks on the query/key projections of chosen layers; ``take()`` returns layer -> (q, k)
    shaped [B, heads, L, head_dim]."""

    def __init__(self, model, layers: list[int]):
        self.store: dict[int, dict[str, torch.Tensor]] = {}
        self.handles = []
        n_heads = model.config.num_attention_heads
        all_layers = encoder_layers(model)
        for i in layers:
            attn = self_attention(all_layers[i])
            for name in ("query", "key"):
                self.handles.append(getattr(attn, name).register_forward_hook(self._hook(i, name, n_heads)))

    def _hook(self, layer: int, name: str, n_heads: int):
        def hook(module, args, output):
            b, length, width = output.shape
            self.store.setdefault(layer, {})[name] = output.view(b, length, n_heads, width // n_heads).transpose(1, 2)
        return hook

    def take(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        out = {i: (d["query"], d["key"]) for i, d in self.store.items()}
        self.store = {}
        return out


def forward_outputs(model, capture: QKCapture | None, input_ids, attention_mask, *, with_head: bool) -> Outputs:
    base = model.base_model
    out = base(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, return_dict=True)
    hidden = list(out.hidden_states)
    head_input = None
    if with_head:
        head_input = head_parts(model)[0](hidden[-1])
    return Outputs(hidden_states=hidden, head_input=head_input, qk=capture.take() if capture else {})


# --- the teacher --------------------------------------------------------------------------------

def teacher_torch_dtype(spec: str, device: torch.device):
    if spec == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if spec == "fp16" and device.type != "cuda":
        raise MlcError("fp16 on CPU is not supported for the teacher; use bf16 or fp32", "teacher.dtype")
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[spec]


class Teacher:
    """The frozen teacher of one rank."""

    def __init__(self, folder, losses: LossSet, device, dtype, compile: bool = False):
        self.with_head = losses.needs_teacher_head
        self.model = load_model(folder, with_head=self.with_head, dtype=dtype).to(device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        if compile:
            compile_encoder(self.model)
        self.capture_layers = losses.teacher_attention_layers()
        self.capture = QKCapture(self.model, self.capture_layers) if self.capture_layers else None
        self.hidden_used = sorted({t for _, t in losses.hidden_pairs()})
        self.n_layers = self.model.config.num_hidden_layers
        self.head = head_parts(self.model) if self.with_head else None

    @torch.inference_mode()
    def _run(self, input_ids, attention_mask) -> Outputs:
        return forward_outputs(self.model, self.capture, input_ids, attention_mask, with_head=self.with_head)

    def __call__(self, input_ids, attention_mask) -> Outputs:
        out = self._run(input_ids, attention_mask)
        # inference tensors cannot enter autograd graphs: keep normal copies of what the losses read
        hidden = [h.clone() if i in self.hidden_used else None for i, h in enumerate(out.hidden_states)]
        return Outputs(hidden_states=hidden,
                       head_input=out.head_input.clone() if out.head_input is not None else None,
                       qk={i: (q.clone(), k.clone()) for i, (q, k) in out.qk.items()})

    def head_weights(self):
        return (self.head[1], self.head[2]) if self.head else None


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _output_tensors(out: Outputs) -> list[torch.Tensor]:
    tensors = [h for h in out.hidden_states if h is not None]
    if out.head_input is not None:
        tensors.append(out.head_input)
    for q, k in out.qk.values():
        tensors += [q, k]
    return tensors


def _rng_neutral_start(batches):
    """``batches``, with the first one drawn outside the training RNG.

    The first batch starts the loader; with ``loader.workers >= 1`` that makes a DataLoader iterator, which
    draws its workers' base seed from the global torch generator. A resumed run starts its loader after the
    RNG states were restored, where the uninterrupted run drew nothing, so every later dropout mask would
    shift (a 2-rank run of 16 steps ended 0.0089 apart). The batches themselves do not depend on that seed
    (the stream seeds its own generators), so drawing it from a forked RNG changes nothing else."""
    with torch.random.fork_rng(devices=[]):
        first = next(batches)
    yield first
    yield from batches


class TeacherFeed:
    """Micro-batches on the device paired with the teacher's outputs for them: ``next()`` -> (batch, outputs).

    Plain (``ahead=False``): the micro-batch is read and the teacher run when asked. With ``side_stream``
    (CUDA only) the teacher works one micro-batch ahead: before ``next()`` returns a micro-batch it queues the
    teacher's forward of the following one on a second CUDA stream, so the GPU can run it alongside the
    caller's student forward, backward and optimizer step; the main stream waits for it only when its outputs
    are handed out. ``ahead=True`` without a side stream runs that order on one stream (for tests).
    ``loader_state`` is the loader position of the micro-batch ``next()`` returns next: what a checkpoint
    must record, since the loader itself may be one micro-batch further."""

    def __init__(self, teacher: Teacher | None, stream, device, *, side_stream: bool = False, ahead: bool = False,
                 key: str = "teacher_side_stream"):
        if side_stream and device.type != "cuda":
            raise MlcError(f"teacher_side_stream: true needs a CUDA device; this step runs on {device.type}", key)
        self.teacher, self.stream, self.device = teacher, stream, device
        self.batches = _rng_neutral_start(stream.forever())
        self.side = torch.cuda.Stream(device=device) if side_stream else None
        self._pending = self._start() if (ahead or side_stream) else None

    def _fetch(self):
        batch = to_device(next(self.batches), self.device)
        if self.teacher is None:
            return batch, None
        if self.side is None:
            return batch, self.teacher(batch["input_ids"], batch["attention_mask"])
        self.side.wait_stream(torch.cuda.current_stream(self.device))  # the host-to-device copies above
        with torch.cuda.stream(self.side):
            out = self.teacher(batch["input_ids"], batch["attention_mask"])
        for t in batch.values():  # allocated on the main stream, read on the side stream
            t.record_stream(self.side)
        return batch, out

    def _start(self):
        """The next micro-batch and its teacher outputs, with the loader position before it."""
        return (self.stream.state_dict(), *self._fetch())

    @property
    def loader_state(self) -> dict:
        return self._pending[0] if self._pending is not None else self.stream.state_dict()

    def next(self):
        if self._pending is None:
            return self._fetch()
        _, batch, out = self._pending
        if self.side is not None and out is not None:
            main = torch.cuda.current_stream(self.device)
            main.wait_stream(self.side)
            for t in _output_tensors(out):  # allocated on the side stream, read on the main stream
                t.record_stream(main)
        self._pending = self._start()
        return batch, out


# --- the student harness ------------------------------------------------------------------------

class Harness(nn.Module):
    """Student + projections; ``forward`` returns (weighted total loss, detached terms)."""

    def __init__(self, student, losses: LossSet, teacher_hidden: int | None, selection: Selection | None = None):
        super().__init__()
        self.student = student
        self.losses = losses
        self.selection = selection or Selection()
        self.with_head = losses.needs_head
        if self.with_head and head_parts(student) is None:
            raise MlcError("the MLM and logit losses need a student with an MLM head")
        self.capture = QKCapture(student, losses.student_attention_layers()) \
            if losses.student_attention_layers() else None
        hs = student.config.hidden_size
        self.projections = nn.ModuleDict()
        if teacher_hidden is not None and teacher_hidden != hs:
            for s_i, _ in losses.hidden_pairs():
                self.projections[str(s_i)] = nn.Linear(hs, teacher_hidden)
        self.teacher_head = None  # (weight, bias) of the frozen teacher, set by the loop
        self._external = False

    def register_external(self) -> None:
        """Under ZeRO-3: the losses read the MLM decoder weight outside its module's forward."""
        if self.with_head and not self._external:
            from deepspeed.runtime.zero.partition_parameters import register_external_parameter

            _, w, b = head_parts(self.student)
            register_external_parameter(self, w)
            if b is not None:
                register_external_parameter(self, b)
            self._external = True

    def forward(self, input_ids, attention_mask, labels, teacher_out: Outputs | None):
        out = forward_outputs(self.student, self.capture, input_ids, attention_mask, with_head=self.with_head)
        head = head_parts(self.student)[1:] if self.with_head else None
        total, terms = self.losses.compute(out, teacher_out, attention_mask=attention_mask, labels=labels,
                                           student_head=head, teacher_head=self.teacher_head,
                                           projections=self.projections if len(self.projections) else None,
                                           selection=self.selection)
        return total, {k: v.detach().float() for k, v in terms.items()}


def selection_from_masks(masks) -> Selection:
    """Kept hidden dims and heads of a :class:`mlc.surgery.prune.Masks` (the losses compare those only)."""
    if masks is None:
        return Selection()
    hidden = masks.hidden_index() if not bool(masks.hidden.all()) else None
    heads, inner = {}, {}
    for i in range(masks.heads.shape[0]):
        kept = masks.kept_heads(i)
        if not bool(masks.heads[i].all()):
            heads[i] = kept
        dims = masks.inner[i].index_select(0, kept)  # [kept heads, head_size]
        if not bool(dims.all()):
            inner[i] = torch.stack([row.nonzero().flatten() for row in dims])
    return Selection(hidden_dims=hidden, heads=heads, inner=inner)


# --- optimizer, schedule, DeepSpeed config ------------------------------------------------------

def make_optimizer(module: nn.Module, lr: float, weight_decay: float, *, betas=(0.9, 0.999), eps: float = 1e-8,
                   offload: bool = False):
    """AdamW; no decay on biases and LayerNorm weights (1-D parameters). ``offload``: DeepSpeed's CPU Adam
    (in AdamW mode), which ZeRO needs when the optimizer state lives on the CPU; it is compiled on first use."""
    decay, no_decay = [], []
    seen = set()
    for p in module.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if p.dim() < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if not offload:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=lr, betas=betas, eps=eps, adamw_mode=True)
    except Exception as e:  # the op is built with the C++ compiler and ninja on first use
        raise MlcError(f"offload_optimizer needs DeepSpeed's CPU Adam, which could not be built or loaded ({e}); "
                       "it is compiled on first use and needs a C++ compiler and ninja (pip install ninja)",
                       "zero_optimization.offload_optimizer") from None


def make_schedule(optimizer, kind: str, steps: int, warmup: float):
    from transformers import (get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup,
                              get_linear_schedule_with_warmup)

    warm = int(round(warmup * steps))
    if kind == "constant":
        return get_constant_schedule_with_warmup(optimizer, warm)
    if kind == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, warm, steps)
    return get_linear_schedule_with_warmup(optimizer, warm, steps)


def initialize(harness: Harness, step, ds: DeepSpeedSetup):
    """Wrap the harness with ``deepspeed.initialize``; returns the engine."""
    import deepspeed

    if ds.zero_stage == 3:
        harness.register_external()
    optimizer = make_optimizer(harness, step.lr, step.weight_decay, betas=ds.adam["betas"], eps=ds.adam["eps"],
                               offload=ds.offload)
    schedule = make_schedule(optimizer, step.schedule, step.steps, step.warmup)
    engine, _, _, _ = deepspeed.initialize(model=harness, optimizer=optimizer, lr_scheduler=schedule,
                                           config=ds.config)
    return engine
