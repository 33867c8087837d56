"""Training progress on the console (reasonlab.training.progress): a line redrawn in place on a terminal, plain lines
at most every PROGRESS_EVERY_S seconds in a log, a heartbeat while a step or an eval runs long; every recipe calls it
(and no recipe's tiny run prints a FutureWarning); TensorBoard gets the config and hparams."""

import io
import time
import warnings
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT
from reasonlab import training
from reasonlab.training import Progress


class FakeRun(SimpleNamespace):
    """What progress() reads of a Run: open while it has a tracker, stopping once stop_reason is set."""

    def __init__(self):
        super().__init__(tracker=object(), stop_reason=None, dry_run=False)


def test_log_lines_are_throttled_and_the_last_step_is_always_printed():
    run, out = FakeRun(), io.StringIO()
    p = Progress(run, total=5, stream=out, every_s=0.3, tty=False)
    for step in range(1, 5):
        p.update(step, {"train/loss": torch.tensor(2.0 / step), "rollout/reward_mean": -0.5})
    p.update(5, {"train/loss": 0.25})
    lines = out.getvalue().splitlines()
    assert lines[0] == "train 1/5 | loss 2 | reward -0.5"  # the first step at once
    assert lines[-1].startswith("train 5/5 | loss 0.25 | reward -0.5 |") and "/step" in lines[-1]
    assert len(lines) == 2  # steps 2-4 came within every_s of the first line
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()
    run.tracker = None  # closed: the heartbeat thread ends


def test_heartbeat_keeps_a_log_from_going_silent_while_a_step_runs():
    run, out = FakeRun(), io.StringIO()
    p = Progress(run, total=10, stream=out, every_s=1.5, tty=False)
    p.update(1, {"train/loss": 1.0})
    time.sleep(3.6)  # a long step: nothing calls update
    run.tracker = None
    time.sleep(1.2)
    lines = out.getvalue().splitlines()
    assert len(lines) >= 2, lines
    assert all(line.startswith("train 1/10 | loss 1 |") for line in lines[1:])
    assert "step 2 or an eval running for" in lines[1]
    n = len(lines)
    time.sleep(1.2)
    assert len(out.getvalue().splitlines()) == n  # closed runs are silent


def test_terminal_line_is_redrawn_in_place_and_ended_with_a_newline():
    run, out = FakeRun(), io.StringIO()
    p = Progress(run, total=3, stream=out, every_s=30, tty=True)
    p.update(1, {"train/loss": 3.0, "train/exact_accuracy": 0.5})
    time.sleep(0.25)
    p.update(2, {"train/loss": 2.0})
    time.sleep(0.25)
    p.update(3, {"train/loss": 1.0})
    text = out.getvalue()
    assert text.startswith("\rtrain 1/3 | loss 3 | acc 0.5\x1b[K")
    assert "\rtrain 2/3 | loss 2 | acc 0.5 |" in text and "ETA" in text.split("\r")[2]
    assert text.endswith("\x1b[K\n") and text.count("\n") == 1  # one line on screen, ended at the last step
    run.tracker = None


def test_print0_takes_an_open_terminal_line_off_the_screen(capsys):
    run, out = FakeRun(), io.StringIO()
    p = Progress(run, total=9, stream=out, every_s=30, tty=True)
    p.update(1, {"train/loss": 1.0})
    training.print0("step 1: val accuracy 0.5")
    assert out.getvalue().endswith("\r\x1b[K")
    assert capsys.readouterr().out == "step 1: val accuracy 0.5\n"
    run.tracker = None


def test_durations():
    assert [training._dur(x, fine=True) for x in (0.0123, 3.21, 42.0)] == ["12ms", "3.2s", "42s"]
    assert [training._dur(x) for x in (59.4, 245, 7980)] == ["59s", "4m05s", "2h13m"]


TINY = {"sft": "configs/sft/arithmetic-tiny.yaml", "markovian": "configs/markovian/arithmetic-tiny.yaml",
        "polychromic": "configs/polychromic/countdown-tiny.yaml", "bridge": "configs/bridge/tiny.yaml",
        "trm": "configs/trm/sudoku4-tiny.yaml"}
SHOWN = {"sft": "loss", "markovian": "reward", "polychromic": "reward", "bridge": "loss", "trm": "acc"}


@pytest.mark.parametrize("method", sorted(TINY))
def test_every_recipe_shows_progress_and_no_future_warning(method, tmp_path, capsys):
    """Each recipe's tiny config, 2 steps, in this process: a progress line for the last step on stderr, and no
    FutureWarning from anything the run calls (LoRA via PEFT, the KV cache, generation, checkpoints)."""
    from reasonlab.config import load_config
    from reasonlab.methods import get_method
    from reasonlab.runs import Run

    over = ["train.steps=2", "train.threads=1", "tracking.tensorboard=false"]
    if method == "sft":  # the RL tiny configs have their LoRA adapters already
        over.append("model.lora.r=4")
    cfg = load_config(ROOT / TINY[method], over)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = Run(cfg, tmp_path / method, install_signals=False)
        run.finish(results=get_method(method).main(cfg, run))
    err = capsys.readouterr().err
    last = [line for line in err.splitlines() if line.startswith("train 2/2 |")]
    assert last, err
    assert SHOWN[method] in last[0] and "/step" in last[0], last[0]
    future = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught if issubclass(w.category, FutureWarning)]
    assert future == []


def test_tensorboard_gets_the_config_as_text_and_hparams(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    from reasonlab.tracking import Tracker

    config = {"method": "sft", "train": {"lr": 0.001, "steps": 3}, "eval": {"ks": [1, 2]}, "model": {"name": "x"}}
    tr = Tracker(tmp_path, tensorboard=True, config=config)
    for step in (1, 2, 3):
        tr.log(step, {"train/loss": 1.0 / step, "eval/arithmetic/accuracy": 0.1 * step, "time/step_s": 0.5})
    tr.close()
    ea = EventAccumulator(str(tmp_path / "tb"))
    ea.Reload()
    tensors = ea.Tags()["tensors"]
    assert "config/text_summary" in tensors
    text = ea.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "lr: 0.001" in text and text.startswith("```yaml")
    hp = ea.summary_metadata["_hparams_/session_start_info"].plugin_data.content
    info = plugin_data_pb2.HParamsPluginData.FromString(hp).session_start_info
    assert info.hparams["train.lr"].number_value == 0.001 and info.hparams["model.name"].string_value == "x"
    assert info.hparams["eval.ks"].string_value == "[1, 2]"
    exp = plugin_data_pb2.HParamsPluginData.FromString(
        ea.summary_metadata["_hparams_/experiment"].plugin_data.content).experiment
    assert {m.name.tag for m in exp.metric_infos} == {"train/loss", "eval/arithmetic/accuracy"}
    assert ea.Scalars("eval/arithmetic/accuracy")[-1].value == pytest.approx(0.3)  # the scalars the row joins


def test_the_time_before_the_first_step_has_a_heartbeat_too(monkeypatch):
    """training.setup starts the progress: model loading and the first evaluation are not silent in a log."""
    out = io.StringIO()
    monkeypatch.setattr(training, "PROGRESS_EVERY_S", 1.5)
    monkeypatch.setattr("sys.stderr", out)
    run = FakeRun()
    p = training.progress_start(run, 4)
    time.sleep(2.6)
    training.progress(run, 1, 4, {"train/loss": 0.5})
    assert training.progress_start(run, 4) is p  # one progress per run
    run.tracker = None
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("train 0/4 | setup (model, data, first evaluation) running for"), lines
    assert lines[1] == "train 1/4 | loss 0.5"  # the first step is printed whatever came before


def test_stop_joins_the_heartbeat_thread_and_runs_at_interpreter_exit():
    """stop() ends the heartbeat at once (no waiting out its second) and joins it; start() registers stop() with
    atexit, so no daemon thread is inside a torch call while the interpreter tears torch down."""
    import subprocess
    import sys

    run, out = FakeRun(), io.StringIO()
    p = Progress(run, total=10, stream=out, every_s=100, tty=False)
    p.update(1, {"train/loss": torch.tensor(1.0)})
    assert p._thread.is_alive()
    t0 = time.monotonic()
    p.stop()
    assert not p._thread.is_alive() and time.monotonic() - t0 < 0.9
    code = ("import atexit, torch\nfrom types import SimpleNamespace\nfrom reasonlab.training import Progress\n"
            "p = Progress(SimpleNamespace(tracker=object(), stop_reason=None), total=3, every_s=100, tty=False)\n"
            "atexit.register(lambda: print('joined' if not p._thread.is_alive() else 'ALIVE'))  # runs after stop\n"
            "p.update(1, {'train/loss': torch.tensor(1.0)})\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "joined", (r.stdout, r.stderr)
