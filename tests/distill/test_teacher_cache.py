"""The teacher cache (mlc/distill/teacher_cache.py): targets read back are the teacher's own tensors, a
sequence is found only by exactly what the teacher reads, damaged entries are computed again, the folder
stays under its bound, and another teacher gets another folder."""
from __future__ import annotations

import json

import pytest
import torch

from mlc.distill.engine import Teacher
from mlc.distill.losses import LossSet
from mlc.distill.teacher_cache import CachedTeacher, TeacherCache, open_cached_teacher, sequence_key
from mlc.errors import MlcError
from mlc.paths import file_mode
from mlc.models.tiny import tiny_bert
from mlc.recipe import Losses, TeacherCacheSpec


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cache-teacher") / "teacher"
    tiny_bert(folder, layers=4)
    return folder


def _teacher(folder, logits: bool = True) -> Teacher:
    spec = {"hidden_mse": {"weight": 1.0}, "attention": {"weight": 1.0}}
    if logits:
        spec["logits"] = {"weight": 1.0}
    losses = LossSet(Losses.model_validate(spec), 2, 4)
    return Teacher(folder, losses, torch.device("cpu"), torch.float32)


def _batch(seed: int, rows: int = 3, length: int = 16):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 300, (rows, length), generator=g)
    mask = torch.ones(rows, length, dtype=torch.long)
    mask[0, 12:] = 0
    ids[0, 12:] = 0
    return ids, mask


def _open(teacher, folder, tmp_path, max_gb: float = 1.0) -> CachedTeacher:
    return open_cached_teacher(teacher, TeacherCacheSpec(enabled=True, max_gb=max_gb), tmp_path / "cache", folder,
                               "cpu", rank=0, world=1)


def _same(a, b):
    assert [h is None for h in a.hidden_states] == [h is None for h in b.hidden_states]
    for x, y in zip(a.hidden_states, b.hidden_states):
        if x is not None:
            assert torch.equal(x, y)
    assert (a.head_input is None) == (b.head_input is None)
    if a.head_input is not None:
        assert torch.equal(a.head_input, b.head_input)
    assert sorted(a.qk) == sorted(b.qk) and a.qk
    for layer in a.qk:
        assert torch.equal(a.qk[layer][0], b.qk[layer][0]) and torch.equal(a.qk[layer][1], b.qk[layer][1])


def test_a_stored_batch_is_read_back_exactly_without_running_the_teacher(teacher_dir, tmp_path):
    teacher = _teacher(teacher_dir)
    cached = _open(teacher, teacher_dir, tmp_path)
    ids, mask = _batch(0)
    direct = teacher(ids, mask)
    first = cached(ids, mask)
    assert cached.cache.counts["misses"] == 3 and cached.cache.counts["written"] == 3
    _same(first, direct)

    calls = []
    teacher.model.register_forward_pre_hook(lambda *a: calls.append(1))
    again = cached(ids, mask)
    assert calls == [] and cached.cache.counts["hits"] == 3  # read, not computed
    _same(again, direct)
    # the rows in another order, and two of them in another batch, are found too
    again = cached(ids[[2, 0]], mask[[2, 0]])
    assert calls == [] and cached.cache.counts["hits"] == 5
    assert torch.equal(again.hidden_states[4][0], direct.hidden_states[4][2])
    # readable by whoever shares the folder, as any file this process writes (safetensors alone makes 0600)
    entries = [f for f in cached.cache.folder.rglob("*.safetensors")]
    assert len(entries) == 3 and {f.stat().st_mode & 0o777 for f in entries} == {file_mode()}


def test_a_sequence_is_found_only_by_what_the_teacher_reads(teacher_dir, tmp_path):
    cached = _open(_teacher(teacher_dir), teacher_dir, tmp_path)
    ids, mask = _batch(1)
    cached(ids, mask)
    other_mask = mask.clone()
    other_mask[1, -1] = 0  # the same ids, one position less attended
    cached(ids, other_mask)
    assert cached.cache.counts["hits"] == 0 and cached.cache.counts["misses"] == 6
    assert sequence_key(ids[1].numpy(), mask[1].numpy()) != sequence_key(ids[1].numpy(), other_mask[1].numpy())
    other_ids = ids.clone()
    other_ids[2, 3] += 1
    assert sequence_key(ids[2].numpy(), mask[2].numpy()) != sequence_key(other_ids[2].numpy(), mask[2].numpy())


def test_another_teacher_or_other_targets_get_another_folder(teacher_dir, tmp_path):
    a = _open(_teacher(teacher_dir), teacher_dir, tmp_path)
    b = _open(_teacher(teacher_dir, logits=False), teacher_dir, tmp_path)  # no MLM-head input stored
    assert a.cache.folder != b.cache.folder
    other = tmp_path / "other-teacher"
    tiny_bert(other, layers=4, seed=1)
    c = _open(_teacher(other), other, tmp_path)
    assert c.cache.folder not in (a.cache.folder, b.cache.folder)
    assert json.loads((a.cache.folder / "namespace.json").read_text())["head_input"] is True
    # a namespace file that does not match its folder's name is refused, not trusted
    meta = a.cache.folder / "namespace.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "teacher": "0" * 64}))
    with pytest.raises(MlcError, match="another teacher"):
        _open(_teacher(teacher_dir), teacher_dir, tmp_path)


def test_a_damaged_entry_is_computed_again_and_replaced(teacher_dir, tmp_path):
    teacher = _teacher(teacher_dir)
    cached = _open(teacher, teacher_dir, tmp_path)
    ids, mask = _batch(2)
    direct = teacher(ids, mask)
    cached(ids, mask)
    entry = cached.cache.path(sequence_key(ids[1].numpy(), mask[1].numpy()))
    entry.write_bytes(entry.read_bytes()[:100])  # cut short
    out = cached(ids, mask)
    assert cached.cache.counts["unreadable"] == 1 and cached.cache.counts["misses"] == 6
    _same(out, direct)
    out = cached(ids, mask)  # replaced: the whole batch is read now
    assert cached.cache.counts["hits"] == 3
    _same(out, direct)
    assert not list(cached.cache.folder.rglob("*.tmp"))


def test_past_max_gb_nothing_more_is_written(teacher_dir, tmp_path):
    teacher = _teacher(teacher_dir)
    probe = _open(teacher, teacher_dir, tmp_path / "probe")
    ids, mask = _batch(3)
    probe(ids, mask)
    per_sequence = probe.cache.counts["bytes_written"] / 3
    cached = _open(teacher, teacher_dir, tmp_path, max_gb=2.5 * per_sequence / 2**30)
    out = cached(ids, mask)
    assert cached.cache.counts["written"] == 2 and cached.cache.counts["unwritten_over_budget"] == 1
    _same(out, teacher(ids, mask))  # the targets are the teacher's whether stored or not
    # a second process opening the folder finds it full
    again = TeacherCache(tmp_path / "cache", json.loads((cached.cache.folder / "namespace.json").read_text()),
                         max_bytes=int(2.5 * per_sequence), rank=0, world=1)
    assert again.budget < per_sequence
    # the bound is the cache folder's, every namespace in it counted (another target set included)
    other = TeacherCache(tmp_path / "cache", {"teacher": "another", "targets": "others"},
                         max_bytes=int(2.5 * per_sequence), rank=0, world=1)
    assert other.folder != cached.cache.folder and other.budget < per_sequence


def test_the_recipe_key_is_checked_and_left_out_of_the_fingerprints():
    from mlc.recipe import DistillSpec

    with pytest.raises(Exception, match="max_gb"):
        TeacherCacheSpec(enabled=True, max_gb=0)
    with pytest.raises(Exception, match="extra|not permitted"):
        TeacherCacheSpec.model_validate({"enabled": True, "size": 3})
    assert "teacher_cache" not in repr(DistillSpec.model_validate(
        {"step1": {"steps": 1, "batch_size": 1, "lr": 1e-3, "losses": {"hidden_mse": {"weight": 1.0}}},
         "teacher_cache": {"enabled": True}}))


@pytest.mark.parametrize("how", ["os", "safetensors"])
def test_a_failing_write_costs_the_cache_not_the_run(teacher_dir, tmp_path, monkeypatch, capsys, how):
    import errno

    import safetensors.torch
    from safetensors import SafetensorError

    teacher = _teacher(teacher_dir)
    cached = _open(teacher, teacher_dir, tmp_path)

    def full_disk(tensors, filename, metadata=None):
        open(filename, "wb").write(b"partial")
        if how == "os":
            raise OSError(errno.ENOSPC, "No space left on device")
        # what safetensors raises on a full disk (seen in an ablation run: it stopped both ranks)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    ids, mask = _batch(4)
    out = cached(ids, mask)
    _same(out, teacher(ids, mask))
    assert cached.cache.counts["written"] == 0 and cached.cache.counts["write_errors"] == 3
    assert "No space left on device" in capsys.readouterr().err
    assert not list(cached.cache.folder.rglob("*.tmp")) and not list(cached.cache.folder.rglob("*.safetensors"))
