"""`reasonlab report` and `reasonlab compare` on real tiny runs: the sft recipe with the tiny-random model, and the
tiny loops of tests/tinyrun.py. The report must say the status, give every number with n and a 95% CI, and its plots
must be real PNG files."""

import json
import re
import struct

import pytest
from matplotlib.image import imread

import tinyrun
from conftest import cli, only_run_dir
from reasonlab.diagnostics.compare import compare_runs
from reasonlab.diagnostics.report import make_report, write_report
from reasonlab.eval.metrics import compare_eval_files

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    width, height = struct.unpack(">II", data[16:24])  # IHDR
    assert width >= 300 and height >= 200, (path, width, height)
    pixels = imread(path)  # decodes: the file is a whole image, not just a header
    assert pixels.shape[:2] == (height, width) and pixels.std() > 0  # something is drawn


def linked_plots(report_md, run_dir):
    links = re.findall(r"!\[[^\]]*\]\((plots/[^)]+\.png)\)", report_md)
    assert links, "the report links no plots"
    for rel in links:
        assert_png(run_dir / rel)
    return {p.split("/")[-1][:-4] for p in links}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def sft_run(root):
    """The real sft recipe (tiny-random model, arithmetic) via `reasonlab run`, which writes report.md at the end."""
    p = cli("run", "configs/sft/arithmetic-tiny.yaml", "tracking.tensorboard=false", "--out", str(root / "sft"))
    run_dir = only_run_dir(root / "sft")
    assert f"report: {run_dir / 'report.md'} (status warning: " in p.stdout
    assert (run_dir / "report.md").read_text().startswith(f"# Run report: {run_dir.name}")
    return run_dir


def test_report_cli_on_real_sft_run(sft_run):
    p = cli("report", str(sft_run))
    assert p.stdout.startswith("status: WARNING: ")  # 8-item evals are underpowered, and the report says so
    assert "underpowered_eval" in p.stdout and f"wrote {sft_run / 'report.md'}" in p.stdout
    assert "no_improvement" in p.stdout  # 6 steps of a random model: validation stays at 0
    md = (sft_run / "report.md").read_text()
    assert "**Status: WARNING**" in md
    # results: peak -> final for validation and test, each with a 95% CI and n
    rows = [line for line in md.splitlines() if line.startswith("| val |") or line.startswith("| test |")]
    assert len(rows) == 2 and all(re.search(r"\d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\] n=8 @ step \d", r) for r in rows)
    for section in ("## Results", "## Findings", "## Sample outputs", "## Plots", "## Config", "## Reproduce"):
        assert section in md, section
    assert "**invalid (no answer extracted)**" in md  # the untrained model's outputs, shown as they are
    assert f"reasonlab run {sft_run / 'config.yaml'}" in md
    assert {"loss", "accuracy"} <= linked_plots(md, sft_run)
    assert (sft_run / "findings.json").exists()


def test_recipe_end_hook_writes_report_of_healthy_run(root):
    run = tinyrun.classifier_run(root, "healthy-report", report=True)  # write_report(run.dir) as a recipe's last step
    md = (run / "report.md").read_text()
    assert "**Status: HEALTHY** — no detector fired" in md and "No detector fired." in md
    assert re.search(r"\| test \| teacher \| acc \| .* n=500 @ step \d+ \(test@final\)", md)
    # the audited terms: value share next to gradient share
    assert re.search(r"\| ce \| 1 \| \d+\.\d% \| \d+\.\d% \|", md) and "| entropy | 0.05 |" in md
    assert {"loss", "accuracy", "grad_terms", "encoder"} <= linked_plots(md, run)
    # every interval says how it was computed
    assert re.search(r"\| test \| teacher \| acc \| .* \| wilson \|", md)
    assert "CI methods: `wilson` = Wilson score interval over units" in md


def test_report_honours_the_runs_watch_thresholds(root):
    """The run's own watch: section is the report's thresholds (one dataclass, reasonlab.watch.Thresholds): a 30-item
    test judged with min_eval_n 20 and a 20-point half-width allowance is not underpowered; --set overrides on top."""
    run = tinyrun.classifier_run(root, "own-thresholds", n_test=30, watch={"min_eval_n": 20, "ci_halfwidth_max": 0.2})
    p = cli("report", str(run))
    assert p.stdout.startswith("status: HEALTHY") and "underpowered_eval" not in p.stdout, p.stdout
    md = (run / "report.md").read_text()
    assert "Thresholds from the run's `watch:` section: ci_halfwidth_max=0.2, min_eval_n=20." in md
    p = cli("report", str(run), "--set", "min_eval_n=100")
    assert p.stdout.startswith("status: WARNING") and "underpowered_eval" in p.stdout
    assert "Thresholds overridden for this report: min_eval_n=100." in (run / "report.md").read_text()
    p = cli("report", str(run), "--set", "min_evl_n=3", check=False)
    assert p.returncode == 2 and "did you mean 'min_eval_n'" in p.stderr and p.stderr.strip().count("\n") == 0


def test_report_of_kl_run_at_its_reference_point(root):
    """The false alarm of issue 17: a LoRA run audited at initialisation only. Healthy, and the loss-term table says
    the KL was not yet active rather than dead."""
    run = tinyrun.lora_kl_run(root, "kl-report", steps=3, audit_every=1000)
    md = write_report(run).read_text()
    assert "**Status: HEALTHY**" in md and "term_not_yet_active" in md
    row = next(line for line in md.splitlines() if line.startswith("| kl |"))
    assert row.rstrip().endswith("| 1 not yet active |"), row


def test_report_of_a_3_step_etrm_run_calls_nothing_failed(root, tmp_path):
    """The real TRM recipe, ETRM on a small grid-rules split, 3 steps: an untrained model scoring 0 like its
    shuffled-demos control, printing grids. Nothing in that is a failure (before issue 17 the control comparison
    was one)."""
    from reasonlab.config import load_config
    from reasonlab.methods import trm
    from reasonlab.runs import Run

    spec = {"method": "trm", "seed": 0,
            "data": {"task": "grid-rules", "task_args": {"n_train": 24, "n_val": 12, "n_heldout": 12,
                                                        "heldout_rules": 4, "max_size": 5},
                     "n_aug": 1, "dihedral": False, "translate": False, "canvas": 6, "max_demos": 3,
                     "test_split": "heldout"},
            "model": {"conditioning": "encoder", "hidden_size": 32, "num_heads": 2, "num_layers": 1, "expansion": 2,
                      "ffn_multiple": 16, "H_cycles": 2, "L_cycles": 1, "pos_encodings": "learned",
                      "puzzle_emb_len": 2, "halt_max_steps": 2},
            "train": {"steps": 3, "lr": 1e-3, "encoder_lr": 1e-3, "batch_size": 6, "log_every": 1, "threads": 1},
            "eval": {"every": 0, "train_limit": 12, "ks": [1, 2], "batch_size": 16},
            "watch": {"audit_every": 1}, "tracking": {"tensorboard": False}}
    path = tmp_path / "etrm.yaml"
    path.write_text(json.dumps(spec))
    cfg = load_config(path)
    run = Run(cfg, root / "etrm-3", install_signals=False)
    run.finish(results=trm.main(cfg, run))
    rep = make_report(run.dir)
    assert rep.status == "warning", rep.reason
    assert {f.code for f in rep.findings if f.severity != "info"} == {"underpowered_eval", "controls_failed"}
    assert all("scores 0 like its controls" in f.explanation for f in rep.findings if f.code == "controls_failed")
    md = rep.path.read_text()
    assert re.search(r"\| test \| grid-rules \| pass@1 \| .* n=12 @ step 3 .* \| wilson \|", md)


def test_report_of_zero_gradient_run_separates_value_and_gradient_share(root):
    run = tinyrun.classifier_run(root, "float-diversity", extra_term="float_diversity")
    md = write_report(run).read_text()
    assert "**Status: FAILED** — loss term 'float_diversity' has non-zero weight but zero gradient" in md
    row = next(line for line in md.splitlines() if line.startswith("| float_diversity |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert float(cells[2].rstrip("%")) > 5 and cells[3] == "0.0%" and cells[5] == "7/7"  # value > 0, gradient 0
    assert "grad_terms" in linked_plots(md, run)


def test_report_plots_for_rl_and_bridge_runs(root):
    ppo = tinyrun.ppo_run(root, "ppo-report", ratio_against="base", stop_on=("ratio_explosion",))
    md = write_report(ppo).read_text()
    assert {"ratio", "reward"} <= linked_plots(md, ppo)
    assert "## Alerts raised while training (events.jsonl)" in md and "| ratio_explosion | error |" in md

    rep = tinyrun.repetition_run(root, "repetition-report")
    assert "rollout" in linked_plots(write_report(rep).read_text(), rep)

    bridge = tinyrun.bridge_run(root, "bridge-report", translator_grad=False)
    md = write_report(bridge).read_text()
    assert "encoder" in linked_plots(md, bridge)
    ctl = [line for line in md.splitlines() if line.startswith("| test@final | shuffled_source |")]
    assert len(ctl) == 1 and re.search(r"\| [+-]\d\.\d{3} \[[+-]\d\.\d{3}, [+-]\d\.\d{3}\] \| \d\.\d{4} \| 256 \|",
                                       ctl[0])


def test_report_of_run_that_died_early(root):
    """A process that logged three steps and died: no summary, no evals, no checkpoints."""
    with tinyrun.one_thread():
        run = tinyrun.open_run(root, "died", "classifier", steps=100, lr=0.1)
        for step in range(1, 4):
            run.log(step, {"train/loss": 2.0 / step})
        run.close()  # no finish(): the process is gone
    md = write_report(run.dir).read_text()
    assert "unfinished: no summary.json (killed or still running), last logged step 3" in md
    assert "No evaluations in evals/" in md and "run_unfinished" in md
    assert {"loss"} == linked_plots(md, run.dir)


def test_compare_cli_prints_paired_bootstrap_table(root, tmp_path):
    a = tinyrun.classifier_run(root, "cmp-lr0.2", lr=0.2)
    b = tinyrun.classifier_run(root, "cmp-lr0.05", lr=0.05)
    p = cli("compare", str(a), str(b), "--out", str(tmp_path / "cmp"))
    out = p.stdout
    assert "paired bootstrap on shared eval items" in out
    for split in ("val", "test"):
        d = compare_eval_files(a / "evals" / f"{split}@final.jsonl", b / "evals" / f"{split}@final.jsonl",
                               n_boot=10_000, seed=0)
        row = next(line for line in out.splitlines() if line.startswith(f"{split} ") and "cmp-lr0.05" in line)
        assert f"{d.diff:+.3f} [{d.lo:+.3f}, {d.hi:+.3f}]" in row and f"{d.p_value:.4f}" in row and " 500 " in row
    diff_row = next(line for line in out.splitlines() if line.startswith("train.lr"))
    assert "0.2" in diff_row and "0.05" in diff_row
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "## Paired bootstrap on shared eval items" in md
    for rel in re.findall(r"\((plots/[^)]+\.png)\)", md):
        assert_png(tmp_path / "cmp" / rel)
    assert len(re.findall(r"\((plots/[^)]+\.png)\)", md)) == 2  # loss and accuracy overlays


def test_compare_without_shared_items_says_so(root, sft_run, tmp_path):
    healthy = tinyrun.classifier_run(root, "cmp-other-task")
    c = compare_runs([sft_run, healthy], out=tmp_path / "c2", n_boot=1000)
    assert [r.note for r in c.pairs] == ["no shared example ids: different tasks or splits"] * 2
    assert any(row[0] == "method" for row in c.config_rows)


def test_cli_errors_are_one_line(tmp_path):
    p = cli("report", str(tmp_path / "nope"), check=False)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "is not a run folder" in p.stderr
    p = cli("compare", str(tmp_path), check=False)
    assert p.returncode == 2 and "at least two run folders" in p.stderr
    p = cli("report", str(tmp_path), "--fail-on", "sometimes", check=False)
    assert p.returncode == 2 and "--fail-on" in p.stderr


def test_compare_pairs_set_metrics_of_multi_sample_evals(tmp_path):
    """Several samples per question: pass@1, pass@k, distinct-correct@k, Distinct-2 and Self-BLEU are paired per
    question."""
    from reasonlab.diagnostics.compare import set_metric_pairs
    from reasonlab.diagnostics.runfolder import EvalFile
    from reasonlab.eval import diversity as D
    from reasonlab.eval.metrics import pass_at_k

    def write(name, rows):
        p = tmp_path / f"{name}.jsonl"
        p.write_text("".join(json.dumps({"id": q, "sample": i, "correct": c, "output": o}) + "\n"
                             for q, samples in rows.items() for i, (c, o) in enumerate(samples)))
        return EvalFile(f"test@{name}", {"split": "test"}, p)

    a = write("a", {"q1": [(1, "1 + 2 = 3"), (1, "1 + 2 = 3"), (0, "4")], "q2": [(0, "x y"), (0, "x y"), (0, "x y")]})
    b = write("b", {"q1": [(1, "2 + 1 = 3"), (1, "1 + 2 = 3"), (1, "3 = 3")], "q2": [(1, "y x z"), (0, "a b"), (0, "c d")],
                    "q3": [(1, "5"), (1, "5")]})
    pairs = set_metric_pairs(a, b)
    # k = the smaller sample count; no n_solutions in the records, so distinct-correct but no coverage
    assert sorted(pairs) == ["distinct_2", "distinct_correct@2", "pass@1", "pass@2", "self_bleu"]
    assert pairs["distinct_correct@2"][0] == {"q1": pytest.approx(pass_at_k(3, 2, 2)), "q2": 0.0}
    ma, mb = pairs["pass@1"]
    assert ma == {"q1": 2 / 3, "q2": 0.0} and mb == {"q1": 1.0, "q2": 1 / 3, "q3": 1.0}
    assert pairs["pass@2"][0]["q1"] == pytest.approx(pass_at_k(3, 2, 2)) and pairs["pass@2"][1]["q2"] == pytest.approx(
        pass_at_k(3, 1, 2))
    assert pairs["distinct_2"][1]["q2"] == pytest.approx(D.distinct_n(["y x z", "a b", "c d"], 2))
    assert pairs["self_bleu"][0]["q2"] == pytest.approx(D.self_bleu(["x y"] * 3))
    one = write("one", {"q1": [(1, "3")], "q2": [(0, "4")]})
    assert set_metric_pairs(one, b) == {}  # one sample per question: accuracy only


def test_test_peak_note_only_when_an_earlier_test_eval_beats_the_final(root):
    """A before-training baseline on test plus the final test eval: the final is the peak, so nothing is flagged; a
    final below an earlier test eval is flagged as an optimistic peak."""
    for name, base_preds in (("final-is-peak", [0, 1, 1, 1]), ("earlier-peak", [0, 0, 0, 0])):
        run = tinyrun.open_run(root, name, "classifier", steps=1, lr=0.1)
        golds = [0, 0, 0, 0]
        tinyrun.write_eval(run, "test_base_step0", range(4), base_preds, golds, split="test", step=0)
        tinyrun.write_eval(run, "test_final", range(4), [0, 0, 1, 1], golds, split="test", step=1, final=True)
        run.finish(results={})
        text = write_report(run.dir).read_text()
        row = next(line for line in text.splitlines() if line.startswith("| test |"))
        assert ("optimistic" in row) == (name == "earlier-peak"), row


@pytest.fixture(scope="module")
def sudoku_run(root):
    """The real TRM recipe on 4x4 sudoku (configs/trm/sudoku4-tiny.yaml: eval.ks [1]), with what it printed."""
    import contextlib
    import io

    from conftest import ROOT
    from reasonlab.config import load_config
    from reasonlab.methods import trm
    from reasonlab.runs import Run

    cfg = load_config(ROOT / "configs" / "trm" / "sudoku4-tiny.yaml", ["tracking.tensorboard=false"])
    run = Run(cfg, root / "sudoku4", install_signals=False)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        run.finish(results=trm.main(cfg, run))
    return run.dir, printed.getvalue()


def test_sudoku_report_shows_digits_and_the_recipe_prints_only_its_ks(sudoku_run):
    run_dir, printed = sudoku_run
    assert "pass@2" not in printed and "test test" not in printed  # eval.ks: [1]; the split named once
    assert "\ntest split (checkpoint chosen on val, step " in printed
    assert re.search(r"step \d+: val exact .* pass@1 \d\.\d{3} over 8 tasks", printed)
    md = make_report(run_dir).path.read_text()
    samples = md.split("## Sample outputs")[1].split("\n## ")[0]
    golds = re.findall(r"gold `([^`]*)`", samples)
    assert golds and all(re.fullmatch(r"[1-4]{4}( / [1-4]{4}){3}", g) for g in golds), golds  # solutions: digits
    blocks = re.findall(r"```text\n(.*?)\n```", samples, re.S)
    assert blocks and all(re.fullmatch(r"([1-4._]{4}\n){3}[1-4._]{4}(\n\(\+\d+ lower-ranked candidates\))?", b)
                          for b in blocks), blocks
    assert "[2, " not in samples and "[[" not in samples  # no token ids


def test_accuracy_legend_lists_what_is_drawn_and_grad_legend_leaves_the_data_free(sudoku_run, monkeypatch, tmp_path):
    from matplotlib.container import ErrorbarContainer

    from reasonlab.diagnostics import plots
    from reasonlab.diagnostics.runfolder import RunFolder

    run_dir, _ = sudoku_run
    figs = {}
    monkeypatch.setattr(plots, "_save", lambda fig, path: figs.setdefault(path.stem, fig) and path)
    rf = RunFolder(run_dir)
    plots.plot_accuracy(rf, tmp_path / "accuracy.png")
    plots.plot_grad_terms(rf, tmp_path / "grad_terms.png")
    ax = figs["accuracy"].axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert not any("CI" in label for label in labels), labels  # the bands are no legend entries
    assert any(label.startswith("val pass@1") for label in labels) and any(x.startswith("test") for x in labels)
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert {c.get_label().split()[0] for c in bars} == {"test", "train"}  # one eval each: the CI as an error bar
    fig = figs["grad_terms"]
    fig.tight_layout()
    fig.canvas.draw()
    for a in fig.axes:
        leg, box = a.get_legend().get_window_extent(), a.get_window_extent()
        assert leg.x0 >= box.x1, (leg, box)  # right of the axes, over none of the lines or bars
        assert leg.x1 <= fig.bbox.x1 + 1  # and still inside the picture
