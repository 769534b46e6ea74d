"""Two gloo ranks stream the same shards: disjoint data in an epoch, exactly equal lengths, same seed -> same
batches."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from mlc.data.shards import prepare_shards, read_manifest
from mlc.recipe import ShardSpec

WORKER = textwrap.dedent('''
    import sys
    import numpy as np
    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp

    from mlc.data.stream import ShardStream

    def stream_once(rank, world, shard_dir, out, seed, tag):
        stream = ShardStream(shard_dir, batch_size=4, rank=rank, world_size=world, seed=seed,
                             samples_per_epoch=48, workers=1)
        original, inputs = [], []
        for epoch in range(2):
            for batch in stream:
                step = torch.ones(1)
                dist.all_reduce(step)  # a data-parallel step: every rank must take part, or this hangs
                assert step.item() == world
                original.append(batch["original_ids"].numpy())
                inputs.append(batch["input_ids"].numpy())
        counts = [torch.zeros(1, dtype=torch.long) for _ in range(world)]
        dist.all_gather(counts, torch.tensor([len(original)]))
        np.save(f"{out}/{tag}-rank{rank}-original.npy", np.stack(original))
        np.save(f"{out}/{tag}-rank{rank}-inputs.npy", np.stack(inputs))
        np.save(f"{out}/{tag}-rank{rank}-counts.npy", torch.cat(counts).numpy())

    def run(rank, world, shard_dir, out):
        dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=world)
        for tag, seed in (("a", 11), ("b", 11), ("c", 12)):  # b repeats a; c has another seed
            stream_once(rank, world, shard_dir, out, seed, tag)
        dist.barrier()
        dist.destroy_process_group()

    if __name__ == "__main__":
        mp.spawn(run, args=(2, sys.argv[1], sys.argv[2]), nprocs=2, join=True)
''')


@pytest.mark.distributed
@pytest.mark.slow
def test_two_gloo_ranks_get_disjoint_equal_length_reproducible_streams(tiny_xlmr_dir, tmp_path):
    letters = "abdeghiklmnoprstuwy"
    sents = [f"{letters[i % 19]}{letters[(i // 19) % 19]}{letters[(i // 361) % 19]} mvua kubwa imenyesha pwani"
             for i in range(900)]
    shards = tmp_path / "shards"
    manifest = prepare_shards(sents, tiny_xlmr_dir, shards,
                              ShardSpec(seq_len=40, sequences_per_sample=6, samples_per_shard=5))
    entries = manifest["shards"]
    per_rank = [sum(e["sequences"] for e in entries[r::2]) for r in range(2)]
    assert per_rank[0] != per_rank[1]  # the ranks' shards are of unequal sizes
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run(["timeout", "240", sys.executable, str(script), str(shards), str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    load = lambda tag, rank, what: np.load(out / f"{tag}-rank{rank}-{what}.npy")  # noqa: E731
    for tag in "abc":
        assert load(tag, 0, "counts").tolist() == [24, 24]  # 2 epochs x 48 / 4, on both ranks
        assert load(tag, 0, "original").shape == load(tag, 1, "original").shape == (24, 4, 40)
    def rows(tag, rank, epoch):
        return [tuple(r) for r in load(tag, rank, "original")[12 * epoch:12 * (epoch + 1)].reshape(-1, 40).tolist()]

    for epoch in (0, 1):  # within an epoch the ranks' data is disjoint and no sequence repeats
        both = rows("a", 0, epoch) + rows("a", 1, epoch)
        assert len(set(both)) == len(both) == 96
    assert rows("a", 0, 0) != rows("a", 0, 1)
    for rank in (0, 1):
        assert np.array_equal(load("a", rank, "original"), load("b", rank, "original"))  # same seed
        assert np.array_equal(load("a", rank, "inputs"), load("b", rank, "inputs"))  # same masking
        assert not np.array_equal(load("a", rank, "original"), load("c", rank, "original"))  # other seed
    assert read_manifest(shards)["sequences"] == sum(e["sequences"] for e in entries)
