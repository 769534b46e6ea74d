"""scripts/ablate.py: the rows written from a recipe, and which of the reference's stages a row links."""
from __future__ import annotations

import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import ablate  # noqa: E402


def test_a_row_links_only_the_reference_stages_it_shares(tmp_path, data_dir, capsys):
    from mlc.layout import RunLayout
    from mlc.pipeline.run import plan
    from mlc.pipeline.stage import MARKER, mark_complete
    from mlc.recipe import load_recipe

    out = tmp_path / "abl"
    assert ablate.main(["write", str(ROOT / "configs" / "recipes" / "swahili-e5small.yaml"), "--out", str(out),
                        "--step2-steps", "20", "--combined", "tokens4x+seed2"]) == 0
    combined = yaml.safe_load((out / "tokens4x+seed2.yaml").read_text())
    assert combined["seed"] == 2 and combined["distill"]["step2"]["steps"] == 80
    assert combined["output_dir"] == str(out / "tokens4x+seed2") and "+" not in combined["name"]

    ref = load_recipe(out / "ref.yaml")
    layout = RunLayout.of(ref)
    for stage, fp, _ in plan(ref):  # the reference as if every stage had run
        folder = stage.path(layout)
        folder.mkdir(parents=True, exist_ok=True)
        mark_complete(folder, stage, fp, 0.0)

    shared = list(ablate.SHARED)
    assert ablate._reusable_stages(out / "dropout0.yaml", out / "ref.yaml") == shared  # a step-2 change
    assert ablate._reusable_stages(out / "tokens4x+seed2.yaml", out / "ref.yaml") == shared[:5]  # step 1 reruns
    assert ablate._reusable_stages(out / "layers-odd.yaml", out / "ref.yaml") == shared[:4]  # the student too
    (layout.shards / MARKER).unlink()  # an unfinished reference stage is not linked, nor anything after it
    assert ablate._reusable_stages(out / "dropout0.yaml", out / "ref.yaml") == shared[:3]
