"""Two gloo ranks must agree (issue 18, findings 10 and 13): step-2 masks made from different importance scores
end up one set on both ranks; differing masks or recipes are one clear error on every rank; a loader that stops
on one rank (too much damaged data) stops every rank with the same error, not a gloo traceback on the other."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

WORKER = textwrap.dedent('''
    import json
    import sys
    import warnings

    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp

    def outcome(fn):
        try:
            fn()
            return "ok"
        except Exception as e:
            return f"{type(e).__name__}: {e}"

    def run(rank, world, out, shards, damaged):
        from transformers import BertConfig, BertModel

        from mlc.data.stream import DamagedDataWarning, ShardStream
        from mlc.distill.ranks import (agree_masks, agree_on_error, average_scores, check_same_on_ranks,
                                       masks_digest)
        from mlc.errors import MlcError
        from mlc.recipe import PruneSpec
        from mlc.surgery.prune import Scores, make_masks

        dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=world)
        cpu = torch.device("cpu")
        result = {}
        model = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64))
        g = torch.Generator().manual_seed(100 + rank)  # each rank its own scores, as its own gradients give
        scores = Scores(ffn=torch.rand(2, 64, generator=g), inner=torch.rand(2, 4, 8, generator=g),
                        hidden=torch.rand(32, generator=g))
        spec = PruneSpec(ffn_dim=16, heads=2, hidden_size=16)
        result["own"] = masks_digest(make_masks(model, scores, spec))  # what each rank computed before
        masks = agree_masks(make_masks(model, average_scores(scores, cpu), spec), cpu)
        result["agreed"] = masks_digest(masks)
        result["kept"] = masks.kept()
        result["masks_check"] = outcome(lambda: check_same_on_ranks(
            "the step-2 pruning masks", masks_digest(make_masks(model, scores, spec)), cpu))
        result["recipe_check"] = outcome(lambda: check_same_on_ranks("the recipes", f"{rank:064x}", cpu))

        # the loader: rank 1's share holds a damaged shard and no damage is tolerated
        folder = damaged if rank == 1 else shards
        stream = ShardStream(folder, batch_size=4, rank=0, world_size=1, seed=1, workers=0,
                             max_damaged_share=0.0, max_damaged_members=0)
        batches = stream.forever()
        def steps():
            for _ in range(40):
                try:
                    next(batches)
                    problem = ""
                except MlcError as e:
                    problem = str(e)
                agree_on_error(problem, cpu)
                step = torch.ones(1)
                dist.all_reduce(step)  # the data-parallel step every rank takes part in
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DamagedDataWarning)
            result["loader"] = outcome(steps)
        with open(f"{out}/rank{rank}.json", "w") as f:
            json.dump(result, f)
        dist.barrier()
        dist.destroy_process_group()

    if __name__ == "__main__":
        mp.spawn(run, args=(2, *sys.argv[1:]), nprocs=2, join=True)
''')


@pytest.mark.distributed
@pytest.mark.slow
def test_two_gloo_ranks_agree_on_masks_recipes_and_loader_errors(tiny_xlmr_dir, tmp_path):
    import shutil

    from mlc.data.shards import prepare_shards, read_manifest
    from mlc.recipe import ShardSpec

    from test_data_stream import corpus

    shards = tmp_path / "shards"
    prepare_shards(corpus(300), tiny_xlmr_dir, shards,
                   ShardSpec(seq_len=40, sequences_per_sample=8, samples_per_shard=5))
    damaged = tmp_path / "damaged"
    shutil.copytree(shards, damaged)
    for e in read_manifest(damaged)["shards"]:  # a flipped byte in every shard: found while reading
        path = damaged / e["name"]
        data = bytearray(path.read_bytes())
        data[512 + 200] ^= 1
        path.write_bytes(bytes(data))
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run(["timeout", "200", sys.executable, str(script), str(out), str(shards), str(damaged)],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))

    assert r0["own"] != r1["own"]  # the scores differ, and so did the masks each rank made alone
    assert r0["agreed"] == r1["agreed"] and r0["kept"] == r1["kept"]
    assert r0["kept"]["ffn"] == [16, 16] and r0["kept"]["hidden"] == 16
    for check in ("masks_check", "recipe_check"):  # the same clear error on both ranks
        assert r0[check] == r1[check] and r0[check].startswith("MlcError: ranks: "), r0[check]
        assert "differ between ranks: rank 0 has" in r0[check] and "rank 1 has" in r0[check]
    assert "pruning masks" in r0["masks_check"] and "recipes" in r0["recipe_check"]
    assert r0["loader"] == r1["loader"], (r0["loader"], r1["loader"])
    assert r0["loader"].startswith("MlcError: rank 1: ") and "max_damaged_share" in r0["loader"]
    assert str(damaged) in r0["loader"]
