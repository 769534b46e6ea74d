"""What a step reports, without a launch: the trackers of logging.report_to in one process (TensorBoard, W&B
offline and an MLflow file store get every scalar and the step's settings; a resumed log continues the same runs
without giving them a step twice), and the held-out set the recipe's eval_every takes out of the training stream."""
from __future__ import annotations

import json
import struct

import pytest
import torch

from distill_helpers import build_tiny_world, recipe_dict



@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_tiny_world(tmp_path_factory.mktemp("trackers-world"))


def wandb_records(path) -> list:
    """The protobuf records of an offline W&B run file (a LevelDB-style log: 32 KiB blocks of records with a
    7-byte header, after the file's own 7-byte header)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, buf, out, block = 7, b"", [], 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if n == 0 and kind == 0:
            pos += left
            continue
        buf += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
            buf = b""
    return out


def _log_steps(log, steps, heldout_at=()):
    for step in steps:
        log.add(torch.tensor(1.0 / step), {"mlm": torch.tensor(2.0 / step)}, tokens=10)
        log.tick()
        log.flush(step, lr=0.01 * step, grad_norm=0.5)
        if step in heldout_at:
            log.heldout(step, {"heldout/loss/total": 3.0 / step, "heldout/loss/mlm": 4.0 / step,
                               "heldout/sequences": 8})


def test_every_tracker_gets_the_scalars_and_the_settings_and_a_resume_continues_its_runs(world, tmp_path,
                                                                                         monkeypatch):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    from mlc.distill.logging import RunLog
    from mlc.distill.plan import plan_step
    from mlc.distill.trackers import open_trackers, step_hparams
    from mlc.recipe import parse_recipe

    for name in ("WANDB_MODE", "WANDB_API_KEY", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    data = recipe_dict(world, tmp_path / "run")
    data["logging"] = {"report_to": ["tensorboard", "wandb", "mlflow"]}
    data["distill"]["step1"]["eval_every"] = 2
    recipe = parse_recipe(data, "tiny.yaml")
    plan = plan_step(recipe, 1, student=world["student"], shards=world["shards"])
    hp = step_hparams(recipe, plan, 2)
    assert hp["distill.step1.lr"] == 3e-3 and hp["world_size"] == 2 and hp["seed"] == 3
    assert hp["distill.step1.losses.logits.temperature"] == 2.0 and hp["loader.workers"] == 0
    assert hp["teacher.dtype"] == "fp32" and hp["distill.step1.eval_every"] == 2
    assert "prune.ffn_dim" not in hp  # step 1 does not read prune
    metrics = ("loss/total", "heldout/loss/total")
    run = plan.run_dir

    log = RunLog(run, 0, 4, 0, "tiny", resumed=False, trackers=open_trackers(recipe, plan, 0, False, hp, metrics))
    _log_steps(log, [1, 2, 3], heldout_at=(2,))
    log.close("stopped")  # a launch stopped after step 3, its checkpoint at step 2
    log = RunLog(run, 0, 4, 2, "tiny", resumed=True, trackers=open_trackers(recipe, plan, 2, True, hp, metrics))
    _log_steps(log, [3, 4], heldout_at=(4,))
    log.close("finished")

    # TensorBoard: every scalar, step 3 once (purged and written again), the settings as hparams
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert {"loss/total", "loss/mlm", "lr", "grad_norm", "tokens_per_s", "memory/max_rss_mb", "heldout/loss/total",
            "heldout/loss/mlm"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("loss/total")] == [1, 2, 3, 4]
    assert [e.step for e in acc.Scalars("heldout/loss/total")] == [2, 4]
    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    values = start.session_start_info.hparams
    assert values["distill.step1.lr"].number_value == pytest.approx(3e-3)
    assert values["teacher.dtype"].string_value == "fp32" and values["world_size"].number_value == 2
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert {m.name.tag for m in experiment.metric_infos} == set(metrics)

    # MLflow: one run in the file store under the run folder, its params, each step once
    state = json.loads((run / "trackers.json").read_text())
    client = MlflowClient(tracking_uri=(run / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [state["mlflow"]["run_id"]]
    ml = runs[0]
    assert ml.info.status == "FINISHED" and ml.info.run_name == "tiny/distill.step1"
    assert ml.data.params["distill.step1.lr"] == "0.003" and ml.data.params["world_size"] == "2"
    assert ml.data.params["distill.step1.losses.attention.layer_map"] == "last"
    assert [m.step for m in client.get_metric_history(ml.info.run_id, "loss/total")] == [1, 2, 3, 4]
    assert [m.step for m in client.get_metric_history(ml.info.run_id, "heldout/loss/total")] == [2, 4]
    assert client.get_metric_history(ml.info.run_id, "lr")[-1].value == pytest.approx(0.04)

    # W&B offline: two launches, one run id, the settings as config, each step once
    folders = sorted((run / "wandb").glob("offline-run-*"))
    assert len(folders) == 2 and all(f.name.endswith("-" + state["wandb"]["id"]) for f in folders)
    steps, config = [], {}
    for folder in folders:
        for record in wandb_records(next(folder.glob("run-*.wandb"))):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                if "loss/total" in items:
                    steps.append(items["_step"])
                    assert {"loss/mlm", "lr", "grad_norm", "tokens_per_s"} <= set(items)
            elif kind in ("run", "config"):
                updates = record.run.config.update if kind == "run" else record.config.update
                config.update({i.key: json.loads(i.value_json) for i in updates})
    assert steps == [1, 2, 3, 4]
    assert config["distill.step1.lr"] == 3e-3 and config["loader.workers"] == 0


def test_the_heldout_sequences_are_in_no_training_stream_of_the_recipe(world, tmp_path):
    """eval_batches 2 on 2 ranks of batch 4: the last 16 sequences in manifest order are held out, each rank gets
    8 of them, and one epoch of both ranks' training streams (as build_step makes them) draws only from the
    rest, each position once. The tiny corpus repeats some packed sequences, so they are counted as a multiset
    against the manifest's."""
    from collections import Counter

    from mlc.data.stream import decode_member, read_shard
    from mlc.distill.build import heldout_batches, shard_stream
    from mlc.distill.plan import plan_step
    from mlc.recipe import parse_recipe

    data = recipe_dict(world, tmp_path / "run")
    data["distill"]["step1"].update(eval_every=5, eval_batches=2)
    recipe = parse_recipe(data, "tiny.yaml")
    plan = plan_step(recipe, 1, student=world["student"], shards=world["shards"])
    spec = recipe.distill.step1
    manifest = json.loads((world["shards"] / "manifest.json").read_text())
    every = [tuple(row) for e in manifest["shards"] for member in read_shard(world["shards"] / e["name"])
             for row in decode_member(member, manifest["seq_len"], manifest["tokenizer"]["vocab_size"])[0].tolist()]
    assert len(every) == manifest["sequences"]
    streams = [shard_stream(recipe, plan, spec.batch_size, rank, 2, plan.student_dir, heldout=heldout_batches(spec))
               for rank in (0, 1)]
    heldout = [[tuple(x.tolist()) for b in s.heldout() for x in b["original_ids"]] for s in streams]
    assert heldout[0] + heldout[1] == every[-16:]  # rank 0 the first half, rank 1 the second
    trained = Counter(tuple(x.tolist()) for s in streams for b in s for x in b["original_ids"])
    rest = Counter(every[:-16])
    assert sum(trained.values()) == (len(every) - 16) // 8 * 8  # one pass over the rest, bar the remainder
    assert all(trained[row] <= rest[row] for row in trained)  # nothing beyond the rest's copies of a sequence
    assert sum((rest - trained).values()) == (len(every) - 16) % 8
