"""The shared mechanics (reasonlab.training): the one learning-rate schedule, periodic-eval and checkpoint timing,
the validation choice, the final validate/select/test block, device and precision requests, sparse-gradient sync."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from reasonlab import training
from reasonlab.config import TrainConfig


def tc(**kw) -> TrainConfig:
    return TrainConfig(**{"steps": 10, **kw})


def test_lr_schedules_warmup_then_constant_linear_cosine():
    f = lambda s, **kw: training.lr_factor(s, tc(**kw))  # noqa: E731
    assert [f(s, warmup_steps=4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    # linear and cosine decay from 1 after warm-up to min_lr_ratio at train.steps
    assert f(2, schedule="linear", warmup_steps=2) == 1.0 and f(10, schedule="linear", warmup_steps=2) == 0.0
    assert f(6, schedule="linear", warmup_steps=2, min_lr_ratio=0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(2, schedule="cosine", warmup_steps=2) == 1.0
    assert f(6, schedule="cosine", warmup_steps=2) == pytest.approx(0.5)
    assert f(10, schedule="cosine", warmup_steps=2, min_lr_ratio=0.2) == pytest.approx(0.2)
    assert f(50, schedule="cosine") == pytest.approx(0.0)  # past the end it stays at the floor
    # the LambdaLR built on it steps the optimizer's lr the same way
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    sched = training.lr_schedule(opt, tc(schedule="cosine", warmup_steps=2))
    seen = []
    for _ in range(4):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([2.0 * training.lr_factor(s, tc(schedule="cosine", warmup_steps=2)) for s in range(4)])


def test_eval_and_checkpoint_timing():
    assert [s for s in range(1, 11) if training.eval_due(3, s, 10)] == [3, 6, 9]
    assert not training.eval_due(5, 10, 10)  # the last step: the final validation covers it
    assert not any(training.eval_due(e, s, 10) for e in (0, -1) for s in range(1, 11))  # -1 never means "every step"
    assert [s for s in range(1, 11) if training.checkpoint_due(tc(checkpoint_every=4), s)] == [4, 8]
    assert not any(training.checkpoint_due(tc(), s) for s in range(1, 11))


def test_best_keeps_the_earliest_maximum_and_reads_old_checkpoints():
    saved = []
    save = lambda step, name=None: saved.append((step, name))  # noqa: E731
    b = training.Best("accuracy")
    assert b.offer(0, 0.2, save) and not b.offer(5, 0.2, save) and b.offer(10, 0.3, save) and not b.offer(15, 0.1, save)
    assert (b.step, b.value, b.last_offered) == (10, 0.3, 15) and saved == [(0, "best"), (10, "best")]
    again = training.Best.from_state({"best": b.state()}, "accuracy")
    assert (again.metric, again.step, again.value) == ("accuracy", 10, 0.3)
    assert training.Best.from_state({"best": {"acc": 0.5, "step": 3}}, "accuracy").value == 0.5  # before this module
    assert training.Best.from_state({}, "pass@1").value == -math.inf


def test_final_eval_validates_unless_just_validated_restores_best_and_tests_once(tmp_path):
    from reasonlab.runs import save_checkpoint_dir

    model = torch.nn.Linear(2, 2)
    calls = []

    def save(step, name=None):
        calls.append(("save", step, name))
        save_checkpoint_dir(tmp_path / "checkpoints" / (name or f"step_{step}"), step, modules={"m": model},
                            params="all")

    def validate(step):
        calls.append(("validate", step))
        return {0: 0.5, 4: 0.4}[step]

    run = SimpleNamespace(stop_reason=None, dir=tmp_path)
    best = training.Best("accuracy")
    with torch.no_grad():
        model.weight.fill_(1.0)
    best.offer(0, validate(0), save)  # the step-0 weights are the best ...
    with torch.no_grad():
        model.weight.fill_(2.0)  # ... training moves them, the final validation is worse
    out = training.final_eval(run, 4, best, modules={"m": model}, validate=validate, save=save,
                              test=lambda s: calls.append(("test", s))
                              or {"tested": s, "w": float(model.weight[0, 0].detach())})
    assert out == {"tested": 0, "w": 1.0}  # tested once, on the validation choice, with its weights loaded
    assert [c for c in calls if c[0] != "save"] == [("validate", 0), ("validate", 4), ("test", 0)]
    # just validated at the final step: no second validation; a signal: checkpoint and stop, no test
    calls.clear()
    training.final_eval(run, 4, best, modules={"m": model}, validate=validate, save=save, test=lambda s: s)
    assert [c for c in calls if c[0] == "validate"] == []
    calls.clear()
    stopped = SimpleNamespace(stop_reason="SIGTERM", dir=tmp_path)
    assert training.final_eval(stopped, 6, best, modules={"m": model}, validate=validate, save=save,
                               test=lambda s: 1 / 0) is None
    assert calls == [("save", 6, None)]


def test_device_and_precision_requests_this_machine_cannot_serve_are_one_line():
    if torch.cuda.is_available():
        pytest.skip("a CPU-only check")
    assert training.resolve_device("auto") == torch.device("cpu") == training.resolve_device("cpu")
    with pytest.raises(training.ComputeError, match="sees no CUDA device.*train.device=auto or cpu"):
        training.resolve_device("cuda:1")
    with pytest.raises(training.ComputeError, match="fp16 needs a CUDA device"):
        training.check_precision("fp16", torch.device("cpu"))
    training.check_precision("bf16", torch.device("cpu"))
    assert training.gpu_expectation(tc(gpus=1, gpu_memory_gb=40), torch.device("cpu")).startswith(
        "this config is sized for 1 GPU with >= 40 GB")
    assert training.gpu_expectation(tc(), torch.device("cpu")) is None


def test_setup_records_compute_and_warns_when_a_gpu_config_runs_on_cpu(tmp_path):
    import json

    from reasonlab.methods.sft import Config
    from reasonlab.runs import Run

    cfg = Config(train=tc(gpus=1, device="cpu", precision="bf16"))
    run = Run(cfg, tmp_path, install_signals=False)
    compute = training.setup(cfg.train, run)
    assert (compute.device.type, compute.precision, compute.world_size) == ("cpu", "bf16", 1)
    env = json.loads((tmp_path / "env.json").read_text())
    assert env["compute"]["precision"] == "bf16" and "sized for 1 GPU" in env["compute"]["warning"]
    ev = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [e["kind"] for e in ev] == ["gpu_expected"]
    with compute.autocast():
        y = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert y.dtype == torch.bfloat16  # autocast is on
    run.close()


def test_sync_sparse_grads_is_a_no_op_in_one_process_and_refuses_dense():
    emb = torch.nn.Embedding(5, 3, sparse=True)
    emb(torch.tensor([1, 3])).sum().backward()
    g = emb.weight.grad
    one = SimpleNamespace(world_size=1)
    training.sync_sparse_grads([emb.weight], one)
    assert emb.weight.grad is g
    dense = torch.nn.Parameter(torch.zeros(2))
    dense.grad = torch.ones(2)
    with pytest.raises(ValueError, match="sparse"):
        training.sync_sparse_grads([dense], SimpleNamespace(world_size=2))


def test_auto_threads_takes_the_free_cores_shared_among_this_machines_processes(monkeypatch):
    import os

    from reasonlab.training import auto_threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    for load, want in ((0.0, 4), (1.2, 3), (2.6, 1), (9.0, 1)):
        monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, load, load))
        assert auto_threads() == want, load
    monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert auto_threads() == 2  # two processes on four idle cores: two threads each, not four


def test_keep_freed_memory_applies_once_and_the_switch_keeps_glibc_defaults(monkeypatch):
    import sys

    from reasonlab import training

    monkeypatch.setattr(training, "_MALLOC_TUNED", False)
    monkeypatch.setenv("REASONLAB_MALLOC", "glibc")
    assert training.keep_freed_memory() is False
    monkeypatch.delenv("REASONLAB_MALLOC")
    import platform

    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert training.keep_freed_memory() is glibc
    assert training.keep_freed_memory() is glibc  # idempotent
