"""Metrics sinks. metrics.jsonl is always written (one JSON object per logged step, flushed at every write, so a killed
run keeps everything it logged); TensorBoard by default; Weights & Biases when configured (offline mode works without a
network: `wandb sync <run>/wandb/...` uploads later).

TensorBoard also gets the run's config: as text (the resolved YAML, TEXT tab) when the run starts, and as hparams
(every scalar config leaf, dotted, against the headline metrics the run logged: HPARAMS tab) when it closes, in the
same event files as the scalars so the plugin joins them (SummaryWriter.add_hparams would open a second run folder).
A run killed without closing has the config text and no hparams.

Non-finite floats are written as JSON's NaN/Infinity extensions (Python's json reads them back), because a NaN loss is
exactly what a reader of metrics.jsonl must be able to see.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any

# the metrics an hparams row shows: the training loss and every eval's headline number
HPARAM_METRICS = re.compile(r"^(train/loss|(eval|test)/[^/]+/(accuracy|exact|pass@\d+))$")


def _scalar(v: Any) -> Any:
    """Tensors / numpy scalars -> Python numbers; everything else unchanged."""
    if hasattr(v, "item") and getattr(v, "ndim", 0) == 0:
        return v.item()
    return v


class Tracker:
    def __init__(self, run_dir: str | Path, *, tensorboard: bool = True, wandb: bool = False,
                 wandb_project: str = "reasonlab", wandb_mode: str = "offline", run_name: str | None = None,
                 config: dict | None = None):
        self.dir = Path(run_dir)
        self._f = open(self.dir / "metrics.jsonl", "a", buffering=1)
        self._tb = None
        self._wandb = None
        self._config = config
        self._last: dict[str, float] = {}  # the last finite value of every scalar (the hparams metrics at close)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(self.dir / "tb"))
            except ImportError:  # tensorboard not installed: metrics.jsonl still has everything
                self._tb = None
            if self._tb is not None and config:
                import yaml

                text = yaml.safe_dump(config, sort_keys=False)
                self._tb.add_text("config", "```yaml\n" + text + "```", 0)  # markdown: keep the YAML verbatim
        if wandb:
            import wandb as wb

            os.environ.setdefault("WANDB_SILENT", "true")
            self._wandb = wb.init(project=wandb_project, name=run_name, dir=str(self.dir), config=config,
                                  mode=wandb_mode, reinit=True)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"step": int(step), "time": round(time.time(), 3)}
        row.update({k: _scalar(v) for k, v in metrics.items()})
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k in ("step", "time") or not isinstance(v, (int, float)) or isinstance(v, bool):
                    continue
                if math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
                    self._last[k] = float(v)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if k not in ("step", "time")}, step=int(step))

    def close(self) -> None:
        self._f.close()
        if self._tb is not None:
            if self._config:
                self._write_hparams()
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


    def _write_hparams(self) -> None:
        from torch.utils.tensorboard.summary import hparams

        metrics = {k: v for k, v in self._last.items() if HPARAM_METRICS.match(k)}
        exp, ssi, sei = hparams(hparam_dict(self._config), metrics)
        for summ in (exp, ssi, sei):
            self._tb.file_writer.add_summary(summ)


def hparam_dict(config: dict) -> dict[str, bool | int | float | str]:
    """Config leaves as TensorBoard hparams: dotted keys; lists, mappings and None as their JSON text."""
    out: dict[str, bool | int | float | str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
            return
        key = prefix[:-1]
        out[key] = node if isinstance(node, (bool, int, float, str)) else json.dumps(node, default=str)

    walk(config, "")
    return out


def read_jsonl(path: str | Path) -> list[dict]:
    """Read a .jsonl file; a truncated last line (a killed writer) is skipped, not fatal."""
    rows = []
    p = Path(path)
    if not p.exists():
        return rows
    with open(p) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows
