"""Every recipe under 2 processes (gloo on the CPU, `accelerate launch --config_file configs/accelerate/ddp.yaml`)
trains exactly as 1 process on the same global batch: losses and final weights within 1e-5, the same evaluation
records (evaluation is split over the processes and gathered), and both ranks really ran (env.json world size 2,
summary.json ranks [0, 1]). Each recipe's tiny config also runs in bf16 on the CPU."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, cli, only_run_dir
from reasonlab.tracking import read_jsonl

pytestmark = pytest.mark.slow

# recipe -> (tiny config, overrides, final checkpoint, weights file). The bridge's batch-contrastive terms (infonce,
# separation) and DiT noise are per-process by design (see methods/bridge.py), so they are off here.
CASES = {
    "sft": ("configs/sft/arithmetic-tiny.yaml", [], "step_6", "module.model"),
    "markovian": ("configs/markovian/arithmetic-tiny.yaml", [], "step_2", "module.model"),
    "polychromic": ("configs/polychromic/countdown-tiny.yaml", ["reward.fn=tests/test_polychromic.py:digit_reward"],
                    "step_2", "module.model"),
    "bridge": ("configs/bridge/tiny.yaml", ["loss.infonce=0", "loss.separation=0", "loss.dit=0"], "step_2",
               "module.bridge"),
    "bridge-fusion": ("configs/bridge/tiny-fusion.yaml", ["loss.separation=0"], "step_2", "module.bridge"),
    "trm": ("configs/trm/sudoku4-tiny.yaml", [], "step_4", "module.model"),
}
TOL = 1e-5


def launch_two(config: str, out: Path, *overrides: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("accelerate")
    launcher = [str(exe)] if exe.exists() else [sys.executable, "-m", "accelerate.commands.launch"]
    cmd = [*launcher, "launch", "--config_file", "configs/accelerate/ddp.yaml", "--num_processes", "2",
           "-m", "reasonlab.cli", "run", config, "--out", str(out), "tracking.tensorboard=false", *overrides]
    # no visible GPU: the DDP launcher starts 2 CPU processes on gloo (as on a CPU-only CI machine)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert p.returncode == 0, f"{' '.join(cmd)} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r}


def test_config_world_size_check_fails_loudly_when_ranks_are_missing(tmp_path):
    """The check the tests rely on: a 1-process run says world size 1 (so a launcher that silently started one
    process cannot pass as two)."""
    cli("run", CASES["sft"][0], "--out", str(tmp_path), "tracking.tensorboard=false", "train.steps=1",
        env={"OMP_NUM_THREADS": "1"})
    run = only_run_dir(tmp_path)
    env = json.loads((run / "env.json").read_text())
    assert env["world_size"] == 1 and env["compute"]["world_size"] == 1 and env["compute"]["distributed"] == "none"
    assert json.loads((run / "summary.json").read_text())["results"]["ranks"] == [0]


@pytest.mark.parametrize("recipe", sorted(CASES))
def test_two_processes_equal_one(recipe, tmp_path):
    config, overrides, ckpt, weights = CASES[recipe]
    cli("run", config, "--out", str(tmp_path / "one"), "tracking.tensorboard=false", *overrides,
        env={"OMP_NUM_THREADS": "1"})
    launch_two(config, tmp_path / "two", *overrides)
    one, two = only_run_dir(tmp_path / "one"), only_run_dir(tmp_path / "two")  # rank 0 alone made the folder

    env = json.loads((two / "env.json").read_text())
    assert env["world_size"] == 2 and env["compute"]["world_size"] == 2, env
    assert env["compute"]["distributed"] == "ddp" and env["compute"]["backend"] == "gloo"
    assert json.loads((two / "summary.json").read_text())["results"]["ranks"] == [0, 1]  # both ranks finished

    l1, l2 = losses(one), losses(two)
    assert l1 and l1.keys() == l2.keys()
    for s in l1:
        assert abs(l1[s] - l2[s]) <= TOL, (s, l1[s], l2[s])
    a = load_file(str(one / "checkpoints" / ckpt / f"{weights}.safetensors"))
    b = load_file(str(two / "checkpoints" / ckpt / f"{weights}.safetensors"))
    assert a.keys() == b.keys() and a
    for k in a:
        d = (a[k].float() - b[k].float()).abs()
        if k.endswith("in_proj_bias"):
            # the KEY bias of an attention layer gets exactly zero gradient in exact arithmetic (softmax is shift
            # invariant), so Adam turns float noise (~1e-10) into steps of up to lr: it is compared at lr, the query
            # and value biases at TOL
            E = d.shape[0] // 3
            assert d[E:2 * E].max().item() <= 1e-3, k
            d = torch.cat([d[:E], d[2 * E:]])
        assert d.max().item() <= TOL, k
    start = load_file(str(one / "checkpoints" / "best" / f"{weights}.safetensors"))
    if json.loads((one / "checkpoints" / "best" / "state.json").read_text())["step"] != int(ckpt.split("_")[1]):
        assert any(not torch.equal(start[k], a[k]) for k in a)  # training really moved the weights

    # evaluation split over 2 processes gives the records of the 1-process eval, in the same order
    tests = sorted(p.name for p in (one / "evals").glob("test*.jsonl"))
    assert tests and tests == sorted(p.name for p in (two / "evals").glob("test*.jsonl"))
    for name in tests:
        r1, r2 = read_jsonl(one / "evals" / name), read_jsonl(two / "evals" / name)
        assert [(r["id"], r["output"], r["correct"]) for r in r1] == [(r["id"], r["output"], r["correct"]) for r in r2]


def test_bridge_with_every_term_trains_under_two_processes(tmp_path):
    """The tiny config as committed (DiT, InfoNCE, separation on) with the CTC alignment: the DiT and the CTC blank
    are parameters of the DDP-wrapped bridge, so they must be used inside its forward (used outside it, DDP's
    backward fails with "Expected to mark a variable ready only once"; scripts/gpu_check.sh found it)."""
    # CTC needs at least as many soft tokens as question tokens: 32 queries
    launch_two("configs/bridge/tiny.yaml", tmp_path, "loss.align_mode=ctc", "translator.num_queries=32",
               "watch.audit_every=1")
    run = only_run_dir(tmp_path)
    assert json.loads((run / "summary.json").read_text())["results"]["ranks"] == [0, 1]
    audits = [r for r in read_jsonl(run / "metrics.jsonl") if "grad/term/dit" in r]
    assert audits and all(r["grad/term/dit"] > 0 and r["grad/term/align"] > 0 for r in audits)


def _run_in_process(config: str, tmp: Path, *overrides: str) -> dict[int, float]:
    from reasonlab.config import load_config
    from reasonlab.methods import get_method
    from reasonlab.runs import Run

    cfg = load_config(ROOT / config, ["tracking.tensorboard=false", *overrides])
    run = Run(cfg, tmp, install_signals=False)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = get_method(cfg.method).main(cfg, run)
        run.finish("completed", results=res)
    finally:
        torch.set_num_threads(n)
    return losses(tmp)


@pytest.mark.parametrize("recipe", sorted(CASES))
def test_bf16_on_cpu(recipe, tmp_path, monkeypatch):
    """train.precision=bf16 runs every recipe on the CPU under autocast: the losses are finite, close to fp32's and
    NOT equal to them (so autocast really changed the arithmetic); env.json records the precision used."""
    monkeypatch.chdir(ROOT)  # the polychromic reward file is given relative to the repository
    config, overrides, ckpt, _ = CASES[recipe]
    steps = {"train.steps=1"} if recipe != "trm" else {"train.steps=2"}
    fp32 = _run_in_process(config, tmp_path / "fp32", *overrides, *steps)
    bf16 = _run_in_process(config, tmp_path / "bf16", *overrides, *steps, "train.precision=bf16")
    assert json.loads((tmp_path / "bf16" / "env.json").read_text())["compute"]["precision"] == "bf16"
    assert fp32.keys() == bf16.keys() and fp32
    for s in fp32:
        assert math.isfinite(bf16[s])
        assert bf16[s] == pytest.approx(fp32[s], rel=0.05, abs=0.02), (s, fp32[s], bf16[s])
    assert any(bf16[s] != fp32[s] for s in fp32), "bf16 gave fp32's losses bit for bit: autocast was not on"
