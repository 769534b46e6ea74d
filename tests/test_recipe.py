"""Recipe validation: the demo and GPU recipes load; every kind of bad recipe names its key, exit status 2."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mlc.cli import main
from mlc.errors import RecipeError
from mlc.recipe import load_recipe, parse_recipe

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "recipes" / "demo.yaml"


def demo_dict() -> dict:
    return yaml.safe_load(DEMO.read_text())


def bad(tmp_path, mutate, key_fragment, message_fragment=""):
    data = demo_dict()
    mutate(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    text = str(err.value)
    assert str(path) in text
    assert key_fragment in text, text
    assert message_fragment in text, text
    return text


def test_demo_recipe_is_valid():
    r = load_recipe(DEMO)
    assert r.name == "demo" and r.language == "swa"
    assert r.student.layer_indices(12) == [0, 2, 4, 6, 8, 10]
    assert r.out == Path("runs/demo")
    assert Path(r.corpus.sources[0].path).is_file()  # ${MLC_DATA} expanded
    assert r.distill.step1.losses.active().keys() == {"hidden_mse", "attention"}


def test_unknown_key(tmp_path):
    bad(tmp_path, lambda d: d["distill"]["step1"].update(lrr=1.0), "distill.step1.lrr", "unknown key")


def test_unknown_loss(tmp_path):
    bad(tmp_path, lambda d: d["distill"]["step1"]["losses"].update(contrastive={"weight": 1.0}),
        "distill.step1.losses.contrastive", "unknown key")


def test_wrong_type_is_not_coerced(tmp_path):
    bad(tmp_path, lambda d: d["distill"]["step1"].update(steps="60"), "distill.step1.steps", "integer")


def test_missing_required_key(tmp_path):
    bad(tmp_path, lambda d: d["teacher"].pop("source"), "teacher.source", "missing")


def test_hidden_not_divisible_by_heads(tmp_path):
    bad(tmp_path, lambda d: d["prune"].update(hidden_size=250, heads=8), "prune.hidden_size", "not divisible")


def test_prune_target_larger_than_teacher(tmp_path):
    bad(tmp_path, lambda d: d["prune"].update(ffn_dim=4096), "prune.ffn_dim", "larger")


def test_kept_layer_the_teacher_lacks(tmp_path):
    bad(tmp_path, lambda d: d["student"].update(layers=[0, 5, 12]), "student.layers", "not 12")


def test_bad_layer_spec_string(tmp_path):
    bad(tmp_path, lambda d: d["student"].update(layers="middle:3"), "student.layers")


def test_layer_map_out_of_range(tmp_path):
    bad(tmp_path, lambda d: d["distill"]["step1"]["losses"]["hidden_mse"].update(layer_map={7: 12}),
        "distill.step1.losses.hidden_mse.layer_map", "out of range")


def test_missing_corpus_file(tmp_path):
    bad(tmp_path, lambda d: d["corpus"]["sources"][0].update(path="/nonexistent/news.txt"),
        "corpus.sources[0].path", "not found")


def test_missing_teacher_folder(tmp_path):
    bad(tmp_path, lambda d: d["teacher"].update(source=str(tmp_path / "nope")), "teacher.source", "does not exist")


def test_missing_deepspeed_config(tmp_path):
    bad(tmp_path, lambda d: d["distill"]["step1"].update(deepspeed="zero9"), "distill.step1.deepspeed", "zero9")


def test_missing_data_dir(tmp_path):
    bad(tmp_path, lambda d: d["evaluate"].update(data_dir=str(tmp_path / "none")), "evaluate.data_dir")


def test_unset_environment_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("MLC_NO_SUCH_VAR", raising=False)
    bad(tmp_path, lambda d: d["corpus"]["sources"][0].update(path="${MLC_NO_SUCH_VAR}/x.txt"),
        "corpus.sources[0].path", "MLC_NO_SUCH_VAR")


def test_two_vocab_rules_conflict(tmp_path):
    bad(tmp_path, lambda d: d["vocab"].update(top_n=1000, coverage=0.99), "vocab", "at most one")


def test_no_positive_loss(tmp_path):
    def zero(d):
        for loss in d["distill"]["step1"]["losses"].values():
            loss["weight"] = 0.0
    bad(tmp_path, zero, "distill.step1.losses", "positive weight")


def test_duplicate_yaml_key_names_line(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text(DEMO.read_text() + "\nseed: 3\n")
    with pytest.raises(RecipeError, match=r"dup.yaml:\d+.*duplicate key 'seed'"):
        load_recipe(path)


def test_invalid_yaml_names_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nteacher: [unclosed\n")
    with pytest.raises(RecipeError, match=r"broken.yaml:\d+: invalid YAML"):
        load_recipe(path)


def test_hf_teacher_folder_shape_checks(tmp_path, tiny_bert_dir):
    data = demo_dict()
    data["teacher"]["source"] = str(tiny_bert_dir)  # 4 layers, hidden 32, 4 heads, FFN 64
    data["prune"].update(ffn_dim=32, heads=2, hidden_size=16)
    data["student"]["layers"] = "first:2"
    data["shards"]["seq_len"] = 64
    data["evaluate"]["max_length"] = 64
    r = parse_recipe(copy.deepcopy(data), "inline")
    assert r.student.layer_indices(4) == [0, 1]
    data["prune"]["heads"] = 8
    with pytest.raises(RecipeError, match="prune.heads"):
        parse_recipe(data, "inline")


def test_cli_exits_2_and_writes_nothing(tmp_path):
    data = demo_dict()
    data["output_dir"] = str(tmp_path / "run")
    data["distill"]["step1"]["lr"] = "fast"
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    proc = subprocess.run([sys.executable, "-m", "mlc.cli", "validate", str(path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "distill.step1.lr" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_cli_validate_ok(capsys):
    assert main(["validate", str(DEMO)]) == 0
    assert "valid recipe 'demo'" in capsys.readouterr().out


def test_cli_validate_reads_the_deepspeed_json_as_the_launch_will(tmp_path, capsys):
    """mlc validate only checked that the JSON file exists: an optimizer it cannot honour passed."""
    ds = tmp_path / "ds.json"
    data = demo_dict()
    data["output_dir"] = str(tmp_path / "run")
    data["distill"]["step2"]["deepspeed"] = str(ds)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, "optimizer": {"type": "Lamb"}}))
    assert main(["validate", str(path)]) == 2
    assert f"{ds}: optimizer.type" in capsys.readouterr().err
    batch = data["distill"]["step2"]["batch_size"]
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_batch_size": 2 * batch,
                              "optimizer": {"type": "AdamW", "params": {"lr": "auto"}}}))
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"note: distill.step2: ds.json: train_batch_size is {2 * batch} in the JSON" in out
    assert main(["validate", str(path), "--world-size", "2"]) == 0  # as 2 ranks will read it: no note
    assert "note:" not in capsys.readouterr().out


@pytest.mark.parametrize("command", [[], ["validate"], ["inspect"], ["teacher"], ["teacher", "import"], ["compress"],
                                     ["trim"], ["data"], ["data", "prepare"], ["distill"], ["prune"], ["size"],
                                     ["evaluate"], ["bench"]])
def test_every_subcommand_has_help(command):
    proc = subprocess.run([sys.executable, "-m", "mlc.cli", *command, "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    assert "usage: mlc" in proc.stdout


# the shapes of the GPU recipes' Hub teachers (config.json only: enough for validation, offline)
GPU_TEACHERS = {
    "FacebookAI/xlm-roberta-base": dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12,
                                    intermediate_size=3072, vocab_size=250002, max_position_embeddings=514),
    "Davlan/afro-xlmr-large": dict(num_hidden_layers=24, hidden_size=1024, num_attention_heads=16,
                                   intermediate_size=4096, vocab_size=250002, max_position_embeddings=514),
}


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "recipes").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_recipe_in_configs_validates(path, tmp_path):
    data = yaml.safe_load(path.read_text())
    source = data["teacher"]["source"]
    if source in GPU_TEACHERS:  # cannot run here: validate against a config-only folder of the same shape
        folder = tmp_path / "teacher"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"model_type": "xlm-roberta", **GPU_TEACHERS[source]}))
        data["teacher"]["source"] = str(folder)
    r = parse_recipe(data, str(path))
    assert r.name == path.stem
    assert r.distill.step1.losses.active()


def test_gpu_recipe_shape_error_is_caught(tmp_path):
    data = yaml.safe_load((ROOT / "configs/recipes/afroxlmr-comet.yaml").read_text())
    folder = tmp_path / "teacher"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "xlm-roberta",
                                                    **GPU_TEACHERS["Davlan/afro-xlmr-large"]}))
    data["teacher"]["source"] = str(folder)
    data["student"]["layers"] = [3, 7, 11, 15, 19, 24]
    with pytest.raises(RecipeError, match="student.layers.*not 24"):
        parse_recipe(data, "comet")


def test_deepspeed_configs_are_json():
    for path in (ROOT / "configs" / "deepspeed").glob("*.json"):
        assert "zero_optimization" in json.loads(path.read_text())


# --- issue 18: numbers that are not finite, YAML aliases, non-UTF-8 files, ${VAR} in output_dir ----------

@pytest.mark.parametrize("mutate,key", [
    (lambda d: d["distill"]["step1"].update(lr=float("inf")), "distill.step1.lr"),
    (lambda d: d["distill"]["step1"]["losses"]["hidden_mse"].update(weight=float("inf")),
     "distill.step1.losses.hidden_mse.weight"),
    (lambda d: d.update(loader={"mlm_probability": float("nan")}), "loader.mlm_probability"),
    (lambda d: d["distill"]["step1"].update(clip_grad=float("-inf")), "distill.step1.clip_grad"),
], ids=["lr-inf", "loss-weight-inf", "nan", "minus-inf"])
def test_infinite_and_nan_numbers_are_refused(tmp_path, mutate, key):
    bad(tmp_path, mutate, key, "finite")


def test_cli_refuses_lr_inf_with_exit_2(tmp_path, capsys):
    path = tmp_path / "inf.yaml"
    path.write_text(DEMO.read_text().replace("lr: ", "lr: .inf #", 1))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: distill." in err and "finite" in err, err


def test_yaml_alias_bomb_is_refused_quickly(tmp_path):
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, 10):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(RecipeError, match=r"bomb.yaml:6: invalid YAML: the alias \*a4 expands the recipe past "
                                          r"100,000 values"):
        load_recipe(path)


def test_recursive_yaml_alias_is_refused(tmp_path):
    path = tmp_path / "loop.yaml"
    path.write_text("name: demo\nseed: &s [1, *s]\n")
    with pytest.raises(RecipeError, match=r"loop.yaml:2: invalid YAML: the alias \*s refers to itself"):
        load_recipe(path)


def test_ordinary_yaml_aliases_still_load(tmp_path):
    data = demo_dict()
    data["distill"]["step2"]["losses"] = data["distill"]["step1"]["losses"]  # safe_dump writes an alias
    path = tmp_path / "alias.yaml"
    path.write_text(yaml.safe_dump(data))
    assert "*id" in path.read_text()
    r = load_recipe(path)
    assert r.distill.step2.losses == r.distill.step1.losses


def test_yaml_merge_keys_load_and_keys_beside_them_override(tmp_path):
    """Fault probe rerun: `<<: *step1` was refused ("could not determine a constructor for the tag ...merge")
    by the duplicate-key check; the keys written beside a merge override the merged ones."""
    text = yaml.safe_dump(demo_dict(), sort_keys=False).replace("  step1:\n", "  step1: &s1\n", 1)
    text = text.replace("  step2:\n", "  step2:\n    <<: *s1\n", 1)
    path = tmp_path / "merge.yaml"
    path.write_text(text)
    r = load_recipe(path)
    demo = load_recipe(DEMO)
    assert r.distill.step2.lr == demo.distill.step2.lr and r.distill.step2.steps == demo.distill.step2.steps
    assert r.distill.step2.precision == demo.distill.step1.precision  # merged from step1 unless given
    path.write_text(text.replace("    <<: *s1\n", "    <<: *s1\n    seed: 1\n    seed: 2\n", 1))
    with pytest.raises(RecipeError, match="duplicate key 'seed'"):
        load_recipe(path)


def test_unhashable_yaml_key_and_deep_nesting_are_errors_naming_the_line(tmp_path):
    """Fault probe rerun: a list as a mapping key gave a TypeError traceback, `[[[[...]]]]` 5000 deep a
    RecursionError; both are now `invalid YAML` errors naming the file and line."""
    text = yaml.safe_dump(demo_dict(), sort_keys=False)
    lines = text.count("\n")
    path = tmp_path / "r.yaml"
    path.write_text(text + "? [a, b]\n: 1\n")
    with pytest.raises(RecipeError, match=rf"r.yaml:{lines + 1}: invalid YAML: a key must be a plain value, not a list"):
        load_recipe(path)
    path.write_text(text + "x: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(RecipeError, match=rf"r.yaml:{lines + 1}: invalid YAML: the values are nested more than 100"):
        load_recipe(path)


def test_non_utf8_recipe_names_file_and_byte_offset(tmp_path, capsys):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"name: demo\nlanguage: swa # caf\xe9\n")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:2: not UTF-8 text: byte offset 30" in err and "Traceback" not in err, err


def test_output_dir_expands_variables(tmp_path, monkeypatch):
    monkeypatch.setenv("MLC_TEST_RUNS", str(tmp_path / "runs"))
    data = demo_dict()
    data["output_dir"] = "${MLC_TEST_RUNS}/demo"
    r = parse_recipe(data, "inline")
    assert r.out == tmp_path / "runs" / "demo"


def test_output_dir_unset_variable_names_the_key(tmp_path, monkeypatch):
    monkeypatch.delenv("MLC_NO_SUCH_VAR", raising=False)
    bad(tmp_path, lambda d: d.update(output_dir="${MLC_NO_SUCH_VAR}/run"), "output_dir", "MLC_NO_SUCH_VAR")


def test_evaluation_keys_must_belong_to_the_chosen_protocol(tmp_path):
    bad(tmp_path, lambda d: d["evaluate"].update(mode="frozen"), "evaluate.mode", "replaced by 'probe'")
    bad(tmp_path, lambda d: d["evaluate"].update(epochs=3), "evaluate", "epochs: not used by mode: probe")
    bad(tmp_path, lambda d: d["evaluate"].update(mode="full", layers="mean"), "evaluate",
        "layers: not used by mode: full")
    bad(tmp_path, lambda d: d["evaluate"].update(mode="frozen"), "evaluate.mode", "replaced by 'probe'")
    bad(tmp_path, lambda d: d["evaluate"].update(c_grid=[1.0, -1.0]), "evaluate.c_grid", "positive")
    data = demo_dict()
    data["evaluate"].pop("layers", None)
    data["evaluate"].update(mode="full", epochs=3, seeds=[1, 2])
    r = parse_recipe(data, "inline")
    assert r.evaluate.mode == "full" and r.evaluate.epochs == 3


# --- issue 18, finding 11: values that used to pass validation and end in a traceback --------------------

@pytest.mark.parametrize("where", ["recipe", "source"])
def test_language_must_be_a_plain_code(tmp_path, where):
    def mutate(d):
        if where == "recipe":
            d["language"] = "x/../.."
        else:
            d["corpus"]["sources"][0]["language"] = "../etc"
    key = "language" if where == "recipe" else "corpus.sources[0].language"
    bad(tmp_path, mutate, key, "pattern")


def test_language_tags_with_script_or_region_still_load():
    for code in ("swa", "swa_Latn", "pt-BR"):
        data = demo_dict()
        data["language"] = code
        assert parse_recipe(data, "inline").language == code


@pytest.mark.parametrize("seed", [2 ** 63, 2 ** 64 + 5, -1])
def test_seed_out_of_range_is_refused(tmp_path, seed, capsys):
    data = demo_dict()
    data["seed"] = seed
    path = tmp_path / "seed.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: seed:" in err and "Traceback" not in err, err


def test_evaluation_seed_out_of_range_is_refused(tmp_path):
    bad(tmp_path, lambda d: (d["evaluate"].pop("layers", None), d["evaluate"].update(mode="full", seeds=[1, 2 ** 63])),
        "evaluate.seeds",
        "seed 9223372036854775808 (item 1) is not in 0 .. 2^63 - 1")


def test_logit_mse_with_a_temperature_is_refused_by_validate(tmp_path, capsys):
    data = demo_dict()
    data["distill"]["step1"]["losses"]["logits"] = {"weight": 1.0, "kind": "mse", "temperature": 2}
    path = tmp_path / "mse.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: distill.step1.losses.logits:" in err and "temperature" in err and "kl" in err, err
    data["distill"]["step1"]["losses"]["logits"]["temperature"] = 1.0
    parse_recipe(data, "inline", check_files=False)  # mse at temperature 1 is fine


def test_logging_and_heldout_keys_are_checked(tmp_path, monkeypatch):
    bad(tmp_path, lambda d: d["distill"]["step1"].update(eval_batches=2), "distill.step1",
        "eval_batches: read only with eval_every")
    bad(tmp_path, lambda d: d.update(logging={"report_to": ["tensorboard"], "wandb": {"project": "x"}}),
        "logging", "wandb: set, but not in report_to")
    bad(tmp_path, lambda d: d.update(logging={"report_to": ["mlflow", "mlflow"]}), "logging.report_to",
        "names a tracker twice")
    bad(tmp_path, lambda d: d.update(logging={"report_to": ["neptune"]}), "logging.report_to")
    # a tracker that is not installed: the key and the command that installs it
    import mlc.recipe

    monkeypatch.setitem(mlc.recipe.TRACKER_PACKAGES, "wandb", ("mlc_no_such_module", "pip install 'mlc[wandb]'"))
    bad(tmp_path, lambda d: d.update(logging={"report_to": ["tensorboard", "wandb"]}), "logging.report_to",
        "wandb is not installed: pip install 'mlc[wandb]'")


def test_new_keys_at_their_default_leave_the_shipped_recipes_fingerprints_alone():
    """eval_every, eval_batches and logging were added after recipes were in use: a shipped recipe has the
    same stage fingerprints with them given at their defaults, and whatever its trackers; holding sequences
    out changes what step 1 trains on, so it changes step 1's fingerprint (and step 2's, which reads it)."""
    from mlc.pipeline.stage import fingerprint
    from mlc.pipeline.stages import STAGES

    def fingerprints(data):
        r = parse_recipe(data, "demo.yaml", check_files=False)
        out = {}
        for s in STAGES:
            if s.enabled(r):
                out[s.name] = fingerprint(s, r, out)
        return out

    base = fingerprints(demo_dict())
    explicit = demo_dict()
    for step in ("step1", "step2"):
        explicit["distill"][step].update(eval_every=None, eval_batches=4)  # as a dumped spec holds them
    explicit["adapt"] = {**explicit.get("adapt", {}), "eval_every": None}
    explicit["logging"] = {"report_to": ["tensorboard", "mlflow"], "mlflow": {"experiment": "x"}}
    assert fingerprints(explicit) == base
    assert "eval_" not in str(parse_recipe(explicit, "demo.yaml", check_files=False).distill.step1)
    held = demo_dict()
    held["distill"]["step1"].update(eval_every=10)
    other = fingerprints(held)
    assert other["step1"] != base["step1"] and other["step2"] != base["step2"]
    assert {k: v for k, v in other.items() if k not in ("step1", "step2", "evaluate")} == \
        {k: v for k, v in base.items() if k not in ("step1", "step2", "evaluate")}
