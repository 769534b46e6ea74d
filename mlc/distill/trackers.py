"""The trackers a distillation step reports to (recipe ``logging.report_to``), on rank 0: TensorBoard, Weights &
Biases, MLflow. Each gets every scalar :class:`mlc.distill.logging.RunLog` writes and, once per launch, the step's
settings as hyper-parameters (:func:`step_hparams`).

Without a server configured, W&B runs offline (``<output>.run/wandb``, ``wandb sync`` uploads it later) and MLflow
writes a local file store (``<output>.run/mlruns``). A resumed launch continues the same W&B run (its id) and
MLflow run (its run id), both kept in ``<output>.run/trackers.json``; the steps a killed launch had logged past
its last checkpoint are logged again by the resumed one, so W&B and MLflow are not given those steps twice
(TensorBoard drops them itself: ``purge_step``).
"""
from __future__ import annotations

import json
import os
import secrets
import sys
import time
from pathlib import Path

from mlc.errors import MlcError

STATE = "trackers.json"


def _flatten(data, prefix: str, out: dict) -> None:
    if isinstance(data, dict) and data:
        for k, v in data.items():
            _flatten(v, f"{prefix}.{k}", out)
    elif data is None:
        out[prefix] = "none"
    elif isinstance(data, (bool, int, float, str)):
        out[prefix] = data
    else:  # lists (and empty dicts): one value, as JSON
        out[prefix] = json.dumps(data, sort_keys=True)


def step_hparams(recipe, plan, world: int) -> dict:
    """The settings one step runs with, flat (``distill.step1.lr``, ``loader.workers``, ...): the step's section,
    ``prune`` for step 2, ``loader``, ``seed``, the teacher and the number of ranks. Values are bool, int, float
    or str (None as "none", lists as JSON), what every tracker takes."""
    from mlc.distill.plan import step_spec

    flat: dict = {"recipe": recipe.name, "language": recipe.language, "step": plan.step, "seed": recipe.seed,
                  "world_size": world}
    _flatten(recipe.teacher.model_dump(mode="json"), "teacher", flat)
    flat["teacher.folder"] = str(plan.teacher_dir) if plan.teacher_dir is not None else "none"
    _flatten(step_spec(recipe, plan.step).model_dump(mode="json"), plan.key, flat)
    if plan.step == 2:
        _flatten(recipe.prune.model_dump(mode="json"), "prune", flat)
    _flatten(recipe.loader.model_dump(mode="json"), "loader", flat)
    return flat


class _State:
    """``trackers.json`` of a run folder: the trackers' run ids and the last step each was given."""

    def __init__(self, folder: Path, resumed: bool):
        self.path = folder / STATE
        self.data: dict = {}
        if resumed and self.path.is_file():
            try:
                self.data = json.loads(self.path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                self.data = {}  # a damaged file costs the run's continuity, not the resume
        if not isinstance(self.data, dict):
            self.data = {}

    def get(self, tracker: str) -> dict:
        value = self.data.get(tracker)
        return value if isinstance(value, dict) else {}

    def put(self, tracker: str, **values) -> None:
        from mlc.paths import atomic_write_json

        self.data[tracker] = {**self.get(tracker), **values}
        atomic_write_json(self.path, self.data)


class TensorBoardTracker:
    name = "tensorboard"

    def __init__(self, folder: Path, start_step: int, resumed: bool):
        from torch.utils.tensorboard import SummaryWriter

        # a resume from the checkpoint of step c logs c + 1 on: what the killed launch logged from there is dropped,
        # c itself (logged before that checkpoint was saved) is kept
        self.writer = SummaryWriter(str(folder / "tensorboard"), purge_step=start_step + 1 if resumed else None)

    def hparams(self, values: dict, metrics: list[str]) -> None:
        # written into this run's event file (SummaryWriter.add_hparams would start another run folder)
        from torch.utils.tensorboard.summary import hparams

        writer = self.writer._get_file_writer()
        for summary in hparams(values, {m: 0.0 for m in metrics}):
            writer.add_summary(summary)
        self.writer.flush()

    def log(self, values: dict, step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self, status: str) -> None:
        self.writer.close()


class _Resumable:
    """A tracker that keeps its run over launches: steps up to the one logged last are not given again
    (subclasses write with ``_log``)."""

    def __init__(self, state: _State):
        self.state = state
        self.logged_through = self.state.get(self.name).get("last_step", -1)

    def log(self, values: dict, step: int) -> None:
        if step <= self.logged_through:
            return  # logged by the launch this one resumes
        self._log(values, step)
        self.state.put(self.name, last_step=step)


def wandb_mode(setting: str) -> str:
    """The recipe's ``logging.wandb.mode``: auto = $WANDB_MODE, else online with an API key, else offline."""
    if setting != "auto":
        return setting
    return os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")


class WandbTracker(_Resumable):
    name = "wandb"

    def __init__(self, folder: Path, spec, run_name: str, group: str, state: _State):
        import wandb

        super().__init__(state)
        run_id = state.get(self.name).get("id") or secrets.token_hex(6)  # W&B ids: lower-case letters and digits
        state.put(self.name, id=run_id)  # before init: a launch killed during it resumes the same id
        # console="off": the ranks' stdout and stderr stay the launcher's to read
        self.run = wandb.init(project=spec.project, entity=spec.entity, name=run_name, group=group, id=run_id,
                              resume="allow", mode=wandb_mode(spec.mode), dir=str(folder),
                              settings=wandb.Settings(console="off"))

    def hparams(self, values: dict, metrics: list[str]) -> None:
        self.run.config.update(values, allow_val_change=True)

    def _log(self, values: dict, step: int) -> None:
        self.run.log(dict(values), step=step)

    def close(self, status: str) -> None:
        self.run.finish(exit_code=0 if status != "failed" else 1)


class MlflowTracker(_Resumable):
    name = "mlflow"

    def __init__(self, folder: Path, spec, run_name: str, experiment: str, state: _State):
        from mlflow.tracking import MlflowClient

        super().__init__(state)
        uri = spec.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            # MLflow 3 keeps its file store only on request; it is the one store that needs nothing installed
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (folder / "mlruns").resolve().as_uri()
        try:
            self.client = MlflowClient(tracking_uri=uri)
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found is not None else self.client.create_experiment(experiment)
            saved = state.get(self.name).get("run_id")
            self.run_id = saved if saved and self._exists(saved) else None
            if self.run_id is None:
                self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
                state.put(self.name, run_id=self.run_id, last_step=-1)
                self.logged_through = -1
            else:
                self.client.update_run(self.run_id, status="RUNNING")
        except MlcError:
            raise
        except Exception as e:  # mlflow's own errors (an unreachable server, a refused store) name no key
            raise MlcError(f"MLflow at {uri}: {type(e).__name__}: {e}", "logging.mlflow.tracking_uri") from None

    def _exists(self, run_id: str) -> bool:
        try:
            self.client.get_run(run_id)
            return True
        except Exception:  # removed from the store since: a new run
            return False

    def hparams(self, values: dict, metrics: list[str]) -> None:
        from mlflow.entities import Param

        # params cannot change in a run: a resumed launch adds those the run lacks, and says which differ
        have = self.client.get_run(self.run_id).data.params
        new = [Param(k, str(v)) for k, v in values.items() if k not in have]
        changed = sorted(k for k, v in values.items() if k in have and have[k] != str(v))
        for i in range(0, len(new), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(self.run_id, params=new[i:i + 100])
        if changed:
            print(f"mlc distill: note: MLflow run {self.run_id} keeps its first values of {', '.join(changed)}",
                  file=sys.stderr, flush=True)

    def _log(self, values: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, {"finished": "FINISHED", "failed": "FAILED"}.get(status, "KILLED"))


def open_trackers(recipe, plan, start_step: int, resumed: bool, hparams: dict, metrics: tuple[str, ...]) -> list:
    """Rank 0: the recipe's trackers for this step, opened (continuing their runs when ``resumed``) and given
    ``hparams``, naming ``metrics`` as the values the run is judged by. A failure closes those opened and is an
    MlcError."""
    from mlc.recipe import tracker_missing

    folder = plan.run_dir
    folder.mkdir(parents=True, exist_ok=True)
    state = _State(folder, resumed)
    spec = recipe.logging
    run_name = f"{recipe.name}/{plan.key}"
    out = []
    try:
        for name in spec.report_to:
            install = tracker_missing(name)
            if install is not None:  # validated where the recipe was, but this machine may differ
                raise MlcError(f"{name} is not installed on this machine: {install}", "logging.report_to")
            if name == "tensorboard":
                out.append(TensorBoardTracker(folder, start_step, resumed))
            elif name == "wandb":
                out.append(WandbTracker(folder, spec.wandb, run_name, recipe.name, state))
            else:
                out.append(MlflowTracker(folder, spec.mlflow, run_name, spec.mlflow.experiment or recipe.name, state))
            out[-1].hparams(hparams, list(metrics))
    except BaseException as e:
        for t in out:
            t.close("failed")
        if isinstance(e, Exception) and not isinstance(e, MlcError):  # the tracker's own error names no key
            raise MlcError(f"{name}: {type(e).__name__}: {e}", "logging.report_to") from e
        raise
    return out
