"""Config validation: every malformed config is one line naming FILE:LINE and the key path, exit 2, no run dir."""

from __future__ import annotations

import json

import pytest

from conftest import gradlab_cli
from gradlab.config import ConfigError, Experiment, from_dict, json_schema, load_config, parse_override

# (yaml text, expected key path in the message, expected line or None, extra text expected)
MALFORMED = [
    ("trian:\n  epochs: 3\n", "trian", 1, "did you mean train"),
    ("train:\n  learnig_rate: 0.1\n", "train.learnig_rate", 2, "did you mean learning_rate"),
    ("train:\n  epochs: ten\n", "train.epochs", 2, "expected an integer"),
    ("train:\n  learning_rate: -1\n", "train.learning_rate", 2, "must be > 0"),
    ("train:\n  loss: xent\n", "train.loss", 2, "cross_entropy, mse"),
    ("train:\n  loss: cross_entropi\n", "train.loss", 2, "did you mean cross_entropy"),
    ("data:\n  name: mnist\n", "data.name", 2, "synthetic"),
    ("data:\n  name: iris\n  batch_size: 0\n", "data.batch_size", 3, ">= 1"),
    ("data:\n  validation_split: 1.5\n", "data.validation_split", 2, "<= 0.9"),
    ("data:\n  shuffle: maybe\n", "data.shuffle", 2, "true or false"),
    ("model:\n  kind: mlp\n", "model.hidden", None, "required when model.kind is mlp"),
    ("model:\n  kind: softmax_linear\n  hidden: [8]\n", "model.hidden", 3, "only used when model.kind is mlp"),
    ("model:\n  kind: mlp\n  hidden: [8, 0]\n", "model.hidden", 3, ">= 1"),
    ("model:\n  kind: mlp\n  hidden: [8]\n  activation: swish\n", "model.activation", 4, "leaky_relu"),
    ("model:\n  kernel_initializer:\n    name: random_normal\n    stdev: 2\n", "model.kernel_initializer.stdev", 4,
     "did you mean stddev"),
    ("model:\n  bias_initializer: zeroes\n", "model.bias_initializer", 2, "did you mean zeros"),
    ("model:\n  kernel_initializer:\n    name: variance_scaling\n    mode: bogus\n",
     "model.kernel_initializer.mode", 4, "'bogus' is not one of fan_in, fan_out, fan_avg"),
    ("model:\n  kernel_initializer:\n    name: variance_scaling\n    scale: -1\n",
     "model.kernel_initializer.scale", 4, "must be > 0"),
    ("model:\n  kernel_initializer:\n    name: random_uniform\n    minval: 1\n    maxval: 0\n",
     "model.kernel_initializer", 2, "minval < maxval"),
    ("model:\n  bias_initializer: orthogonal\n", "model.bias_initializer", 2, "a bias is a vector"),
    ("model:\n  kernel_initializer:\n    name: [1]\n", "model.kernel_initializer", 2, "[1] is not one of"),
    ("diagnostics:\n  - type: ':Foo'\n", "diagnostics.0.type", 2, "expected 'package.module:Name'"),
    ("diagnostics:\n  - type: '..x:Y'\n", "diagnostics.0.type", 2, "expected 'package.module:Name'"),
    ("data:\n  name: csv\n", "data.path", None, "required when data.name is csv"),
    ("data:\n  name: iris\n  samples: 10\n", "data.samples", 3, "only used when data.name is synthetic"),
    ("train:\n  device: tpu\n", "train.device", 2, "auto, cpu, gpu"),
    ("train:\n  precision: float16\n", "train.precision", 2, "mixed_float16"),
    ("train:\n  steps_per_execution: 0\n", "train.steps_per_execution", 2, ">= 1"),
    ("data:\n  header: yes\n", "data.header", 2, "true (YAML reads yes/no/on/off as a boolean) is not one of"),
    ("train:\n  optimizer: adam\n  momentum: 0.5\n", "train.momentum", 3, "only used when train.optimizer is momentum"),
    ("seed: -1\n", "seed", 1, "integer"),
    ("name: a b\n", "name", 1, "directory name"),
    ("train:\n  epochs: 2\n  epochs: 3\n", "train.epochs", 3, "duplicate key"),
    ("data: [1, 2]\n", "data", 1, "expected a mapping"),
    ("diagnostics:\n  - type: gradient_stats\n    every: 0\n", "diagnostics.0.every", 3, "positive integer"),
    ("diagnostics:\n  - type: gradient_stat\n", "diagnostics.0.type", 2, "did you mean gradient_stats"),
    ("diagnostics:\n  - type: gradient_stats\n    evry: 5\n", "diagnostics.0.evry", 3, "did you mean every"),
    ("callbacks:\n  - class: no_such_module_xyz:Thing\n", "callbacks.0.class", 2, "cannot import"),
]


@pytest.mark.parametrize("text,path,line,extra", MALFORMED, ids=[m[1] + f"#{i}" for i, m in enumerate(MALFORMED)])
def test_malformed_config_via_cli(tmp_path, text, path, line, extra):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    proc = gradlab_cli("run", str(cfg), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    matching = [ln for ln in lines if f": {path}: " in ln]
    assert matching, proc.stderr
    message = matching[0]
    prefix = f"{cfg}:{line}: " if line else f"{cfg}"
    assert message.startswith(prefix), message
    assert extra in message, message
    assert not (tmp_path / "runs").exists(), "a run directory was left behind"
    assert len(lines) == 1, f"expected exactly one error line, got: {lines}"


def test_yaml_syntax_error_names_the_line(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("train:\n  epochs: [1, 2\n  loss: mse\n")
    proc = gradlab_cli("validate", str(cfg))
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"{cfg}:") and "YAML syntax error" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("text,kind", [("name = x\ntrain.epochs = 2\n", "string"), ("- 1\n", "list")])
@pytest.mark.parametrize("overrides", [[], ["train.epochs=1"]])
def test_a_config_that_is_not_a_mapping_is_rejected(tmp_path, text, kind, overrides):
    cfg = tmp_path / "x.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(cfg, overrides)
    assert str(err.value) == f"{cfg}:1: expected a mapping of sections at the top level, got {kind}"


def test_exponent_numbers_without_a_dot_are_numbers_everywhere(tmp_path):
    """YAML 1.1 (PyYAML) reads `1e-6` as a string; users copy the README's `1e-6` defaults, so
    configs read it as the number, in diagnostics options as in train, overrides and sweeps."""
    cfg = tmp_path / "x.yaml"
    cfg.write_text("train: {learning_rate: 1e-2}\n"
                   "diagnostics:\n  - {type: health, vanishing_norm: 1e-7, converged_loss: 2E-3}\n"
                   "  - {type: gradient_stats, every: 10}\n")
    exp = load_config(cfg, ["diagnostics.0.vanishing_ratio=5e-4"])
    health = exp.diagnostics[0].options
    assert exp.train.learning_rate == 0.01
    assert health == {"vanishing_norm": 1e-7, "converged_loss": 0.002, "vanishing_ratio": 5e-4}
    assert all(type(v) is float for v in health.values())
    proc = gradlab_cli("validate", str(cfg))
    assert proc.returncode == 0, proc.stderr


def test_a_string_that_looks_like_a_number_survives_the_saved_config(tmp_path):
    """A run's config.yaml must read back as it was (--resume reads it): a quoted '1e3' stays a
    string through gradlab's dumper and loader, and numbers stay numbers."""
    from gradlab.config import dump_yaml

    src = tmp_path / "x.yaml"
    src.write_text("name: '1e3'\ntrain: {learning_rate: 2.5e-3}\n")
    exp = load_config(src)
    saved = tmp_path / "config.yaml"
    saved.write_text(dump_yaml(exp.to_dict(), sort_keys=False))
    again = load_config(saved)
    assert again.name == "1e3" and again.train.learning_rate == 0.0025
    assert again.to_dict() == exp.to_dict()


@pytest.mark.parametrize("distribute", ["mirrored", "multi_worker"])
def test_xla_with_a_distribution_strategy_is_refused(distribute):
    # Keras compiles the whole strategy.run; the replicas' gathers have no static shape
    with pytest.raises(ConfigError, match=rf"train.jit_compile: XLA cannot compile gradlab's step under "
                                          rf"train.distribute: {distribute}"):
        load_config("configs/default.yaml", ["train.jit_compile=true", f"train.distribute={distribute}"])
    assert load_config("configs/default.yaml", ["train.jit_compile=true"]).train.jit_compile


def test_every_problem_is_reported_at_once_also_those_the_plugins_judge(tmp_path):
    """A schema problem no longer hides the diagnostics' and callbacks' problems, and a diagnostic
    with several bad options names each of them (its constructor stops at the first)."""
    cfg = tmp_path / "x.yaml"
    cfg.write_text("train: {epochs: 0}\n"
                   "diagnostics:\n"
                   "  - {type: health, dead_fraction: 5, saturated_fraction: 7, converged_loss: 1e-3}\n"
                   "callbacks:\n"
                   "  - {class: 'no_such_module_here:Y'}\n")
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    paths = [p[2] for p in err.value.problems]
    assert paths == ["train.epochs", "diagnostics.0.dead_fraction", "diagnostics.0.saturated_fraction",
                     "callbacks.0.class"], str(err.value)
    assert [p[1] for p in err.value.problems] == [1, 3, 3, 5]


def test_a_config_that_is_no_text_file_says_what_it_is(tmp_path):
    binary = tmp_path / "model.h5"
    binary.write_bytes(b"\x89HDF\r\n\x1a\n\xff\xfe")
    for path, why in ((tmp_path, "it is a directory, not a YAML file"),
                      (binary, "not UTF-8 text: byte 0 is not valid UTF-8")):
        with pytest.raises(ConfigError) as err:
            load_config(path)
        assert str(err.value) == f"{path}: cannot read config ({why})"


def test_unsafe_yaml_tags_are_rejected(tmp_path):
    cfg = tmp_path / "evil.yaml"
    cfg.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    assert "YAML" in str(err.value)


def test_override_errors_name_the_command_line(tmp_path):
    proc = gradlab_cli("run", "configs/default.yaml", "train.epochs=abc", cwd=None)
    assert proc.returncode == 2
    assert proc.stderr.startswith("command line: train.epochs: expected an integer"), proc.stderr
    proc = gradlab_cli("validate", "configs/default.yaml", "train.learnig_rate=0.1")
    assert proc.returncode == 2 and "did you mean learning_rate" in proc.stderr
    proc = gradlab_cli("validate", "configs/default.yaml", "nonsense")
    assert proc.returncode == 2 and "key.path=value" in proc.stderr


def test_missing_config_file(tmp_path):
    proc = gradlab_cli("run", str(tmp_path / "nope.yaml"), cwd=tmp_path)
    assert proc.returncode == 2 and "config file not found" in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_several_problems_are_all_reported(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("train:\n  epochs: 0\n  loss: nope\ndata:\n  batch_size: -3\n")
    proc = gradlab_cli("validate", str(cfg))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 3
    assert {ln.split(": ")[1] for ln in lines} == {"train.epochs", "train.loss", "data.batch_size"}


def test_overrides_are_typed_by_the_schema():
    exp = load_config("configs/default.yaml", ["train.learning_rate=1e-3", "model.kind=mlp", "model.hidden=16,8",
                                               "data.shuffle=false", "train.epochs=3", "name=other"])
    assert exp.train.learning_rate == pytest.approx(1e-3)
    assert exp.model.hidden == [16, 8] and exp.data.shuffle is False and exp.train.epochs == 3
    assert exp.name == "other"
    assert parse_override("model.hidden=[4, 5]") == (("model", "hidden"), [4, 5])


def test_yaml_scientific_notation_is_a_number():
    exp = from_dict({"train": {"learning_rate": "1e-3"}})
    assert exp.train.learning_rate == pytest.approx(1e-3)


def test_defaults_are_the_seed_classifier():
    exp = from_dict({})
    assert isinstance(exp, Experiment)
    assert exp.model.kind == "softmax_linear" and exp.train.loss == "cross_entropy"
    assert exp.train.reduction == "mean" and exp.diagnostics is None and exp.callbacks == ()
    assert from_dict({"diagnostics": []}).diagnostics == ()


def test_experiment_is_frozen():
    exp = from_dict({})
    with pytest.raises(Exception):
        exp.train.epochs = 3  # type: ignore[misc]


def test_resolved_config_round_trips():
    exp = load_config("configs/default.yaml")
    again = from_dict(exp.to_dict())
    assert again.to_dict() == exp.to_dict()


def test_schema_command_prints_json_schema_covering_every_key():
    proc = gradlab_cli("schema")
    assert proc.returncode == 0
    schema = json.loads(proc.stdout)
    assert schema == json.loads(json.dumps(json_schema(), default=str))
    props = schema["properties"]
    assert set(props["train"]["properties"]) >= {"loss", "reduction", "optimizer", "learning_rate", "epochs", "device",
                                                 "jit_compile", "steps_per_execution", "precision"}
    assert set(props["data"]["properties"]) >= {"name", "batch_size", "shuffle", "validation_split"}
    assert set(props["model"]["properties"]) >= {"kind", "hidden", "activation", "kernel_initializer",
                                                 "bias_initializer"}
    assert props["train"]["properties"]["loss"]["enum"] == ["cross_entropy", "mse"]
    assert props["train"]["additionalProperties"] is False


def test_validate_ok():
    proc = gradlab_cli("validate", "configs/default.yaml")
    assert proc.returncode == 0, proc.stderr
    assert "ok" in proc.stdout


def test_a_home_directory_tilde_is_expanded_as_in_a_shell(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    exp = load_config({"log_dir": "~/runs", "data": {"name": "csv", "path": "~/d.csv"}}, check_plugins=False)
    assert exp.log_dir == str(tmp_path / "runs") and exp.data.path == str(tmp_path / "d.csv")



def test_validate_reads_overrides_like_run_also_with_a_sweep_section(tmp_path):
    cfg = tmp_path / "s.yaml"
    cfg.write_text("model: {kind: mlp, hidden: [4]}\nsweep: {train.loss: [cross_entropy, mse]}\n")
    proc = gradlab_cli("validate", str(cfg), "model.hidden=8,4", "diagnostics=gradient_stats,health")
    assert proc.returncode == 0, proc.stderr
    assert "sweep: 2 combinations ok" in proc.stdout


def test_variance_scaling_distribution_is_case_insensitive_as_in_keras():
    exp = load_config({"model": {"kernel_initializer": {"name": "variance_scaling", "distribution": "Uniform"}}},
                      check_plugins=False)
    assert exp.model.kernel_initializer["distribution"] == "Uniform"


@pytest.mark.parametrize("override,expected", [
    ("trian.epochs=1", "command line: trian: unknown key"),
    ("diagnostics.0.every=0", "command line: diagnostics.0.every: `every` (0) must be a positive integer"),
])
def test_problems_made_by_an_override_name_the_command_line(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config("configs/demo_relu_dead.yaml", [override])
    assert str(err.value).startswith(expected) and f"[from {override}]" in str(err.value)


@pytest.mark.parametrize("section,value,expected", [
    ({"train": {"epochs": "1e3"}}, None, "train.epochs: expected an integer, got string '1e3' (write 1000)"),
    ({"train": {"epochs": True}}, None, "train.epochs: expected an integer, got boolean true"),
    ({"data": {"shuffle": None}}, None, "data.shuffle: expected true or false, got null"),
])
def test_values_are_shown_as_yaml_spells_them(section, value, expected):
    with pytest.raises(ConfigError) as err:
        load_config(section, check_plugins=False)
    assert str(err.value) == f"<dict>: {expected}"


def test_schema_bounds_of_top_level_keys_are_the_validators():
    """An editor using `gradlab schema` must not accept a seed or name the CLI refuses."""
    from gradlab.config import NAME_MAX

    props = json_schema()["properties"]
    assert props["seed"]["maximum"] == 2**31 - 1 and props["name"]["maxLength"] == NAME_MAX
    load_config({"seed": 2**31 - 1, "name": "n" * NAME_MAX}, check_plugins=False)
    for bad in ({"seed": 2**31}, {"name": "n" * (NAME_MAX + 1)}):
        with pytest.raises(ConfigError):
            load_config(bad, check_plugins=False)
