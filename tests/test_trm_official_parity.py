"""Our TRM computes the same numbers as the OFFICIAL model code (SamsungSAILMontreal/TinyRecursiveModels) for the same
weights, batch and carry: logits, Q-halt logits, loss and weight gradients over two ACT steps, at a small config.

Needs an official checkout (never copied into this repository): REASONLAB_TRM_OFFICIAL=<path>, default
/tmp/trm_official; skipped when it is absent. The mapping, shims and check live in benchmarks/trm_step.py."""

import importlib.util
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL = Path(os.environ.get("REASONLAB_TRM_OFFICIAL", "/tmp/trm_official"))

pytestmark = pytest.mark.skipif(
    not (OFFICIAL / "models" / "recursive_reasoning" / "trm.py").exists(),
    reason=f"no official TinyRecursiveModels checkout at {OFFICIAL} (set REASONLAB_TRM_OFFICIAL)")


@pytest.fixture(scope="module")
def bench():
    pytest.importorskip("pydantic")  # the official config class
    spec = importlib.util.spec_from_file_location("trm_step_bench", ROOT / "benchmarks" / "trm_step.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_same_weights_same_logits_q_halt_loss_and_gradients(bench):
    d = bench.parity(OFFICIAL, "small", seed=0, act_steps=2)
    # fp32, the same op sequence: logits and Q-halt agree to rounding (observed 0.0); the loss differs only in the
    # order of the batch reduction (official: sum then / batch), observed ~2e-8 relative, gradients ~3e-7
    assert d["logits"] <= 1e-5 and d["q_halt"] <= 1e-5, d
    assert d["loss"] <= 1e-6 and d["grad"] <= 1e-4, d


def test_the_check_is_not_vacuous(bench, monkeypatch):
    """One perturbed weight must show up: the comparison really reads both models' numbers."""
    copy = bench.copy_official_into_ours

    def perturbed(off, ours):
        copy(off, ours)
        with torch.no_grad():
            ours.net.layers[1].mlp.down.weight[0, 0] += 1e-3

    monkeypatch.setattr(bench, "copy_official_into_ours", perturbed)
    d = bench.parity(OFFICIAL, "small", seed=0, act_steps=2)
    assert d["logits"] > 1e-5 and d["grad"] > 1e-5, d


def test_every_official_tensor_is_mapped(bench):
    ours, off, _, c = bench.build_pair(OFFICIAL, "small", seed=1)
    names = bench.official_to_ours_names(c["num_layers"])
    assert set(off.state_dict()) == set(names) and set(ours.state_dict()) == set(names.values())
    sd, osd = ours.state_dict(), off.state_dict()
    assert all(torch.equal(sd[u], osd[o]) for o, u in names.items())
