"""Typed configs: one-line errors with suggestions, overrides, help lines, and every shipped config parses."""

from pathlib import Path

import pytest
import yaml

from reasonlab.config import ConfigError, check_help_lines, load_config, parse_overrides, to_yaml
from reasonlab.methods import METHODS, available, get_method

from conftest import ROOT, cli


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


def test_unknown_key_names_key_file_and_closest(tmp_path):
    p = write(tmp_path, "method: sft\ntrain:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "\n" not in msg
    assert "train.lrr" in msg and str(p) in msg and "did you mean 'train.lr'" in msg


def test_key_in_the_wrong_section_suggests_the_right_one(tmp_path):
    p = write(tmp_path, "method: sft\neval:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown key 'eval.lr' \(did you mean 'train.lr'\?\)"):
        load_config(p)


def test_wrong_type_is_one_line(tmp_path):
    p = write(tmp_path, "method: sft\ntrain:\n  steps: many\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value) == f"{p}: 'train.steps' must be an integer, got str 'many'"


def test_overrides_are_typed_and_checked(tmp_path):
    p = write(tmp_path, "method: sft\n")
    cfg = load_config(p, ["train.lr=1e-5", "model.lora.r=16", "data.task_args={n_terms: 3}", "eval.every=5"])
    assert cfg.train.lr == 1e-5 and isinstance(cfg.train.lr, float)  # YAML 1.1 reads 1e-5 as a string
    assert cfg.model.lora.r == 16 and cfg.data.task_args == {"n_terms": 3} and cfg.eval.every == 5
    with pytest.raises(ConfigError, match=r"unknown key 'model.lora.rank' \(did you mean 'model.lora.r'\?\)"):
        load_config(p, ["model.lora.rank=4"])
    with pytest.raises(ConfigError, match="not key=value"):
        parse_overrides(["train.lr"])


def test_unknown_method_and_missing_method(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'sft'"):
        load_config(write(tmp_path, "method: sfft\n"))
    with pytest.raises(ConfigError, match="no 'method:' key"):
        load_config(write(tmp_path, "seed: 1\n"))


def test_post_init_validation_becomes_config_error(tmp_path):
    with pytest.raises(ConfigError, match="train.batch_size must be >= 1"):
        load_config(write(tmp_path, "method: sft\ntrain: {batch_size: 0}\n"))


def test_every_method_field_has_a_help_line_and_shared_keys():
    for name in available():
        cls = get_method(name).Config
        assert check_help_lines(cls) == [], name
        cfg = cls()
        assert hasattr(cfg, "seed") and hasattr(cfg.train, "steps") and hasattr(cfg.train, "lr")
        assert hasattr(cfg.eval, "every")


def test_every_shipped_config_parses_and_round_trips(tmp_path):
    configs = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if p.parent.name != "accelerate")
    assert configs, "no configs shipped"
    for path in configs:
        header = path.read_text().splitlines()[0]
        assert header.startswith("# reasonlab run") or header.startswith("# "), f"{path}: header must give the command"
        cfg = load_config(path)
        assert cfg.method in METHODS
        again = load_config(write(tmp_path, to_yaml(cfg)))
        assert yaml.safe_load(to_yaml(again)) == yaml.safe_load(to_yaml(cfg)), path


def test_cli_prints_one_line_and_exits_2(tmp_path):
    p = write(tmp_path, "method: sft\ntrain:\n  lrr: 0.1\n")
    out = tmp_path / "runs"
    r = cli("run", str(p), "--out", str(out), check=False)
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "did you mean 'train.lr'" in lines[0], r.stderr
    assert not out.exists()  # nothing half-written


def test_print_config_shows_help_lines(tiny_cfg):
    r = cli("run", str(tiny_cfg), "train.steps=3", "--print-config")
    assert "steps: 3  # optimizer steps to train" in r.stdout
    assert "lora:" in r.stdout


def test_accelerate_configs_are_launch_files_with_their_command():
    """configs/accelerate/*.yaml are `accelerate launch --config_file` files, not recipe configs: data parallel on one
    machine, the recipe's train.precision in charge (mixed_precision 'no' here)."""
    files = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))
    assert files
    for path in files:
        text = path.read_text()
        assert text.startswith("# accelerate launch --config_file configs/accelerate/")
        cfg = yaml.safe_load(text)
        assert cfg["distributed_type"] == "MULTI_GPU" and cfg["mixed_precision"] == "no" and cfg["num_machines"] == 1


def test_schedule_typo_fails_in_one_line_with_a_suggestion(tmp_path):
    p = cli("run", "configs/sft/arithmetic-tiny.yaml", "train.schedule=cosin", "--out", str(tmp_path), check=False)
    err = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2 and len(err) == 1, p.stderr
    assert "train.schedule" in err[0] and "did you mean 'cosine'" in err[0]
    assert not any(tmp_path.iterdir())  # nothing half-written
    for bad, hint in (("train.device=cdua", "cuda"), ("train.precision=bf61", "bf16")):
        with pytest.raises(ConfigError, match=f"did you mean '{hint}'"):
            load_config(ROOT / "configs" / "sft" / "arithmetic-tiny.yaml", [bad])
