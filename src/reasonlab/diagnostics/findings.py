"""A detector's finding (severity, stable code, one-line title, evidence, why, what to do) and the helpers every
detector module builds them with."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

from reasonlab.diagnostics.runfolder import finite

SEVERITY_ORDER = {"failed": 0, "warning": 1, "info": 2}


Severity = Literal["failed", "warning", "info"]


@dataclass
class Finding:
    severity: Severity  # failed: the run's results cannot be trusted | warning: look before spending more | info
    code: str  # stable machine name, e.g. "zero_grad_term"
    title: str  # one line
    evidence: dict = field(default_factory=dict)  # {"steps": [...], "values": [...], ...}
    explanation: str = ""
    recommendation: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _f(severity, code, title, steps=(), values=(), explanation="", recommendation="", **extra) -> Finding:
    ev = {"steps": list(steps), "values": [round(v, 6) if isinstance(v, float) and finite(v) else v for v in values]}
    ev.update(extra)
    return Finding(severity, code, title, ev, explanation, recommendation)


def _recent(steps: list[int], vals: list[float], frac: float) -> tuple[list[int], list[float]]:
    k = max(1, int(math.ceil(len(vals) * frac)))
    return steps[-k:], vals[-k:]
