"""A DeepSpeed JSON completed from a recipe step, as GPU users write one.

mlc builds the optimizer (AdamW, or DeepSpeed's CPU Adam where the optimizer state is offloaded) and the
learning-rate schedule itself, from the recipe; the batch sizes, clipping and precision come from the recipe
too. A JSON written for the transformers / axolotl convention is accepted as it is:

- ``"auto"`` values of those keys (and of ``optimizer.params``, ``scheduler.params``, the ``bf16`` / ``fp16``
  blocks' ``enabled``, and ZeRO's bucket sizes) are filled from the recipe (bucket sizes from the student's
  hidden size, as transformers does, or left to DeepSpeed's defaults where it is not known yet);
- an explicit value the recipe replaces is not dropped in silence: each one is a note
  (:attr:`DeepSpeedSetup.notes`) that ``mlc validate``, ``mlc distill`` and the step's log print;
- ``optimizer`` must be Adam / AdamW (its ``betas`` and ``eps`` are used; ``lr`` and ``weight_decay`` are the
  recipe's), ``scheduler`` any of DeepSpeed's (the recipe's schedule is used; its values are notes), ``fp16``
  may not be enabled (students train in bf16 or fp32); an ``"auto"`` anywhere else is an error naming it.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

from mlc.errors import MlcError
from mlc.paths import read_json
from mlc.runtime import resolve_precision

AUTO = "auto"
ADAM_TYPES = ("adam", "adamw")
DEEPSPEED_SCHEDULERS = ("warmuplr", "warmupdecaylr", "warmupcosinelr", "onecycle", "lrrangetest")
ADAM_DEFAULTS = {"betas": (0.9, 0.999), "eps": 1e-8}
# optimizer.params that say nothing mlc does not already do (decoupled weight decay, a torch implementation)
_ADAM_FLAGS = {"adam_w_mode": True, "torch_adam": None, "fused": None}
# ZeRO keys transformers fills from the model's hidden size when they are "auto"
_ZERO_AUTO = {"reduce_bucket_size": lambda h: h * h, "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
              "stage3_param_persistence_threshold": lambda h: 10 * h}


@dataclass
class DeepSpeedSetup:
    """What a step runs with: ``config`` for ``deepspeed.initialize`` (no optimizer or scheduler block: mlc
    passes its own), the Adam settings from the JSON, whether the optimizer state is offloaded, and the
    notes on JSON values the recipe replaced."""

    config: dict
    path: Path
    adam: dict = field(default_factory=lambda: dict(ADAM_DEFAULTS))
    offload: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def zero_stage(self) -> int:
        return int(self.config.get("zero_optimization", {}).get("stage", 0))


def _is_auto(value) -> bool:
    return isinstance(value, str) and value.strip().lower() == AUTO


def _same(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(float(a) - float(b)) <= 1e-12 * max(1.0, abs(float(b)))
    return a == b


def deepspeed_config(path: Path, step, world_size: int, where: str, *, hidden_size: int | None = None
                     ) -> DeepSpeedSetup:
    """The DeepSpeed JSON at ``path`` completed from a recipe step (StepSpec or AdaptSpec) for ``world_size``
    ranks; ``where`` names the recipe key that chose the file. ``hidden_size``: the student's, for ZeRO's
    ``"auto"`` bucket sizes."""
    path = Path(path)
    if not path.is_file():
        raise MlcError(f"no DeepSpeed config at {path}", where)
    user = read_json(path)
    if not isinstance(user, dict):
        raise MlcError("a DeepSpeed config is a JSON object of keys to values", str(path))
    cfg = copy.deepcopy(user)
    setup = DeepSpeedSetup(config=cfg, path=path)
    precision = resolve_precision(step.precision)
    step_key = where.rsplit(".", 1)[0]  # the recipe section whose keys replace the JSON's: distill.step1, ...

    def recipe_value(key_path: str, container: dict, key: str, value, why: str) -> None:
        given = container.get(key)
        if key in container and not _is_auto(given) and not _same(given, value):
            setup.notes.append(f"{path.name}: {key_path} is {given!r} in the JSON; the recipe's {value!r} is used "
                               f"({why})")
        container[key] = value

    recipe_value("train_micro_batch_size_per_gpu", cfg, "train_micro_batch_size_per_gpu", step.batch_size,
                 f"{step_key}.batch_size")
    recipe_value("gradient_accumulation_steps", cfg, "gradient_accumulation_steps", step.grad_accum,
                 f"{step_key}.grad_accum")
    recipe_value("train_batch_size", cfg, "train_batch_size", step.batch_size * step.grad_accum * world_size,
                 f"batch_size x grad_accum x {world_size} rank(s)")
    recipe_value("gradient_clipping", cfg, "gradient_clipping", float(getattr(step, "clip_grad", 0.0)),
                 f"{step_key}.clip_grad")

    bf16 = cfg.get("bf16")
    bf16 = dict(bf16) if isinstance(bf16, dict) else {}
    recipe_value("bf16.enabled", bf16, "enabled", precision == "bf16",
                 f"{step_key}.precision = {step.precision} -> {precision}")
    cfg["bf16"] = bf16
    if "fp16" in cfg:
        fp16 = cfg["fp16"]
        enabled = fp16.get("enabled", True) if isinstance(fp16, dict) else fp16
        if not _is_auto(enabled) and enabled is not False:
            raise MlcError("fp16 training of the student is not supported (mlc trains in bf16 or fp32: set the "
                           "step's precision in the recipe); remove the fp16 block or set \"enabled\": \"auto\"",
                           f"{path}: fp16.enabled")
        cfg.pop("fp16")

    opt = cfg.pop("optimizer", None)
    if opt is not None:
        _read_optimizer(opt, step, setup, path, step_key)
    sched = cfg.pop("scheduler", None)
    if sched is not None:
        _read_scheduler(sched, step, setup, path, step_key)

    zero = cfg.get("zero_optimization")
    if isinstance(zero, dict):
        for key, rule in _ZERO_AUTO.items():
            if _is_auto(zero.get(key)):
                if hidden_size:
                    zero[key] = rule(hidden_size)
                else:
                    zero.pop(key)  # DeepSpeed's default (the student's width is not known yet)
        offload = zero.get("offload_optimizer")
        if isinstance(offload, dict) and str(offload.get("device", "none")).lower() in ("cpu", "nvme"):
            if int(zero.get("stage", 0)) < 1:
                raise MlcError("offload_optimizer needs ZeRO stage 1, 2 or 3", f"{path}: zero_optimization.stage")
            setup.offload = True
    cfg.setdefault("steps_per_print", 10**9)
    left = _autos(cfg)
    if left:
        raise MlcError(f"'auto' is filled by mlc only for the batch sizes, clipping, precision, optimizer, "
                       f"scheduler and ZeRO bucket sizes; give a value for {', '.join(left)}", str(path))
    return setup


def step_deepspeed(spec, key: str, world_size: int, student_dir: Path | str | None = None) -> DeepSpeedSetup:
    """The DeepSpeed setup of a recipe step (``key``: e.g. ``distill.step1``) on ``world_size`` ranks; the
    student folder, when it exists, gives the hidden size for ZeRO's ``"auto"`` bucket sizes."""
    from mlc.models.io import read_config
    from mlc.recipe import resolve_deepspeed_config

    hidden = None
    if student_dir is not None and (Path(student_dir) / "config.json").is_file():
        hidden = read_config(student_dir).get("hidden_size")
    return deepspeed_config(resolve_deepspeed_config(spec.deepspeed), spec, world_size, f"{key}.deepspeed",
                            hidden_size=hidden)


def recipe_deepspeed_notes(recipe, world_size: int = 1) -> list[str]:
    """Every configured step's DeepSpeed JSON completed as its launch on ``world_size`` ranks will complete
    it (an error for a value it refuses); returns the notes on values the recipe replaces, by step."""
    steps = [("adapt", recipe.adapt)] if recipe.adapt.enabled else []
    steps += [(f"distill.{name}", getattr(recipe.distill, name)) for name in ("step1", "step2")]
    notes = []
    for key, spec in steps:
        if spec is not None:
            notes += [f"{key}: {n}" for n in step_deepspeed(spec, key, world_size).notes]
    return notes


def _autos(node, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [k for key, v in node.items() for k in _autos(v, f"{prefix}{key}.")]
    if isinstance(node, list):
        return [k for i, v in enumerate(node) for k in _autos(v, f"{prefix}{i}.")]
    return [prefix.rstrip(".")] if _is_auto(node) else []


def _read_optimizer(opt, step, setup: DeepSpeedSetup, path: Path, step_key: str) -> None:
    if not isinstance(opt, dict):
        raise MlcError("the optimizer block is a JSON object with 'type' and 'params'", f"{path}: optimizer")
    kind = str(opt.get("type", "")).lower()
    if kind not in ADAM_TYPES:
        raise MlcError(f"mlc trains with AdamW (or DeepSpeed's CPU Adam when the optimizer state is offloaded); "
                       f"optimizer type {opt.get('type')!r} is not supported: use Adam or AdamW, or remove the "
                       "block", f"{path}: optimizer.type")
    params = opt.get("params") or {}
    if not isinstance(params, dict):
        raise MlcError("optimizer.params is a JSON object", f"{path}: optimizer.params")
    for key, value in params.items():
        if key in ("lr", "weight_decay"):
            mine = getattr(step, key)
            if not _is_auto(value) and not _same(value, mine):
                setup.notes.append(f"{path.name}: optimizer.params.{key} is {value!r} in the JSON; the recipe's "
                                   f"{mine!r} is used ({step_key}.{key})")
        elif key == "betas":
            if _is_auto(value):
                continue
            if (not isinstance(value, list) or len(value) != 2
                    or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in value)):
                raise MlcError(f"betas must be two numbers in [0, 1), not {value!r}", f"{path}: optimizer.params.betas")
            setup.adam["betas"] = (float(value[0]), float(value[1]))
        elif key == "eps":
            if _is_auto(value):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise MlcError(f"eps must be a positive number, not {value!r}", f"{path}: optimizer.params.eps")
            setup.adam["eps"] = float(value)
        elif key in _ADAM_FLAGS:
            wanted = _ADAM_FLAGS[key]
            if wanted is not None and not _is_auto(value) and value != wanted:
                raise MlcError(f"mlc's AdamW decays weights decoupled from the gradient; {key}: {value!r} is not "
                               "supported", f"{path}: optimizer.params.{key}")
        else:
            raise MlcError(f"optimizer.params.{key} is not used by mlc (it reads lr and weight_decay from the "
                           "recipe, betas and eps from here)", f"{path}: optimizer.params.{key}")


def _read_scheduler(sched, step, setup: DeepSpeedSetup, path: Path, step_key: str) -> None:
    if not isinstance(sched, dict):
        raise MlcError("the scheduler block is a JSON object with 'type' and 'params'", f"{path}: scheduler")
    kind = str(sched.get("type", ""))
    if kind.lower() not in DEEPSPEED_SCHEDULERS:
        raise MlcError(f"unknown DeepSpeed scheduler type {kind!r}", f"{path}: scheduler.type")
    schedule = f"{step.schedule} over {step.steps} steps, warm-up share {step.warmup:g}"
    given = {k: v for k, v in (sched.get("params") or {}).items() if not _is_auto(v)}
    if given:
        setup.notes.append(f"{path.name}: scheduler {kind} with {given} in the JSON; the recipe's schedule is "
                           f"used ({step_key}.schedule/warmup/steps: {schedule})")
