"""`mlc distill RECIPE --step N`: check the inputs, then launch DeepSpeed on this machine."""
from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

from mlc.errors import MlcError
from mlc.layout import RunLayout
from mlc.models.teacher import EMBEDDED_TEACHER

LAUNCHER = Path(importlib.util.find_spec("mlc.launcher.distill").origin)  # launcher/distill.py, installed too


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env(num_gpus: int) -> dict:
    """The launch environment: CPU accelerator where there is no CUDA, one thread pool per rank."""
    import torch

    env = dict(os.environ)
    if "DS_ACCELERATOR" not in env and not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    if env.get("DS_ACCELERATOR") == "cpu" and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // num_gpus))
    return env


def launch_command(recipe_path, plan, *, num_gpus: int, master_port: int, resume: bool = False,
                   stop_after: int | None = None, overwrite: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(num_gpus),
           "--master_port", str(master_port), str(LAUNCHER), "--recipe", str(Path(recipe_path).resolve())]
    cmd += plan.args()
    if resume:
        cmd.append("--resume")
    if stop_after is not None:
        cmd += ["--stop_after", str(stop_after)]
    if overwrite:
        cmd.append("--overwrite")
    return cmd


def prepare(recipe_path, step: int, overwrite: bool = False, **folders):
    """Load and check everything a launch needs (no model is loaded); returns (recipe, plan)."""
    from mlc.distill.loop import check_outputs
    from mlc.distill.plan import check_plan, check_settings, plan_step
    from mlc.recipe import load_recipe

    recipe = load_recipe(recipe_path)
    plan = plan_step(recipe, step, **folders)
    check_settings(recipe, plan)  # before any folder is made
    check_outputs(plan, overwrite)
    from mlc.models.teacher import hub_repo

    if recipe.teacher.source == EMBEDDED_TEACHER or hub_repo(recipe.teacher.source) is not None:
        nano = RunLayout.of(recipe).teacher  # the embedded teacher imported there, a Hub one downloaded there
        for folder in (plan.teacher_dir, plan.student_dir):
            if folder is not None and Path(folder) == nano and not (nano / "config.json").is_file():
                from mlc.models.teacher import materialize_teacher

                materialize_teacher(recipe.teacher.source, nano)
                if hub_repo(recipe.teacher.source) is not None:  # the checks validation deferred
                    from mlc.recipe import check_teacher_fit

                    check_teacher_fit(recipe, nano)
    if plan.step == 1 and not folders.get("student") and not (plan.student_dir / "config.json").is_file() \
            and plan.teacher_dir is not None and (plan.teacher_dir / "config.json").is_file():
        from mlc.surgery.layers import make_student  # the layer-truncated student, made once

        layers = recipe.student.layer_indices(_config_layers(plan.teacher_dir))
        make_student(plan.teacher_dir, layers, plan.student_dir)
    check_plan(recipe, plan)
    return recipe, plan


def _config_layers(folder) -> int:
    from mlc.models.io import read_config

    return int(read_config(folder)["num_hidden_layers"])


def launch(recipe_path, step: int, *, num_gpus: int = 1, resume: bool = False, stop_after: int | None = None,
           master_port: int | None = None, dry_run: bool = False, overwrite: bool = False, **folders) -> int:
    """Run one step with ``num_gpus`` local ranks under the deepspeed launcher; returns its exit status.

    ``dry_run``: check and prepare the inputs, print the launch command, start nothing."""
    if num_gpus < 1:
        raise MlcError(f"--num-gpus must be at least 1, not {num_gpus}", "--num-gpus")
    if stop_after is not None and stop_after < 1:
        raise MlcError(f"--stop-after must be at least 1, not {stop_after}", "--stop-after")
    _, plan = prepare(recipe_path, step, overwrite, **folders)
    master_port = master_port or free_port()
    cmd = launch_command(recipe_path, plan, num_gpus=num_gpus, master_port=master_port,
                         resume=resume, stop_after=stop_after, overwrite=overwrite)
    if dry_run:
        import shlex

        env = launch_env(num_gpus)
        prefix = "".join(f"{k}={env[k]} " for k in ("DS_ACCELERATOR", "OMP_NUM_THREADS") if k in env)
        print(prefix + " ".join(shlex.quote(c) for c in cmd))
        return 0
    try:
        return run_launch(cmd, env=launch_env(num_gpus), cwd=str(Path.cwd()))
    finally:  # the launch has ended (or was ended with mlc): its ranks no longer map the buffers
        remove_shm_buffers(master_port)


SHM_DIR = Path("/dev/shm")


def remove_shm_buffers(master_port: int, shm_dir: Path | None = None) -> list[Path]:
    """Remove the shared-memory files DeepSpeed's CPU all-reduce made for the launch on ``master_port``.

    With ``DS_ACCELERATOR=cpu`` every rank creates ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``
    (66 MB, held in RAM) and DeepSpeed never unlinks it: each CPU launch left 66 MB per rank until the machine
    ran out of memory. The port names one launch (its rendezvous holds it while it runs); call this only once
    every rank of that launch has ended."""
    shm_dir = SHM_DIR if shm_dir is None else shm_dir
    if not shm_dir.is_dir():
        return []
    gone = []
    for p in sorted(shm_dir.glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{int(master_port)}_*")):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            gone.append(p)
    return gone


def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` is still there (zombies waiting for their parent count as gone)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc = Path("/proc")
    if not proc.is_dir():
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] != "Z":
            return True
    return False


def _stop_group(pgid: int, signum: int, grace: float) -> None:
    """Send ``signum`` to the launch's process group, wait up to ``grace`` seconds, then SIGKILL what is left."""
    import signal
    import time

    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signum)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not _group_alive(pgid):
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and _group_alive(pgid):
        time.sleep(0.1)


FORWARDED = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")


def run_launch(cmd: list[str], *, env: dict, cwd: str, grace: float = 10.0) -> int:
    """Run the DeepSpeed launcher in its own session and process group; return its exit status.

    SIGTERM, SIGINT (Ctrl-C), SIGHUP (the terminal closed) or SIGQUIT to this process is passed to the whole
    group (runner, per-node launcher, every rank), which gets ``grace`` seconds to end before SIGKILL; then
    this process exits with status 128 + the signal number (``SystemExit``), leaving no rank behind to go on
    training and write the output. Without this the launch would outlive the ``mlc`` process that started
    it (in its own session it no longer gets the terminal's signals itself)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():  # signal handlers only work there
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, start_new_session=True)
        try:
            return proc.wait()
        finally:
            if proc.poll() is None or _group_alive(proc.pid):
                _stop_group(proc.pid, signal.SIGTERM, grace)
    received: list[int] = []
    group: list[int] = []

    def forward(signum, frame):
        if not received:
            received.append(signum)
            if group:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(group[0], signum)

    signals = [getattr(signal, name) for name in FORWARDED if hasattr(signal, name)]
    previous = {s: signal.signal(s, forward) for s in signals}  # before the start: no signal slips by
    try:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, start_new_session=True)
        group.append(proc.pid)  # a new session's leader: its pid is the group id
        if received:  # came while starting
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, received[0])
        try:
            rc = proc.wait()
            if received:
                _stop_group(proc.pid, received[0], grace)  # the runner may end before its ranks
        except BaseException:
            _stop_group(proc.pid, signal.SIGTERM, grace)
            raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if received:
        print(f"mlc: stopped by signal {received[0]}; the DeepSpeed launch (process group {proc.pid}) was "
              "ended with it", file=sys.stderr, flush=True)
        raise SystemExit(128 + received[0])
    return rc


def _cmd_distill(args) -> int:
    rc = launch(args.recipe, args.step, num_gpus=args.num_gpus, resume=args.resume, stop_after=args.stop_after,
                master_port=args.master_port, dry_run=args.dry_run, overwrite=args.overwrite,
                teacher=args.teacher, student=args.student, shards=args.shards,
                out=args.out, final=args.final, masks=args.masks)
    if rc != 0:
        print(f"mlc: error: the distillation launch failed with exit status {rc}", file=sys.stderr)
    return rc


def register(subparsers) -> None:
    d = subparsers.add_parser(
        "distill", help="Run a distillation step (0 adapt, 1, 2) under DeepSpeed on this machine.",
        description="Run one step of the recipe under DeepSpeed with --num-gpus local ranks (CPU ranks where "
                    "there is no GPU): 0 = MLM adaptation of the teacher, 1 = distil the layer-truncated "
                    "student, 2 = distil the pruned student and export the sliced model. Folders default to "
                    "the recipe's run folder. For several machines see docs/distill.md.")
    d.add_argument("recipe", help="recipe YAML file")
    d.add_argument("--step", type=int, required=True, choices=[0, 1, 2], help="which step to run")
    d.add_argument("--num-gpus", type=int, default=1, help="local ranks (GPUs; CPU processes without a GPU)")
    d.add_argument("--resume", action="store_true", help="continue a killed run from its newest checkpoint")
    d.add_argument("--stop-after", type=int, default=None,
                   help="end after this many optimizer steps with a checkpoint (e.g. a scheduler time slot)")
    d.add_argument("--dry-run", action="store_true",
                   help="check and prepare the inputs (e.g. make the student), print the launch command, stop")
    d.add_argument("--master-port", type=int, default=None, help="rendezvous port (default: a free one)")
    d.add_argument("--teacher", help="teacher HF folder (default: from the run folder)")
    d.add_argument("--student", help="student HF folder to start from (default: from the run folder)")
    d.add_argument("--shards", help="shard folder (default: R/shards)")
    d.add_argument("--out", help="output HF folder (default: R/teacher-adapted, R/step1 or R/step2)")
    d.add_argument("--final", help="step 2: where the sliced dense model goes (default: R/final)")
    d.add_argument("--overwrite", action="store_true", help="replace --out and --final even if mlc did not "
                                                            "write them (their contents are deleted)")
    d.add_argument("--masks", help="step 2: pruning masks from this file (e.g. `mlc prune --masks-out`); "
                                   "default: computed from the recipe's prune section")
    d.set_defaults(func=_cmd_distill)
