"""Run folders: atomic checkpoints, kill-and-resume equals an uninterrupted run, time limits, clean SIGTERM."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from reasonlab.runs import (RunError, latest_valid_checkpoint, list_checkpoints, parse_duration, save_checkpoint_dir,
                            tensor_sha256)

from conftest import ROOT, cli, only_run_dir, read_json


def final_weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / f"step_{step}" / "module.model.safetensors"))


def assert_same(a: dict, b: dict, atol: float = 0.0):
    assert a.keys() == b.keys()
    for k in a:
        if atol == 0.0:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


def test_parse_duration():
    assert parse_duration("2h30m") == 9000 and parse_duration("90m") == 5400 and parse_duration("45s") == 45
    assert parse_duration("1h") == 3600 and parse_duration("3600") == 3600 and parse_duration(None) is None
    with pytest.raises(RunError, match="2h30m"):
        parse_duration("soon")


def test_checkpoint_round_trip_restores_model_optimizer_scheduler_rng(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    model[0].weight.requires_grad_(False)  # a frozen tensor: checksummed, not saved with params="trainable"
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (s + 1))
    for _ in range(3):
        model(torch.randn(5, 4)).pow(2).mean().backward()
        opt.step(), sched.step(), opt.zero_grad()
    ck = save_checkpoint_dir(tmp_path / "step_3", 3, modules={"model": model}, optimizer=opt, scheduler=sched,
                             state={"data_pos": 15})
    assert ck.verify()
    expect_next = torch.rand(3)  # the RNG stream right after the save
    sums = ck.frozen_checksums()
    assert sums["model.0.weight"] == tensor_sha256(model[0].weight)

    torch.manual_seed(123)
    model2 = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    model2[0].weight.data.copy_(model[0].weight)
    model2[0].weight.requires_grad_(False)
    opt2 = torch.optim.AdamW([p for p in model2.parameters() if p.requires_grad], lr=0.1)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1 / (s + 1))
    state = ck.restore(modules={"model": model2}, optimizer=opt2, scheduler=sched2)
    assert state == {"step": 3, "data_pos": 15}
    assert torch.equal(torch.rand(3), expect_next)
    assert_same(model.state_dict(), model2.state_dict())
    assert sched2.last_epoch == 3 and opt2.state_dict()["param_groups"][0]["lr"] == pytest.approx(0.025)
    for (a, b) in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values()):
        assert torch.equal(a["exp_avg_sq"], b["exp_avg_sq"]) and torch.equal(a["step"], b["step"])
    # never unpickled: a checkpoint holds only safetensors and JSON
    assert {p.suffix for p in ck.path.iterdir()} <= {".safetensors", ".json"}


def test_tampered_checkpoint_fails_verification(tmp_path):
    m = torch.nn.Linear(2, 2)
    ck1 = save_checkpoint_dir(tmp_path / "checkpoints" / "step_1", 1, modules={"model": m})
    ck2 = save_checkpoint_dir(tmp_path / "checkpoints" / "step_2", 2, modules={"model": m})
    with open(ck2.path / "module.model.safetensors", "r+b") as f:
        f.seek(-1, 2)
        f.write(b"\x00" if f.read(1) != b"\x00" else b"\x01")
    assert not ck2.verify() and ck1.verify()
    assert latest_valid_checkpoint(tmp_path).step == 1


KILL_MID_WRITE = textwrap.dedent("""
    import os, signal, sys, torch, safetensors.torch as st
    from pathlib import Path
    from reasonlab.runs import save_checkpoint_dir
    root = Path(sys.argv[1])
    model = torch.nn.Linear(64, 64)
    save_checkpoint_dir(root / "checkpoints" / "step_1", 1, modules={"model": model}, state={"pos": 1})
    real = st.save_file
    def dying_save(tensors, path, *a, **k):
        real(tensors, path, *a, **k)
        os.kill(os.getpid(), signal.SIGKILL)  # killed between the first file and the manifest
    st.save_file = dying_save
    with torch.no_grad():
        model.weight.add_(1.0)
    save_checkpoint_dir(root / "checkpoints" / "step_2", 2, modules={"model": model}, state={"pos": 2})
""")


def test_process_killed_while_writing_a_checkpoint_leaves_the_previous_one_valid(tmp_path):
    p = subprocess.run([sys.executable, "-c", KILL_MID_WRITE, str(tmp_path)], capture_output=True, text=True)
    assert p.returncode == -signal.SIGKILL, p.stderr
    names = sorted(x.name for x in (tmp_path / "checkpoints").iterdir())
    assert "step_1" in names and "step_2" not in names, names  # the half-written one never got its final name
    assert any(n.startswith(".tmp-step_2") for n in names)
    ck = latest_valid_checkpoint(tmp_path)
    assert ck.step == 1 and ck.state["pos"] == 1
    assert [c.step for c in list_checkpoints(tmp_path)] == [1]


def test_killed_run_resumes_to_identical_parameters(tmp_path, tiny_cfg):
    steps = "train.steps=8"
    ref_out, out = tmp_path / "ref", tmp_path / "killed"
    cli("run", str(tiny_cfg), steps, "--out", str(ref_out))
    ref = only_run_dir(ref_out)

    # the same run, hard-killed (SIGKILL: no chance to clean up) once step 4's checkpoint exists
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "reasonlab.cli", "run", str(tiny_cfg), steps,
                             "train.checkpoint_every=1", "train.keep_checkpoints=3", "--out", str(out)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline:
        run_dirs = list(out.glob("*/checkpoints/step_4")) if out.exists() else []
        if run_dirs or proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert run_dirs, "the run never reached step 4"
    run = only_run_dir(out)
    assert not (run / "checkpoints" / "step_8").exists(), "killed too late to test anything"
    r = cli("run", "--resume", str(run))
    assert "resumed from" in r.stdout
    assert_same(final_weights(ref, 8), final_weights(run, 8))
    assert read_json(run / "summary.json")["status"] == "completed"


def test_sigterm_checkpoints_and_exits_cleanly_then_resume_matches(tmp_path, tiny_cfg):
    steps = "train.steps=8"
    ref_out, out = tmp_path / "ref", tmp_path / "term"
    cli("run", str(tiny_cfg), steps, "--out", str(ref_out))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "reasonlab.cli", "run", str(tiny_cfg), steps, "--out", str(out)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline:
        rows = [json.loads(x) for f in out.glob("*/metrics.jsonl") for x in f.read_text().splitlines() if x]
        if any("train/loss" in r and r["step"] >= 2 for r in rows) or proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    run = only_run_dir(out)
    summary = read_json(run / "summary.json")
    assert summary["status"] == "stopped" and summary["stop_reason"] == "SIGTERM"
    stopped_at = summary["results"]["final_step"]
    assert stopped_at < 8 and (run / "checkpoints" / f"step_{stopped_at}").exists()
    assert "resume with: reasonlab run --resume" in stdout
    cli("run", "--resume", str(run))
    assert_same(final_weights(only_run_dir(ref_out), 8), final_weights(run, 8))


def test_time_limit_stops_early_with_final_eval_and_checkpoint_inside_the_limit(tmp_path, tiny_cfg):
    limit = 40.0  # startup (imports, model, step-0 eval) takes ~10-15 s on 2 cores; the rest trains
    t0 = time.time()
    r = cli("run", str(tiny_cfg), "train.steps=100000", "--time-limit", f"{limit:.0f}s", "--out", str(tmp_path))
    wall = time.time() - t0
    run = only_run_dir(tmp_path)
    summary = read_json(run / "summary.json")
    assert summary["status"] == "stopped" and summary["stop_reason"] == "time_limit", summary
    step = summary["results"]["final_step"]
    assert 0 < step < 100000
    ck = run / "checkpoints" / f"step_{step}"
    assert (ck / "manifest.json").exists()
    started = read_json(run / "env.json")["started"]
    assert summary["elapsed_s"] < limit, summary
    assert (run / "evals" / f"val_step{step}.json").exists()  # the final eval ran
    assert (run / "report.md").exists()  # and the report, inside the same budget
    assert any(e["kind"] == "time_limit" for e in map(json.loads, (run / "events.jsonl").read_text().splitlines()))
    assert wall < limit + 15, f"process took {wall:.1f}s (startup + teardown beyond the run's own clock)"


def test_resume_of_a_folder_without_a_run_is_one_line(tmp_path):
    r = cli("run", "--resume", str(tmp_path), check=False)
    assert r.returncode == 2 and "not a run folder" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_dry_run_trains_nothing_and_leaves_nothing(tmp_path, tiny_cfg):
    r = cli("run", str(tiny_cfg), "--dry-run", "--out", str(tmp_path / "runs"))
    assert "trainable" in r.stdout and "nothing trained" in r.stdout
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------- bad input (issue 18)

def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


@pytest.fixture
def no_model_loads(monkeypatch):
    """Bad input must be caught before any model loads: loading one fails this test."""
    import reasonlab.models.lm as lm

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the bad input was caught")

    monkeypatch.setattr(lm, "tiny_causal_lm", refuse)
    monkeypatch.setattr(lm, "load_causal_lm", refuse)


def test_bad_inputs_are_one_line_exit_2_nothing_on_disk_before_any_model_loads(tmp_path, tiny_cfg, no_model_loads,
                                                                                monkeypatch):
    from typer.testing import CliRunner

    from reasonlab.cli import app

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("REASONLAB_DATA", raising=False)
    (tmp_path / "afile").write_text("")
    cases = [
        (["run", tiny_cfg, "--out", "afile"], "--out afile is a file"),
        (["run", tiny_cfg, "--out", "afile/sub"], "cannot be created"),
        (["run", tiny_cfg, "--out", "runs", "data.task=gsm8k"], "data.task_args for gsm8k"),
        (["run", tiny_cfg, "--out", "runs", "data.task=gsm8k", "data.task_args={}"], "gsm8k/train: no local data"),
        (["run", tiny_cfg, "--out", "runs", "data.task=nosuchtask"], "unknown task 'nosuchtask'"),
        (["run", tiny_cfg, "--out", "runs", "model.name=nosuch/model"], "model 'nosuch/model'"),
        (["eval", "--model", "tiny-random", "--task", "arithmetic", "--out", "afile"], "--out afile is a file"),
        (["eval", "--model", "tiny-random", "--task", "arithmetic", "--dtype", "float8"], "--dtype must be one of"),
        (["eval", "--model", "tiny-random", "--task", "arithmetic", "--samples", "0"], "--samples must be >= 1"),
        (["eval", "--model", "tiny-random", "--task", "arithmetic", "--device", "tpu"], "--device must be"),
        (["data", "gsm8k"], "gsm8k/test: no local data"),
    ]
    if not torch.cuda.is_available():
        cases.append((["eval", "--model", "tiny-random", "--task", "arithmetic", "--device", "cuda"],
                      "sees no CUDA device"))
    before = _files(tmp_path)
    for args, needle in cases:
        res = CliRunner().invoke(app, [str(a) for a in args])
        lines = [x for x in res.output.splitlines() if x.strip()]
        assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (args, res.output)
        assert needle in lines[0], (args, lines[0])
        assert _files(tmp_path) == before, (args, _files(tmp_path) - before)  # no run folder, no empty --out root


def test_dry_run_of_a_paper_config_without_its_data_is_one_line(tmp_path):
    r = cli("run", "configs/bridge/llama8b-to-mistral7b-gsm8k.yaml", "--dry-run", check=False,
            env={"REASONLAB_DATA": ""})
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1, r.stderr
    assert "gsm8k/train: no local data" in err[0] and "REASONLAB_DATA" in err[0]


def test_a_kill_between_the_renames_of_a_checkpoint_replacement_is_repaired(tmp_path):
    """save_checkpoint_dir replaces an existing checkpoint in two renames (old away, new in): killed between them,
    the name is missing while both complete folders exist; repair_checkpoints puts the new one back (the old one when
    the new one does not verify), keeps a replaced best as best@step_N, and deletes the rest."""
    from reasonlab.runs import open_checkpoint, repair_checkpoints

    d = tmp_path / "checkpoints"
    m = torch.nn.Linear(2, 2)
    for name, step, new_step in (("step_4", 4, 4), ("best", 2, 4)):
        save_checkpoint_dir(d / name, step, modules={"model": m})
        os.replace(d / name, d / f".old-{name}-123")  # the first rename happened ...
        save_checkpoint_dir(d / f".tmp-{name}-ab_c1", new_step, modules={"model": m}, state={"new": True})
    (d / ".tmp-step_6-zz9").mkdir()  # a write killed before its manifest
    notes = repair_checkpoints(tmp_path)
    assert len(notes) == 2 and sorted(p.name for p in d.iterdir()) == ["best", "best@step_2", "step_4"]
    assert open_checkpoint(d / "step_4").state["new"] and open_checkpoint(d / "best").step == 4
    assert open_checkpoint(d / "step_4").verify()
