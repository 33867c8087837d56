"""Shared test setup: offline, few threads, and helpers to run the real CLI in a subprocess."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def cli(*args: str, timeout: float = 900, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `reasonlab ARGS...` as a user would (a fresh process: signals, exit codes and stderr are real)."""
    e = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    p = subprocess.run([sys.executable, "-m", "reasonlab.cli", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout, env=e)
    if check and p.returncode != 0:
        raise AssertionError(f"reasonlab {' '.join(args)} exited {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def only_run_dir(out: Path) -> Path:
    dirs = [d for d in out.iterdir() if d.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture
def tiny_cfg() -> Path:
    return ROOT / "configs" / "sft" / "arithmetic-tiny.yaml"
