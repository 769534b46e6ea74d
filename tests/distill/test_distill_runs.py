"""2-rank CPU DeepSpeed runs of the distillation engine on a tiny BERT (gloo, DS_ACCELERATOR=cpu).

Few launches serve several checks (each costs 20-60 s on 2 busy cores): ZeRO-2 step 1 in fp32 through
`mlc distill`; the same under ZeRO-3 as a simulated two-node launch stopped after step 3 and resumed on one
node; step 2 (masked student, bf16, ZeRO-3) from the ZeRO-2 step-1 student; step 0 on one rank.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distill_helpers import (build_tiny_world, heldout_records, log_losses, log_records, recipe_dict,
                             write_recipe)

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_tiny_world(tmp_path_factory.mktemp("distill-world"))


def _env():
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    return env


def _launch_step0_by_hand(recipe: Path, world: dict) -> subprocess.CompletedProcess:
    """launcher/distill.py --step 0 as one rank started by hand (the environment DeepSpeed's launcher sets)."""
    from mlc.distill.commands import free_port, remove_shm_buffers

    port = free_port()
    env = dict(_env(), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port))
    try:
        return subprocess.run([sys.executable, "launcher/distill.py", "--recipe", str(recipe), "--step", "0",
                               "--shards", str(world["shards"])], env=env, cwd=str(ROOT), capture_output=True,
                              text=True, timeout=300)
    finally:
        remove_shm_buffers(port)  # started by hand: no mlc distill around it to remove DeepSpeed's file


def _launch(recipe: Path, step: int, world: dict, out_root: Path, *extra: str) -> subprocess.CompletedProcess:
    from mlc.distill.commands import free_port, remove_shm_buffers

    port = free_port()
    cmd = [sys.executable, "-m", "mlc.cli", "distill", str(recipe), "--step", str(step), "--num-gpus", "2",
           "--shards", str(world["shards"]), "--master-port", str(port), *extra]
    if step == 1:
        cmd += ["--student", str(world["student"])]
    proc = subprocess.run(cmd, env=_env(), cwd=str(ROOT), capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert remove_shm_buffers(port) == []  # mlc removed DeepSpeed's /dev/shm buffers of the launch
    return proc


@pytest.fixture(scope="module")
def zero2_run(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("z2")
    recipe = write_recipe(out / "recipe.yaml", recipe_dict(world, out / "run", stage1="zero2"))
    _launch(recipe, 1, world, out)
    return out / "run"


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_zero2_loss_falls_and_logs_every_term(zero2_run):
    losses = log_losses(zero2_run / "step1.run")
    assert len(losses) == 16
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.01, losses
    rec = json.loads((zero2_run / "step1.run" / "log.jsonl").read_text().splitlines()[-1])
    for key in ("loss/hidden_mse", "loss/hidden_cos", "loss/mlm", "loss/logits", "loss/attention", "lr",
                "grad_norm", "tokens_per_s", "memory/max_rss_mb"):
        assert key in rec and rec[key] == rec[key], key
    assert rec["ranks"] == 2
    # TensorBoard has every scalar
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(zero2_run / "step1.run" / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss/total", "loss/mlm", "loss/logits", "loss/attention", "grad_norm", "lr"} <= tags
    # checkpoints: the newest 2 kept, latest.json names the final one
    ckpts = sorted(p.name for p in (zero2_run / "step1.run" / "checkpoints").glob("step-*"))
    assert ckpts == ["step-000012", "step-000016"]
    # the export is a plain HF folder with its MLM head
    from transformers import AutoModelForMaskedLM

    model = AutoModelForMaskedLM.from_pretrained(str(zero2_run / "step1"))
    assert model.config.num_hidden_layers == 2


def test_an_offloaded_optimizer_with_auto_values_trains_as_adamw_does(world, zero2_run, tmp_path):
    """offload_optimizer failed after launch (ZeRORuntimeException with torch AdamW) and 'auto' values were
    refused; now DeepSpeed's CPU Adam (AdamW mode) takes the state to the CPU and follows torch's AdamW."""
    ds = tmp_path / "offload.json"
    ds.write_text(json.dumps({
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "train_batch_size": "auto",
        "gradient_clipping": "auto", "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto", "betas": "auto"}},
        "zero_optimization": {"stage": 2, "reduce_bucket_size": "auto",
                              "offload_optimizer": {"device": "cpu", "pin_memory": False}}}))
    recipe = write_recipe(tmp_path / "recipe.yaml", recipe_dict(world, tmp_path / "run", stage1=str(ds)))
    proc = _launch(recipe, 1, world, tmp_path)
    assert "note:" not in proc.stderr  # every value was 'auto': nothing of the JSON was replaced
    summary = json.loads((tmp_path / "run" / "step1.run" / "summary.json").read_text())
    assert summary["offload_optimizer"] is True and summary["zero_stage"] == 2
    a, b = _weights(zero2_run / "step1"), _weights(tmp_path / "run" / "step1")
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    moved = max((a[k] - _weights(world["student"])[k]).abs().max().item() for k in a)
    assert diff < 1e-4 < moved, (diff, moved)


def test_heldout_loss_and_trackers_through_a_stop_and_resume(world, tmp_path, monkeypatch):
    """ZeRO-3, 2 ranks, step 1 of 6 stopped after 3 and resumed: the held-out loss (every 3 steps, 1 batch per
    rank) is logged at steps 3 and 6, finite, for every term, in log.jsonl, TensorBoard, MLflow and W&B
    (offline); summary.json has the last one; MLflow and W&B keep one run over both launches, each step once.
    (That the held-out sequences are in no training stream: test_distill_logging.py, without a launch.)"""
    import math

    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pytest.importorskip("wandb")
    for name in ("WANDB_MODE", "WANDB_API_KEY", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    run = tmp_path / "run"
    data = recipe_dict(world, run, stage1="zero3")
    data["distill"]["step1"].update(steps=6, checkpoint_every=3, eval_every=3, eval_batches=1)
    data["logging"] = {"report_to": ["tensorboard", "mlflow", "wandb"]}
    recipe = write_recipe(tmp_path / "recipe.yaml", data)
    _launch(recipe, 1, world, tmp_path, "--stop-after", "3")
    _launch(recipe, 1, world, tmp_path, "--resume")
    folder = run / "step1.run"

    terms = {"total", "hidden_mse", "hidden_cos", "mlm", "logits", "attention"}
    held = heldout_records(folder)
    assert [r["step"] for r in held] == [3, 6]
    for r in held:
        assert {k for k in r if k.startswith("heldout/loss/")} == {f"heldout/loss/{t}" for t in terms}
        assert all(math.isfinite(r[f"heldout/loss/{t}"]) and r[f"heldout/loss/{t}"] > 0 for t in terms)
        assert r["heldout/sequences"] == 1 * 4 * 2
    assert [r["step"] for r in log_records(folder)] == [1, 2, 3, 4, 5, 6]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["heldout"] == {k: v for k, v in held[-1].items() if k != "time"}

    acc = EventAccumulator(str(folder / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("heldout/loss/attention")] == [3, 6]
    assert [e.step for e in acc.Scalars("loss/total")] == [1, 2, 3, 4, 5, 6]
    assert "_hparams_/session_start_info" in acc.PluginTagToContent("hparams")

    state = json.loads((folder / "trackers.json").read_text())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads its file store only when asked to
    client = MlflowClient(tracking_uri=(folder / "mlruns").resolve().as_uri())
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert [r.info.run_id for r in runs] == [state["mlflow"]["run_id"]] and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["distill.step1.deepspeed"] == "zero3" and runs[0].data.params["world_size"] == "2"
    history = client.get_metric_history(state["mlflow"]["run_id"], "heldout/loss/total")
    assert [m.step for m in history] == [3, 6] and history[-1].value == pytest.approx(held[-1]["heldout/loss/total"])
    assert [m.step for m in client.get_metric_history(state["mlflow"]["run_id"], "loss/total")] == [1, 2, 3, 4, 5, 6]
    wandb_runs = sorted((folder / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 2 and all(f.name.endswith("-" + state["wandb"]["id"]) for f in wandb_runs)


def test_two_node_zero3_killed_and_resumed_matches_uninterrupted_zero2(world, zero2_run, tmp_path):
    """ZeRO-3 on two 'nodes' (a loopback hostfile, --no_ssh, one CPU rank each) stops after step 3 of 16;
    a one-node 2-rank --resume finishes. Losses and final weights equal the uninterrupted ZeRO-2 run's
    (fp32, within reduction-order tolerance): ZeRO-2 and ZeRO-3 agree, and resume loses nothing."""
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "recipe.yaml", recipe_dict(world, run, stage1="zero3"))
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    from mlc.distill.commands import free_port

    port = str(free_port())
    nodes = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--no_ssh",
               "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", port,
               "launcher/distill.py", "--recipe", str(recipe), "--step", "1", "--stop_after", "3",
               "--student", str(world["student"]), "--shards", str(world["shards"])]
        nodes.append(subprocess.Popen(cmd, env=_env(), cwd=str(ROOT), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=420)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    assert "done 3/16 steps on 2 ranks" in outs[0]
    assert all("exits successfully" in o for o in outs)
    latest = json.loads((run / "step1.run" / "checkpoints" / "latest.json").read_text())
    assert latest["step"] == 3 and not (run / "step1").exists()

    _launch(recipe, 1, world, tmp_path, "--resume")
    a, b = log_losses(zero2_run / "step1.run"), log_losses(run / "step1.run")
    assert len(a) == len(b) == 16
    for x, y in zip(a, b):
        assert abs(x - y) <= 1e-4 * max(1.0, abs(x)), (a, b)
    wa, wb = _weights(zero2_run / "step1"), _weights(run / "step1")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("stage2, precision2, compile2", [("zero3", "bf16", False), ("zero2", "fp32", False),
                                                          ("zero2", "fp32", True)])
def test_step2_pruned_weights_stay_exactly_zero(world, zero2_run, tmp_path, stage2, precision2, compile2):
    """Step 2 from the step-1 student, pruning gradually in 2 rounds (re-scored after step 2 of 4): the
    pruned weights are checked on the fp32 master weights at every step (logged), stay zero in the export,
    and the sliced model matches the masked one. ZeRO-2 in fp32 is the case where DeepSpeed leaves the
    no-decay group's Adam moments unlinked (mlc relinks them before a pruning round); compiled, the pruning
    masks' hooks run inside torch.compile'd layers and change between the rounds."""
    from transformers import AutoModelForMaskedLM

    from mlc.surgery.prune import apply_masks, load_masks

    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "recipe.yaml",
                          recipe_dict(world, run, stage2=stage2, precision2=precision2, rounds=2, compile2=compile2))
    step1 = zero2_run / "step1"
    _launch(recipe, 2, world, tmp_path, "--student", str(step1), "--teacher", str(step1))
    rows = [json.loads(x) for x in (run / "step2.run" / "log.jsonl").read_text().splitlines()]
    assert [r["pruned_nonzero"] for r in log_records(run / "step2.run")] == [0, 0, 0, 0]
    assert json.loads((run / "step2.run" / "summary.json").read_text())["compiled"] is compile2
    events = [r for r in rows if "event" in r]
    assert [(e["step"], e["event"]["prune_round"], e["event"]["kept/hidden"]) for e in events] == [(2, 2, 16)]
    masks = load_masks(run / "step2" / "masks.safetensors")
    assert masks.kept()["hidden"] == 16 and masks.kept()["heads"] == [2, 2]
    masked = AutoModelForMaskedLM.from_pretrained(str(run / "step2")).eval()
    start = AutoModelForMaskedLM.from_pretrained(str(step1))
    # training changed the kept weights, and every pruned entry is exactly zero
    w = masked.bert.encoder.layer[0].intermediate.dense.weight
    assert not torch.equal(w, start.bert.encoder.layer[0].intermediate.dense.weight)
    pruned_rows = (~masks.ffn[0]).nonzero().flatten()
    assert pruned_rows.numel() > 0 and bool((w[pruned_rows] == 0).all())
    pruned_hidden = (~masks.hidden).nonzero().flatten()
    emb = masked.bert.embeddings.word_embeddings.weight
    assert bool((emb[:, pruned_hidden] == 0).all())
    # the sliced dense model gives the masked model's outputs
    final = AutoModelForMaskedLM.from_pretrained(str(run / "final")).eval()
    assert final.config.hidden_size == 16 and final.config.num_attention_heads == 2
    apply_masks(masked, masks)
    ids = torch.tensor([[2, 10, 20, 30, 40, 3]])
    with torch.no_grad():
        torch.testing.assert_close(final(input_ids=ids).logits, masked(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    # the exported tokenizers are the student's files, without the flags a reload would add
    for folder in (step1, run / "step2", run / "final"):
        cfg = json.loads((folder / "tokenizer_config.json").read_text())
        assert "local_files_only" not in cfg and "is_local" not in cfg, folder


def test_step0_adapts_a_headless_teacher_with_a_tied_mlm_head(world, tmp_path):
    """Step 0 on one rank (ZeRO-1, the launcher's environment set by hand): a teacher without an MLM head
    gets one tied to its embeddings, trained with MLM; step 1 then picks the adapted teacher."""
    from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer

    from mlc.distill.plan import plan_step
    from mlc.recipe import load_recipe

    bare = tmp_path / "bare"
    AutoModel.from_pretrained(str(world["teacher"])).save_pretrained(bare)
    AutoTokenizer.from_pretrained(str(world["teacher"])).save_pretrained(bare)
    data = recipe_dict(world, tmp_path / "run")
    data["teacher"]["source"] = str(bare)
    data["adapt"] = {"enabled": True, "steps": 4, "batch_size": 4, "lr": 1e-3, "precision": "fp32",
                     "deepspeed": "zero1"}
    recipe = write_recipe(tmp_path / "recipe.yaml", data)
    proc = _launch_step0_by_hand(recipe, world)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    adapted = tmp_path / "run" / "teacher-adapted"
    model = AutoModelForMaskedLM.from_pretrained(str(adapted))
    assert model.cls.predictions.decoder.weight.data_ptr() == model.bert.embeddings.word_embeddings.weight.data_ptr()
    records = log_records(tmp_path / "run" / "teacher-adapted.run")
    assert set(k for k in records[-1] if k.startswith("loss/")) == {"loss/total", "loss/mlm"}
    assert plan_step(load_recipe(recipe), 1).teacher_dir == adapted


def test_a_diverging_run_stops_at_the_first_non_finite_loss_and_exports_nothing(world, tmp_path):
    """Issue 18: a learning rate of 1e30 (finite, so the recipe accepts it) makes the loss non-finite within
    a few steps; step 0 on one rank must stop naming the step and the term, and write no model folder."""

    data = recipe_dict(world, tmp_path / "run")
    data["adapt"] = {"enabled": True, "steps": 6, "batch_size": 4, "lr": 1e30, "clip_grad": 0.0,
                     "precision": "fp32", "deepspeed": "zero1"}
    recipe = write_recipe(tmp_path / "recipe.yaml", data)
    proc = _launch_step0_by_hand(recipe, world)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "adapt: step " in proc.stderr and "the loss term mlm = " in proc.stderr, proc.stderr[-3000:]
    assert "is not finite; stopping without exporting a model" in proc.stderr
    assert not (tmp_path / "run" / "teacher-adapted").exists()


# --- issue 18: resume with loader workers, crafted checkpoints, stopping the launch -------------------

def _workers_recipe(world, folder: Path, steps: int = 8) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = recipe_dict(world, folder / "run")
    data["loader"]["workers"] = 1  # the default: the DataLoader iterator draws from the global torch RNG
    data["distill"]["step1"]["steps"] = steps
    return write_recipe(folder / "recipe.yaml", data)


@pytest.fixture(scope="module")
def stopped_workers_run(world, tmp_path_factory):
    """Step 1 (8 steps, loader.workers 1) stopped after step 3 with a checkpoint: the run folder."""
    folder = tmp_path_factory.mktemp("stopped-w1")
    recipe = _workers_recipe(world, folder)
    _launch(recipe, 1, world, folder, "--stop-after", "3")
    assert json.loads((folder / "run" / "step1.run" / "checkpoints" / "latest.json").read_text())["step"] == 3
    return folder


def test_resume_with_a_loader_worker_is_bit_identical(world, stopped_workers_run, tmp_path):
    """loader.workers 1: stop after step 3 + --resume ends with exactly the uninterrupted run's weights and
    losses. Also: temporary folders of a killed save and a killed export are removed by the next launch."""
    import shutil

    whole = tmp_path / "whole"
    recipe = _workers_recipe(world, whole)
    stale_save = whole / "run" / "step1.run" / "checkpoints" / ".tmp-step-000004"
    stale_export = whole / "run" / ".step1.tmp-k1ll3d"
    for stale in (stale_save, stale_export):
        stale.mkdir(parents=True)
        (stale / "model.safetensors").write_bytes(b"partial")
    _launch(recipe, 1, world, whole)
    assert not stale_save.exists() and not stale_export.exists()

    resumed = tmp_path / "resumed"
    shutil.copytree(stopped_workers_run, resumed)
    recipe = _workers_recipe(world, resumed)  # the same recipe, with this copy's output_dir
    _launch(recipe, 1, world, resumed, "--resume")
    assert log_losses(resumed / "run" / "step1.run") == log_losses(whole / "run" / "step1.run")
    wa, wb = _weights(whole / "run" / "step1"), _weights(resumed / "run" / "step1")
    assert wa.keys() == wb.keys()
    diff = {k: float((wa[k] - wb[k]).abs().max()) for k in wa if not torch.equal(wa[k], wb[k])}
    assert not diff, diff


def test_resume_from_a_crafted_checkpoint_runs_nothing(world, stopped_workers_run, tmp_path):
    """A copied run folder whose DeepSpeed model file unpickles to `os.system(...)`, with a manifest that
    matches it (whoever crafts the file can write one): the resume refuses with exit 2 and an mlc error,
    the command never runs, no model is written."""
    import shutil

    from mlc.distill.checkpoint import MANIFEST, write_manifest

    run = tmp_path / "copy"
    shutil.copytree(stopped_workers_run, run)
    recipe = _workers_recipe(world, run)
    folder = run / "run" / "step1.run" / "checkpoints" / "step-000003"
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    target = folder / "mp_rank_00_model_states.pt"
    state = torch.load(target, map_location="cpu", weights_only=False)  # our own file: safe to read here
    state["buffer_names"] = Exploit()
    torch.save(state, target)
    old = json.loads((folder / MANIFEST).read_text())
    write_manifest(folder, {"key": old["key"], "step": old["step"]})
    cmd = [sys.executable, "-m", "mlc.cli", "distill", str(recipe), "--step", "1", "--num-gpus", "2",
           "--shards", str(world["shards"]), "--student", str(world["student"]), "--resume"]
    proc = subprocess.run(cmd, env=_env(), cwd=str(ROOT), capture_output=True, text=True, timeout=420)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "refusing to load" in out and "could run code from the file" in out, out[-3000:]
    assert "mp_rank_00_model_states.pt" in out and "without --resume" in out
    assert not marker.exists()
    assert not (run / "run" / "step1").exists()


def _descendants(pid: int) -> list[int]:
    """pid's children, grandchildren, ... from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_sigterm_to_mlc_ends_the_whole_launch(world, tmp_path):
    """SIGTERM to `mlc distill` while its 2 ranks train: within seconds no process of the launch (runner,
    launcher, ranks) is left, mlc exits 128 + 15, and no model folder appears afterwards."""
    import signal
    import time

    data = recipe_dict(world, tmp_path / "run")
    data["distill"]["step1"].update(steps=2000, checkpoint_every=1000)
    recipe = write_recipe(tmp_path / "recipe.yaml", data)
    log = tmp_path / "run" / "step1.run" / "log.jsonl"
    cmd = [sys.executable, "-m", "mlc.cli", "distill", str(recipe), "--step", "1", "--num-gpus", "2",
           "--shards", str(world["shards"]), "--student", str(world["student"])]
    output = tmp_path / "mlc.out"  # a file, not a pipe: orphaned ranks would hold a pipe open
    launch: list[int] = []
    with open(output, "w") as sink:
        mlc = subprocess.Popen(cmd, env=_env(), cwd=str(ROOT), stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not (log.is_file() and log.read_text().count("\n") >= 2):  # training has started
            assert mlc.poll() is None and time.monotonic() < deadline, output.read_text()[-3000:]
            time.sleep(0.5)
        launch = _descendants(mlc.pid)
        ranks = [p for p in launch if "--local_rank" in _cmdline(p)]  # deepspeed's launch.py adds it
        assert len(ranks) == 2, [_cmdline(p) for p in launch]
        mlc.send_signal(signal.SIGTERM)
        mlc.wait(timeout=30)
        deadline = time.monotonic() + 5
        while any(_alive(p) for p in launch) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [_cmdline(p) for p in launch if _alive(p)]
        assert not left, left
        assert mlc.returncode == 128 + signal.SIGTERM, output.read_text()[-3000:]
        time.sleep(5)
        assert not (tmp_path / "run" / "step1").exists()
    finally:
        if mlc.poll() is None:
            mlc.kill()
            mlc.wait()
        for p in launch:  # what a failing run left behind
            if _alive(p):
                os.kill(p, signal.SIGKILL)


def test_step2_from_the_original_teacher_reads_what_step1_stored(world, tmp_path):
    """Step 1 with the teacher cache stores the teacher's targets of the sequences it drew; step 2 distilling
    from the same teacher draws the same sequences first, so it reads every target (the teacher never runs
    on them) and trains exactly the weights step 2 trains without the cache."""
    step1_out = tmp_path / "step1"
    runs = {}
    for name, cached in (("cached", True), ("plain", False)):
        data = recipe_dict(world, tmp_path / name, stage2="zero2")
        data["distill"]["step1"].update(steps=4)
        data["distill"]["step2"].update(teacher="teacher")
        data["distill"]["teacher_cache"] = {"enabled": cached, "dir": str(tmp_path / "cache")}
        runs[name] = write_recipe(tmp_path / f"{name}.yaml", data)
    _launch(runs["cached"], 1, world, tmp_path, "--out", str(step1_out))
    first = json.loads((tmp_path / "step1.run" / "summary.json").read_text())["teacher_cache"]
    assert first["hits"] == 0 and first["misses"] == first["written"] == 4 * 2 * 4 * 2  # steps x accum x batch x ranks
    for name in runs:
        _launch(runs[name], 2, world, tmp_path, "--student", str(step1_out), "--teacher", str(world["teacher"]))
    counts = json.loads((tmp_path / "cached" / "step2.run" / "summary.json").read_text())["teacher_cache"]
    assert counts["hit_rate"] == 1.0 and counts["hits"] == 4 * 4 * 2 and counts["written"] == 0
    assert json.loads((tmp_path / "plain" / "step2.run" / "summary.json").read_text())["teacher_cache"] is None
    wa, wb = _weights(tmp_path / "cached" / "step2"), _weights(tmp_path / "plain" / "step2")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
