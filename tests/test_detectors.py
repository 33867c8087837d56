"""Each detector against a run folder written by a real tiny training loop (tests/tinyrun.py) that has the failure,
and against the same loop without the bug. The failures come from what training does (a term with no gradient, a
ratio against the wrong policy, a collapsed translator), never from numbers written into the folder by hand."""

import json

import pytest

import tinyrun
from reasonlab.diagnostics.detectors import overall_status, run_detectors, term_audits, thresholds_from_config
from reasonlab.diagnostics.runfolder import RunFolder
from reasonlab.watch import Thresholds, WatchConfig, Watcher
from reasonlab.tracking import read_jsonl


def findings(run_dir):
    found = run_detectors(run_dir)
    errors = [f.title for f in found if f.code == "detector_error"]
    assert not errors, errors  # a detector that crashes on a real run folder is a bug
    return found


def codes(found, severities=("failed", "warning")):
    return {f.code for f in found if f.severity in severities}


def only(found, code):
    hits = [f for f in found if f.code == code]
    assert hits, f"no {code} finding; got {[(f.code, f.title) for f in found]}"
    return hits


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


# ---------------------------------------------------------------------------------------------------------- healthy


def test_healthy_run_has_no_warning(root):
    run = tinyrun.classifier_run(root, "healthy")
    found = findings(run)
    assert codes(found) == set(), [(f.severity, f.title) for f in found]
    assert overall_status(found) == ("healthy", "no detector fired")
    rf = RunFolder(run)
    test = [e for e in rf.evals_for("test") if e.final][0]
    assert test.primary[1]["value"] > 0.75 and test.primary[1]["n"] == 500  # it learned, on a powered eval
    assert not rf.events  # the Watcher raised nothing
    # the frozen feature layer is checksummed and unchanged, the head moved: the weights detector had data to judge
    cks = {c.name: c for c in rf.checkpoints}
    first, last = cks["step_20"], cks["step_60"]
    assert first.checksums["model.0.weight"] == last.checksums["model.0.weight"]
    assert first.checksums["model.2.0.weight"] != last.checksums["model.2.0.weight"]
    assert first.trainable == {n for n in first.checksums if n.startswith("model.2.")}


# ---------------------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("term", ["float_diversity", "standardized_reward"])
def test_zero_gradient_loss_term(root, term):
    """Seed 002: diversity bonus is a Python float. Seed 003: an advantage standardized with non-detached mean/std."""
    run = tinyrun.classifier_run(root, f"zero-grad-{term}", extra_term=term)
    f = only(findings(run), "zero_grad_term")
    assert len(f) == 1 and f[0].severity == "failed" and f[0].evidence["term"] == term
    assert "of the loss value" in f[0].title
    assert max(f[0].evidence["values"]) < 1e-4  # the audited gradient norms
    # the value share is printed next to the gradient share: a visible share of the loss, none of the gradient
    rf = RunFolder(run)
    vshare, gshare = rf.series(f"share/loss/{term}")[1], rf.series(f"share/grad/{term}")[1]
    assert max(gshare) < 1e-4
    if term == "float_diversity":
        assert min(vshare) > 0.05 and f"{100 * max(vshare):.1f}% of the loss value" in f[0].title
    assert "ce" not in {x.evidence.get("term") for x in f}  # the live term is not flagged


def audits(run_dir, term):
    """[(step, state)] of one loss term at its audits, as the report and the watcher judge them."""
    return [(a[0], a[1]) for a in term_audits(RunFolder(run_dir), Thresholds())[term]]


def test_kl_at_its_reference_point_is_not_a_failure(root):
    """Issue 17, point 1: a 3-step LoRA run audited once, at initialisation, where the policy equals its reference:
    the KL and its gradient are exactly 0 by construction. Not a failure; an info that says why."""
    run = tinyrun.lora_kl_run(root, "lora-kl-init", steps=3, audit_every=1000)
    rf = RunFolder(run)
    assert rf.series("loss/term/kl")[1] == [0.0] and rf.series("grad/term/kl")[1][0] < 1e-8  # what the old rule saw
    found = findings(run)
    assert codes(found) == set(), [(f.severity, f.title) for f in found]
    info = only(found, "term_not_yet_active")
    assert [f.evidence["term"] for f in info] == ["kl"] and info[0].severity == "info"
    assert not rf.events  # the online watcher agrees

    # audited at every step: once the policy has moved, the KL is live
    run = tinyrun.lora_kl_run(root, "lora-kl-every", steps=3, audit_every=1)
    assert audits(run, "kl") == [(1, "inactive"), (2, "live"), (3, "live")]
    found = findings(run)
    assert codes(found) == set() and "term_not_yet_active" not in codes(found, ("info",))


def test_small_weight_kl_is_judged_against_its_own_value(root):
    """A small-weight KL next to a term with a large gradient (markovian's actor reward: 14-95 vs the KL's
    4e-4..6e-3): its gradient is far below 1e-4 of the largest term's, which the old relative rule called zero."""
    run = tinyrun.lora_kl_run(root, "lora-kl-small", steps=3, audit_every=1, kl_weight=0.01, pg_weight=100.0)
    rf = RunFolder(run)
    kl, pg = rf.series("grad/term/kl")[1], rf.series("grad/term/pg")[1]
    assert all(k / p < 1e-4 for k, p in zip(kl[1:], pg[1:]))  # the old rule: dead at every audit
    assert audits(run, "kl") == [(1, "inactive"), (2, "live"), (3, "live")]
    assert codes(findings(run)) == set()


def test_float_term_is_flagged_at_the_first_audit(root):
    """Seed 002's float diversity bonus in the same LoRA run, audited once at initialisation: a visible value with no
    gradient is dead at once, while the KL beside it is merely not yet active."""
    found = findings(tinyrun.lora_kl_run(root, "lora-float", steps=3, audit_every=1000, extra="float"))
    f = only(found, "zero_grad_term")
    assert len(f) == 1 and f[0].evidence["term"] == "diversity" and "at 1/1 judged audits" in f[0].title
    assert [x.evidence["term"] for x in only(found, "term_not_yet_active")] == ["kl"]


def test_identically_zero_term_is_flagged_once_the_policy_moved(root):
    """Seed 003's advantage standardized with non-detached mean/std: value and gradient ~0 at every audit. At
    initialisation that looks like the KL; after the policy has moved it is dead, the KL is live."""
    run = tinyrun.lora_kl_run(root, "lora-std", steps=3, audit_every=1, extra="standardized")
    assert audits(run, "actor") == [(1, "inactive"), (2, "dead"), (3, "dead")]
    f = only(findings(run), "zero_grad_term")
    assert len(f) == 1 and f[0].evidence["term"] == "actor" and f[0].evidence["steps"] == [2, 3]
    ev = [e for e in RunFolder(run).events if e["kind"] == "zero_grad_term"]  # online: two consecutive dead audits
    assert [(e["step"], e["terms"]) for e in ev] == [(3, ["actor"])]
    # audited only at initialisation it cannot be told from the KL there: not judged, and the report says so
    found = findings(tinyrun.lora_kl_run(root, "lora-std-once", steps=3, audit_every=1000, extra="standardized"))
    assert "zero_grad_term" not in codes(found)
    assert {f.evidence["term"] for f in only(found, "term_not_yet_active")} == {"kl", "actor"}


def test_watcher_stops_on_zero_gradient_term_after_checkpoint(root):
    run = tinyrun.classifier_run(root, "zero-grad-stop", extra_term="float_diversity", stop_on=("zero_grad_term",))
    rf = RunFolder(run)
    ev = [e for e in rf.events if e["kind"] == "zero_grad_term"]
    # audits at steps 1 and 10; patience 2 consecutive audits -> fires at step 10
    assert len(ev) == 1 and ev[0]["step"] == 10 and ev[0]["severity"] == "error"
    assert ev[0]["terms"] == ["float_diversity"] and "stopping after checkpoint" in ev[0]["message"]
    assert rf.summary["status"] == "stopped" and rf.summary["stop_reason"] == "watch:zero_grad_term"
    assert (run / "checkpoints" / "step_10" / "manifest.json").exists() and rf.last_step == 10
    assert any(e.final and e.split == "test" for e in rf.evals)  # the final eval still ran


def test_ppo_ratio_against_frozen_base_not_pi_old(root):
    bad = findings(tinyrun.ppo_run(root, "ppo-base", ratio_against="base"))
    assert {"ppo_ratio_not_one", "ppo_ratio_explosion", "ppo_clip_high"} <= codes(bad)
    assert max(only(bad, "ppo_ratio_explosion")[0].evidence["values"]) > 5

    good_dir = tinyrun.ppo_run(root, "ppo-pi-old")
    good = findings(good_dir)
    assert not {c for c in codes(good) if c.startswith("ppo_")}
    first = RunFolder(good_dir).series("ppo/ratio_first_mean")[1]
    assert len(first) == 30 and all(abs(r - 1.0) < 1e-6 for r in first)  # exactly 1 against the sampling policy


def test_watcher_stops_on_ratio_explosion(root):
    run = tinyrun.ppo_run(root, "ppo-stop", ratio_against="base", stop_on=("ratio_explosion",))
    rf = RunFolder(run)
    ev = [e for e in rf.events if e["kind"] == "ratio_explosion"]
    assert len(ev) == 1 and ev[0]["ratio_max"] > 5
    assert rf.summary["stop_reason"] == "watch:ratio_explosion" and rf.last_step == ev[0]["step"] < 30
    assert (run / "checkpoints" / f"step_{ev[0]['step']}").is_dir()
    kinds = {e["kind"] for e in rf.events}
    assert "ratio_not_one" in kinds  # raised (not stopped on) before the explosion


def test_nan_loss_stops_run_and_is_reported(root):
    run = tinyrun.classifier_run(root, "nan", lr=1e4)
    rf = RunFolder(run)
    f = only(findings(run), "nonfinite")[0]
    assert f.severity == "failed" and "train/loss" in f.evidence["keys"]
    nan_ev = [e for e in rf.events if e["kind"] == "nan"]
    assert len(nan_ev) == 1 and nan_ev[0]["step"] == f.evidence["steps"][0]
    assert rf.summary["stop_reason"] == "watch:nan" and rf.last_step == nan_ev[0]["step"]


def test_output_collapse_of_an_untrained_model_is_not_a_training_failure(root):
    """The repetition loop's policy ignores the prompt, so even after 3 steps it answers every question alike. With
    no earlier eval to compare and 3 steps of training that is the model's starting habit: a warning that says so.
    After 100 steps (watch.collapse_min_steps: the collapse the reward drives) it is a failure."""
    early = only(findings(tinyrun.repetition_run(root, "repetition-3", steps=3)), "output_collapse")
    assert [f.severity for f in early] == ["warning"] and "possibly the untrained model's habit" in early[0].title
    late = only(findings(tinyrun.repetition_run(root, "repetition-100", steps=100)), "output_collapse")
    assert [f.severity for f in late] == ["failed"]


def test_a_run_whose_rewards_always_tie_trained_nothing(root):
    """Every group's rewards tie (a task the policy never solves) and the KL is 0 at the reference: not one update.
    The parameters never moved, and the report says why instead of blaming gradient plumbing."""
    found = findings(tinyrun.lora_kl_run(root, "lora-tied", steps=3, tied=True, kl_weight=0.0))
    f = only(found, "trainable_unchanged")[0]
    assert f.severity == "failed" and "every group's rewards tied" in f.explanation
    assert "zero_grad_term" not in codes(found)  # pg is idle (no signal), not broken
    # with a KL the policy does move (Adam turns its round-off gradient into steps); the tied policy gradient is
    # still judged idle, never dead
    run = tinyrun.lora_kl_run(root, "lora-tied-kl", steps=3, tied=True)
    assert audits(run, "pg") == [(1, "inactive"), (2, "inactive"), (3, "idle")]
    assert "zero_grad_term" not in codes(findings(run))
    assert "trainable_unchanged" not in codes(findings(tinyrun.lora_kl_run(root, "lora-untied", steps=3)))


def test_repetition_and_entropy_collapse(root):
    run = tinyrun.repetition_run(root, "repetition")
    found = findings(run)
    rep = only(found, "repetition_collapse")[0]
    assert rep.severity == "failed" and "4" * 20 in rep.evidence["examples"][0]
    assert "entropy_collapse" in codes(found)
    assert {"repetition", "entropy_collapse"} <= {e["kind"] for e in RunFolder(run).events}  # raised online too


def test_encoder_and_output_collapse_from_question_independent_teacher(root):
    bad = findings(tinyrun.bridge_run(root, "bridge-prior", teacher_sees="prior"))
    enc = only(bad, "encoder_collapse")[0]
    assert enc.severity == "failed" and enc.evidence["values"][-1] > 0.99  # mean pairwise cosine
    out = only(bad, "output_collapse")
    assert {f.evidence["tag"] for f in out} == {"val@final", "test@final"}
    assert {f.severity for f in out} == {"failed"}  # 150 steps of training made it
    assert all(f.evidence["values"][3] == 1.0 for f in out)  # one answer for every question

    good = findings(tinyrun.bridge_run(root, "bridge-ok"))
    assert codes(good) == set(), [(f.severity, f.title) for f in good]


def test_bridge_without_controls(root):
    """Issue 17, 2c: a bridge run folder with no control evals at all is a failure, not silence."""
    f = only(findings(tinyrun.bridge_run(root, "bridge-no-controls", controls=False)), "controls_missing")
    assert len(f) == 1 and f[0].severity == "failed" and "no control evals at all" in f[0].title
    assert set(f[0].evidence["missing"]) == {"val@final", "test@final"}
    # its healthy twin (controls present and beaten, plus a reference eval of the source model alone, which is
    # neither the bridge nor a control and needs no controls of its own) stays quiet
    good = findings(tinyrun.bridge_run(root, "bridge-ok-source", source_alone=True))
    assert codes(good) == set(), [(x.severity, x.title) for x in good]
    assert len([e for e in RunFolder(root / "bridge-ok-source").evals if e.reference == "source_alone"]) == 2


def test_controls_failed_and_untrained_translator(root):
    """Soft tokens from a no_grad helper: the translator never trains and the bridge does not beat its controls."""
    found = findings(tinyrun.bridge_run(root, "bridge-nograd", translator_grad=False))
    ctl = only(found, "controls_failed")
    assert {f.evidence["steps"][0] for f in ctl} == {150} and len(ctl) == 2  # val and test
    assert all(set(f.evidence["controls"]) <= {"shuffled_source", "zero_source"} for f in ctl)
    unchanged = only(found, "trainable_unchanged")[0]
    assert unchanged.severity == "warning"  # the soft prompt did train
    assert set(unchanged.evidence["params"]) == {"translator.proj.weight", "translator.proj.bias"}


def test_frozen_module_that_still_moves(root):
    """zero_grad(set_to_none=False) after freezing: AdamW momentum and weight decay keep moving the decoder."""
    bad = only(findings(tinyrun.freeze_run(root, "freeze-bug", set_to_none=False)), "frozen_weights_changed")[0]
    assert bad.severity == "failed" and set(bad.evidence["params"]) == {"model.1.weight", "model.1.bias"}
    assert bad.evidence["steps"] == [40]

    good = findings(tinyrun.freeze_run(root, "freeze-ok"))
    assert not {"frozen_weights_changed", "trainable_unchanged"} & codes(good)


def test_generalization_gap_memorized_puzzle_ids(root):
    found = findings(tinyrun.memorize_run(root, "memorize"))
    gap = only(found, "generalization_gap")
    assert {f.evidence["split"] for f in gap} == {"val", "test"}
    assert all(f.evidence["values"][0] >= 0.95 and f.evidence["values"][1] < 0.06 for f in gap)


# ---------------------------------------------------------------------------------------------------------- evaluation


def test_no_measurable_improvement(root):
    """A learning rate a million times too small: the validation score at the end equals the one at step 0."""
    f = only(findings(tinyrun.classifier_run(root, "tiny-lr", lr=1e-7)), "no_improvement")
    assert len(f) == 1 and f[0].evidence["split"] == "val" and f[0].evidence["steps"] == [0, 60]
    assert "paired over n=500" in f[0].title


def test_heldout_ids_in_training_data(root):
    f = only(findings(tinyrun.classifier_run(root, "leak", leak=50)), "eval_leakage")
    assert len(f) == 1 and "50/500 test examples" in f[0].title and f[0].evidence["ids"][0] == "test/0"


def test_30_item_eval_is_underpowered(root):
    f = only(findings(tinyrun.classifier_run(root, "svamp-sized", n_test=30)), "underpowered_eval")
    assert len(f) == 1 and f[0].severity == "warning" and f[0].evidence["n"] == 30
    lo, hi = f[0].evidence["ci"]
    assert (hi - lo) / 2 > 0.1


def test_subset_score_divided_by_full_split(root):
    """TRM's evaluator: 32 of 400 items evaluated, correct count divided by 400."""
    found = findings(tinyrun.classifier_run(root, "subset", n_test=400, test_subset=32))
    f = only(found, "subset_denominator")[0]
    assert f.severity == "failed" and f.evidence["n_summary"] == 400 and f.evidence["n_records"] == 32
    assert "generalization_gap" not in codes(found)  # judged on the records, the model generalizes


def test_pass1_of_a_task_subset_divided_by_the_whole_split(root):
    """Issue 17, 2a: seed 004's evaluator for a headline metric other than accuracy: a TRM-style pass@1 over 32 of
    400 tasks, divided by 400 and reported with n=400. Caught, and the power check uses the 32 tasks evaluated."""
    found = findings(tinyrun.grid_run(root, "grid-subset-bug", subset=32, denominator="split"))
    f = only(found, "subset_denominator")[0]
    assert f.severity == "failed" and f.evidence["metric"] == "pass@1"
    assert (f.evidence["n_summary"], f.evidence["n_records"]) == (400, 32) and "32 evaluated tasks" in f.title
    assert f.evidence["values"][1] > 5 * f.evidence["values"][0]  # the subset's real score vs the diluted one
    power = only(found, "underpowered_eval")[0]
    assert power.evidence["n"] == 32

    honest = findings(tinyrun.grid_run(root, "grid-subset-honest", subset=32))  # same subset, divided by 32
    assert codes(honest) == {"underpowered_eval"} and only(honest, "underpowered_eval")[0].evidence["n"] == 32
    # every task evaluated; its outputs are grids, which printed as text repeat "3, 3, 3" and used to read as a
    # repetition collapse
    healthy = findings(tinyrun.grid_run(root, "grid-healthy"))
    assert codes(healthy) == set(), [(f.severity, f.title) for f in healthy]


def test_training_on_the_evaluation_tasks_demonstrations(root):
    """Issue 17, 2b: the evaluation tasks' demonstrations are training samples ('<task>/demo<j>'), the eval scores
    their test pairs ('<task>/<j>'): no id matches, the task does. It inflates the held-out score."""
    run = tinyrun.grid_run(root, "grid-demo-leak", eval_demos_trained=True)
    rf = RunFolder(run)
    test = rf.evals_for("test")[0]
    assert not test.ids() & rf.train_ids  # an id check alone sees nothing
    f = only(findings(run), "eval_leakage")
    assert len(f) == 1 and f[0].severity == "failed" and f[0].evidence["by"] == "task"
    assert "400/400 test tasks" in f[0].title
    clean = RunFolder(tinyrun.grid_run(root, "grid-healthy-2")).evals_for("test")[0]
    assert test.primary[1]["value"] > clean.primary[1]["value"] + 0.1  # what the leak buys

    declared = findings(tinyrun.grid_run(root, "grid-transductive", eval_demos_trained=True,
                                         split_mode="transductive"))
    assert codes(declared) == set()  # TRM's own protocol, said as such: not a failure
    assert only(declared, "transductive_eval")[0].severity == "info"


def test_long_run_without_evaluation_during_training(root):
    """Issue 17, 2e: seed 003's eval_frequency null: 500 steps with only the step-0 and final evals."""
    f = only(findings(tinyrun.classifier_run(root, "no-periodic-eval", steps=500, eval_every=0)), "no_periodic_eval")
    assert len(f) == 1 and f[0].severity == "warning" and "500 training steps (eval.every=0)" in f[0].title
    twin = findings(tinyrun.classifier_run(root, "periodic-eval", steps=500, eval_every=100))
    assert codes(twin) == set(), [(x.severity, x.title) for x in twin]


def test_pass_at_k_at_its_ceiling(root):
    """Issue 17, 2d: seed 002's pass@10 0.998: 10 samples scored by a checker that accepts nearly anything. pass@1
    has room, pass@10 does not: the eval cannot show a gain. The strict checker on the same samples stays quiet."""
    run = tinyrun.classifier_run(root, "lenient-pass10", eval_samples=10, lenient=True)
    f = only(findings(run), "eval_at_ceiling")[0]
    assert f.severity == "warning" and "pass@10" in f.title and f.evidence["values"][0] >= 0.98
    test = [e for e in RunFolder(run).evals_for("test") if e.final][0]
    assert test.primary[1]["value"] < 0.97  # pass@1 is not at the ceiling
    strict = findings(tinyrun.classifier_run(root, "strict-pass10", eval_samples=10))
    assert codes(strict) == set(), [(x.severity, x.title) for x in strict]


def test_run_killed_before_final_eval(root):
    run = tinyrun.killed_classifier_run(root, "killed", kill_at=30)
    found = findings(run)
    assert {"run_unfinished", "no_final_eval"} <= codes(found)
    f = only(found, "no_final_eval")[0]
    assert f.evidence["steps"] == [20, 30]  # last eval at step 20, killed at step 30
    assert overall_status(found)[0] == "warning"


def test_run_that_raised(root):
    with pytest.raises(RuntimeError, match="out of memory"):
        tinyrun.classifier_run(root, "crashed", crash_at=25)
    found = findings(root / "crashed")
    f = only(found, "run_failed")[0]
    assert f.severity == "failed" and "RuntimeError: CUDA out of memory (simulated at step 25)" in f.title
    assert only(found, "no_final_eval")[0].evidence["steps"] == [20, 24]
    assert overall_status(found)[0] == "failed"


def test_checkpoint_chosen_on_test(root):
    f = only(findings(tinyrun.classifier_run(root, "select-on-test", select_on="test")), "checkpoint_on_test")[0]
    assert "no validation evals" in f.title


# ---------------------------------------------------------------------------------------------------------- watcher


class _Events:
    def __init__(self):
        self.rows = []
        self._stop_reason = None

    def event(self, step, kind, message, severity="warning", **data):
        self.rows.append({"step": step, "kind": kind, "severity": severity, **data})


def test_watcher_patience_counts_consecutive_observations():
    run = _Events()
    w = Watcher(run, WatchConfig(stop_on=[], patience=2))
    dead = {"grad/term/a": 1.0, "grad/term/b": 0.0, "loss/term/a": 1.0, "loss/term/b": 0.2}
    live = {"grad/term/a": 1.0, "grad/term/b": 0.5, "loss/term/a": 1.0, "loss/term/b": 0.2}
    w.step(0, dead)
    w.step(1, {"train/loss": 1.0})  # no audit this step: neither confirms nor clears
    w.step(2, live)  # observed and alive: the streak restarts
    w.step(3, dead)
    assert run.rows == []
    w.step(4, {"train/loss": 1.0})
    w.step(5, dead)  # second consecutive audit with b dead
    assert [(r["step"], r["kind"], r["terms"]) for r in run.rows] == [(5, "zero_grad_term", ["b"])]
    w.step(6, live)
    assert run.rows[-1]["severity"] == "info" and run.rows[-1]["step"] == 6  # cleared


def test_one_thresholds_dataclass_for_watcher_and_report():
    """WatchConfig IS the report's Thresholds: a run's watch: section moves both the same way."""
    assert issubclass(WatchConfig, Thresholds)
    cfg = WatchConfig(stop_on=[], patience=1, ratio_explode=50.0)
    run = _Events()
    Watcher(run, cfg).step(1, {"ppo/ratio_max": 20.0})
    assert run.rows == []  # 20 < 50: not an explosion for this run
    Watcher(run, WatchConfig(stop_on=[], patience=1)).step(1, {"ppo/ratio_max": 20.0})
    assert [r["kind"] for r in run.rows] == ["ratio_explosion"]  # the default 5 would call it one
    th = thresholds_from_config({"watch": {"ratio_explode": 50, "min_eval_n": 30, "audit_every": 7}})
    assert (th.ratio_explode, th.min_eval_n) == (50.0, 30) and not hasattr(th, "audit_every")
    assert thresholds_from_config({"diagnostics": {"min_eval_n": 3}}).min_eval_n == 100  # no such section
