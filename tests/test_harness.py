"""Harness end-to-end on a tiny random model with generated arithmetic items; metrics from known records;
log-likelihood mode on a small MCQ task; the eval/summarize commands."""

import json

import pytest
import torch

from reasonlab.eval import harness as H
from reasonlab.tasks.base import Example, MCQTask

ARITH = dict(n_terms=3, digits=1, n_train=40, n_validation=5, n_test=8)


@pytest.fixture(scope="module")
def tiny():
    from reasonlab.models.lm import tiny_causal_lm

    torch.set_num_threads(2)
    model, tok = tiny_causal_lm(hidden=32, layers=1, heads=2, seed=0)
    return model.eval(), tok


def test_evaluate_end_to_end(tiny, tmp_path):
    model, tok = tiny
    records, summary = H.evaluate(model, tok, "arithmetic", split="test", limit=4, samples=3, temperature=1.0,
                                  max_new_tokens=5, chat=False, batch_size=6, progress=False, task_kwargs=ARITH)
    assert len(records) == 12 and {r["sample"] for r in records} == {0, 1, 2}
    r = records[0]
    for key in ("id", "prompt", "output", "extracted", "gold", "correct", "valid", "extractor", "extractions",
                "correct_by", "sample", "finish"):
        assert key in r
    assert r["extractor"] in r["extractions"] and len(r["extractions"]) >= 2  # all extractors side by side
    assert r["prompt"].endswith("Answer:")  # raw prompt (no chat template)
    m = summary["metrics"]
    for key in ("accuracy", "invalid_rate", "unique_answer_ratio", "answer_entropy_bits", "pass@1", "pass@2",
                "pass@3", "maj@3", "self_bleu", "distinct_1", "distinct_2", "truncation_rate"):
        assert {"value", "n", "lo", "hi"} <= set(m[key]), key
    assert m["accuracy"]["n"] == 4 and m["invalid_rate"]["n"] == 12
    # a random model solves nothing: every number is consistent with the records
    n_correct = sum(r["correct"] for r in records)
    assert m["pass@1"]["value"] == pytest.approx(n_correct / 12)
    assert m["invalid_rate"]["value"] == pytest.approx(sum(not r["valid"] for r in records) / 12)
    assert summary["task"] == "arithmetic" and summary["task_version"] and summary["n_examples"] == 4
    assert len(summary["prompt_template_sha256"]) == 64 and summary["generation"]["temperature"] == 1.0
    assert "sha" in summary["git"]
    jl, js = H.write_eval(tmp_path, "arith-test", records, summary)
    assert jl == tmp_path / "evals" / "arith-test.jsonl" and len(jl.read_text().splitlines()) == 12
    assert json.loads(js.read_text())["metrics"]["accuracy"]["n"] == 4
    assert "accuracy" in H.format_table(summary)
    # same seed -> same outputs
    again, _ = H.evaluate(model, tok, "arithmetic", split="test", limit=4, samples=3, temperature=1.0,
                          max_new_tokens=5, chat=False, batch_size=6, progress=False, task_kwargs=ARITH)
    assert [x["output"] for x in again] == [x["output"] for x in records]


def test_template_hash_tracks_layout_not_data(tiny):
    _, tok = tiny
    from reasonlab.tasks import get_task

    t = get_task("arithmetic", **ARITH)
    a = H.template_hash(t, tok, H.EvalSettings(chat=False))
    assert a == H.template_hash(get_task("arithmetic", **{**ARITH, "seed": 5}), tok, H.EvalSettings(chat=False))
    assert a != H.template_hash(t, tok, H.EvalSettings(chat=True))
    assert a != H.template_hash(t, tok, H.EvalSettings(chat=False, style="cot"))


def _rec(i, s, extracted, correct, output=None):
    return {"id": f"q{i}", "sample": s, "output": output or f"#### {extracted}", "extracted": extracted,
            "gold": "7", "correct": correct, "valid": extracted is not None, "extractor": "x@1", "finish": "eos",
            "new_tokens": 3, "correct_by": {"x@1": correct}}


def test_summary_catches_constant_answer_collapse():
    # the seed-001 failure: every output is "#### 1", right only where the gold happens to be 1
    recs = [_rec(i, 0, "1", i < 3) for i in range(50)]
    m = H.summarize_records(recs)["metrics"]
    assert m["accuracy"]["value"] == pytest.approx(3 / 50) and m["accuracy"]["method"] == "wilson"
    assert m["answer_entropy_bits"]["value"] == 0.0 and m["top_answer_share"]["value"] == 1.0
    assert m["unique_answer_ratio"]["value"] == pytest.approx(1 / 50)


def test_summary_multi_sample_metrics():
    recs = [_rec(0, 0, "7", True), _rec(0, 1, "7", True), _rec(0, 2, "3", False), _rec(0, 3, None, False),
            _rec(1, 0, "2", False), _rec(1, 1, "7", True), _rec(1, 2, "2", False), _rec(1, 3, "5", False)]
    m = H.summarize_records(recs)["metrics"]
    assert m["accuracy"]["value"] == pytest.approx((0.5 + 0.25) / 2) and m["accuracy"]["method"] == "bootstrap"
    assert m["pass@4"]["value"] == 1.0 and m["maj@4"]["value"] == 0.5  # q0 votes "7" (right), q1 votes "2"
    assert m["pass@2"]["value"] == pytest.approx(((1 - 1 / 6) + (1 - 3 / 6)) / 2)
    assert m["invalid_rate"]["value"] == pytest.approx(1 / 8)


class TinyMCQ(MCQTask):
    name, version, splits = "tiny-mcq", "0", ("test",)
    loglik_choices = "texts"

    def examples(self, split):
        return [Example("tiny-mcq/test/0", "Which is a colour?", "B", ["a table", "red", "seventeen"]),
                Example("tiny-mcq/test/1", "Pick a number.", "A", ["four", "blue sky", "dog"])]


def test_loglik_mode(tiny):
    model, tok = tiny
    records, summary = H.evaluate(model, tok, TinyMCQ(), split="test", chat=False, progress=False)
    assert summary["mode"] == "loglik" and len(records) == 2
    for r in records:
        ll = r["logliks"]
        best = max(range(3), key=lambda i: ll[i])
        best_norm = max(range(3), key=lambda i: ll[i] / len(r["choices"][i].strip()))
        assert r["extracted"] == "ABC"[best] and r["extractions"]["loglik-acc_norm@1"] == "ABC"[best_norm]
        assert r["correct"] == ("ABC"[best] == r["gold"])
    assert "accuracy/loglik-acc_norm@1" in summary["metrics"]


def test_settings_errors():
    with pytest.raises(ValueError, match="temperature"):
        H.EvalSettings(samples=4, temperature=0.0)
    with pytest.raises(ValueError, match="mode"):
        H.EvalSettings(mode="nope")


def test_cli_eval_and_summarize(tiny, tmp_path):
    import typer
    from typer.testing import CliRunner

    from reasonlab.eval.cli import eval_cmd, summarize_cmd

    model, tok = tiny
    model_dir = tmp_path / "tiny"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    app = typer.Typer()
    app.command("eval")(eval_cmd)
    app.command("summarize")(summarize_cmd)
    runner = CliRunner()
    res = runner.invoke(app, ["eval", "--model", str(model_dir), "--task", "arithmetic", "--limit", "3",
                              "--max-new-tokens", "4", "--no-chat", "--out", str(tmp_path / "out"), "--tag", "t1",
                              "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "accuracy" in res.output and (tmp_path / "out" / "evals" / "t1.json").is_file()
    res = runner.invoke(app, ["summarize", str(tmp_path / "out" / "evals" / "t1.jsonl")])
    assert res.exit_code == 0, res.output
    assert "invalid (no answer extracted):" in res.output and "gold matches" in res.output
    res = runner.invoke(app, ["eval", "--model", str(model_dir), "--task", "gsm8kk", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "gsm8k" in res.output
    res = runner.invoke(app, ["summarize", str(tmp_path / "out" / "evals" / "t1.json")])
    assert res.exit_code == 2 and "not an eval records file" in res.output


# ----------------------------------------------------------------------------- lm-eval's results file

# lm-eval v0.4.9, transcribed (EleutherAI/lm-evaluation-harness): lm_eval/tasks/gsm8k/gsm8k.yaml (the two filters and
# exact_match's settings), lm_eval/filters/extraction.py (RegexFilter, then take_first), lm_eval/api/metrics.py
# (exact_match_hf_evaluate, mean, mean_stderr); the file's keys: lm_eval/evaluator.py (results_dict, plus config /
# git_hash / date from simple_evaluate), evaluator_utils.py (prepare_print_tasks pops "samples"),
# loggers/evaluation_tracker.py (save_results_aggregated adds task_hashes and GeneralConfigTracker's fields)
LM_EVAL_GSM8K = {"strict-match": (r"#### (\-?[0-9\.\,]+)", 0), "flexible-extract": (r"(-?[$0-9.,]{2,})|(-?[0-9]+)", -1)}
LM_EVAL_IGNORE = [",", "\\$", "(?s).*#### ", "\\.$"]
LM_EVAL_KEYS = {"results", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better", "n-samples",
                "config", "git_hash", "date", "task_hashes", "model_source", "model_name", "model_name_sanitized",
                "system_instruction", "system_instruction_sha", "fewshot_as_multiturn", "chat_template",
                "chat_template_sha", "start_time", "end_time", "total_evaluation_time_seconds"}


def lm_eval_regex_filter(resp: str, pattern: str, group_select: int, fallback: str = "[invalid]") -> str:
    import re

    match = re.compile(pattern).findall(resp)
    if match:
        match = match[group_select]
        if isinstance(match, tuple):
            match = [m for m in match if m]
            match = match[0] if match else fallback
        return match.strip()
    return fallback


def lm_eval_exact_match(pred: str, ref: str) -> float:
    import re

    for s in LM_EVAL_IGNORE:
        pred, ref = re.sub(s, "", pred), re.sub(s, "", ref)
    return float(pred.lower() == ref.lower())  # ignore_case: true, ignore_punctuation: false


def lm_eval_mean_stderr(xs):
    import math

    mu = sum(xs) / len(xs)
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (len(xs) - 1)) / math.sqrt(len(xs))


def expected_lm_eval(outputs: list[str], answers: list[str]) -> dict:
    out = {}
    for name, (pattern, group) in LM_EVAL_GSM8K.items():
        scores = [lm_eval_exact_match(lm_eval_regex_filter(o, pattern, group), a) for o, a in zip(outputs, answers)]
        out[f"exact_match,{name}"] = sum(scores) / len(scores)
        out[f"exact_match_stderr,{name}"] = lm_eval_mean_stderr(scores)
    return out


def gsm8k_task():
    from conftest import SHARED_DATA
    from reasonlab.tasks import get_task

    if not (SHARED_DATA / "gsm8k" / "test.jsonl").is_file():
        pytest.skip(f"no GSM8K files under {SHARED_DATA}")
    return get_task("gsm8k", data_dir=SHARED_DATA)


def test_lm_eval_results_have_lm_evals_keys_and_values_for_gsm8k():
    """Outputs that strict-match and flexible-extract treat differently, scored by our gsm8k task and written in
    lm-eval's schema: each value is what lm-eval's own pipeline gives for the same outputs and the dataset's answers,
    including where lm-eval's string comparison and ours (numbers) disagree ("#### 18.00" vs gold 18)."""
    task = gsm8k_task()
    exs = task.examples("test")[:9]
    g = [e.gold for e in exs]
    outputs = [f"She pays 3 * 6.\n#### {g[0]}", f"The answer is {g[1]}.", f"#### {g[2]}.00", f"so ${g[3]}.",
               "I do not know", f"#### {int(g[5]) + 1}", f"{g[6]} apples, then 3 more", f"#### 1,{g[7]}",
               f"first 12, then #### {g[8]} dollars"]
    records = [H.score_record(task, e, o, prompt="p", finish="eos", new_tokens=3) for e, o in zip(exs, outputs)]
    for r in records:
        r["task"], r["split"] = "gsm8k", "test"
    summary = H.eval_summary(records, task, tag="t", n_examples=len(exs), split="test", limit=9, harness_version="1",
                             settings={"fewshot": 0, "chat": False, "seed": 0, "style": "default"},
                             generation={"stop": ["Question:"], "temperature": 0.0, "top_p": 1.0, "max_new_tokens": 8})
    out = H.lm_eval_results(records, summary, model_name="org/some-model", model_args="pretrained=org/some-model",
                            n_original=len(task.examples("test")))
    assert LM_EVAL_KEYS <= set(out)
    res = out["results"]["gsm8k"]
    assert res["alias"] == "gsm8k" and "samples" not in res
    want = expected_lm_eval(outputs, [e.meta["answer"] for e in exs])
    for key, value in want.items():
        assert res[key] == pytest.approx(value, abs=1e-12), key
    assert 0 < res["exact_match,strict-match"] < 1 and 0 < res["exact_match,flexible-extract"] < 1
    # our own summary compares numbers: "#### 18.00" is right there, wrong in lm-eval's (string) exact_match
    ours = summary["metrics"]["accuracy/strict-match@1"]["value"]
    assert ours == pytest.approx(res["exact_match,strict-match"] + 1 / 9)
    # what lm-eval's make_table reads: every metric with its stderr, a version, an n-shot, higher_is_better
    for key in res:
        if key != "alias" and "_stderr," not in key:
            m, _, f = key.partition(",")
            assert f"{m}_stderr,{f}" in res and out["higher_is_better"]["gsm8k"][m] is True
    assert out["n-shot"] == {"gsm8k": 0} and out["versions"]["gsm8k"] == task.version
    assert out["n-samples"]["gsm8k"] == {"original": 1319, "effective": 9}
    assert out["model_name_sanitized"] == "org__some-model"
    cfg = out["configs"]["gsm8k"]
    assert cfg["output_type"] == "generate_until" and cfg["generation_kwargs"]["until"] == ["Question:"]
    assert {f["name"] for f in cfg["filter_list"]} >= {"strict-match", "flexible-extract"}
    iv = out["reasonlab"]["intervals"]["gsm8k"]["exact_match,strict-match"]
    assert iv["n"] == 9 and iv["lo"] < res["exact_match,strict-match"] < iv["hi"]  # n and 95% CI, ours


def test_cli_eval_writes_lm_eval_results_for_gsm8k(tmp_path):
    """End to end: `reasonlab eval` on GSM8K writes evals/lm_eval/results_<tag>.json whose values are lm-eval's
    pipeline applied to the recorded outputs."""
    from typer.testing import CliRunner

    from conftest import SHARED_DATA
    from reasonlab.eval.cli import eval_cmd

    task = gsm8k_task()
    import typer

    app = typer.Typer()
    app.command("eval")(eval_cmd)
    app.command("other")(lambda: None)
    res = CliRunner().invoke(app, ["eval", "--model", "tiny-random", "--task", "gsm8k", "--data-dir", str(SHARED_DATA),
                                   "--limit", "3", "--max-new-tokens", "6", "--no-chat", "--device", "cpu",
                                   "--out", str(tmp_path), "--tag", "g"])
    assert res.exit_code == 0, res.output
    records = H.read_records(tmp_path / "evals" / "g.jsonl")
    out = json.loads((tmp_path / "evals" / "lm_eval" / "results_g.json").read_text())
    answers = {e.id: e.meta["answer"] for e in task.examples("test")[:3]}
    want = expected_lm_eval([r["output"] for r in records], [answers[r["id"]] for r in records])
    for key, value in want.items():
        assert out["results"]["gsm8k"][key] == pytest.approx(value), key
    assert out["model_name"] == "tiny-random" and out["config"]["model_args"] == "pretrained=tiny-random,dtype=float32"


def test_model_args_in_lm_evals_form():
    from reasonlab.errors import UserError

    got = H.parse_model_args("pretrained=org/m,revision=v1.0,dtype=bfloat16,peft=/a/b,trust_remote_code=True,step=20")
    assert got == {"pretrained": "org/m", "revision": "v1.0", "dtype": "bfloat16", "peft": "/a/b",
                   "trust_remote_code": True, "step": 20}
    assert H.parse_model_args(None) == {} and H.parse_model_args("") == {}
    with pytest.raises(UserError, match="did you mean 'revision'"):
        H.parse_model_args("revison=main")
    with pytest.raises(UserError, match="not key=value"):
        H.parse_model_args("bfloat16")
    with pytest.raises(UserError, match="dtype=fp8"):
        H.parse_model_args("dtype=fp8")
    src = H.resolve_model_source("tiny-random", H.parse_model_args("dtype=bfloat16"))
    assert (src.kind, src.base, src.dtype) == ("hf", "tiny-random", "bfloat16")
    with pytest.raises(UserError, match="disagree"):
        H.resolve_model_source("tiny-random", {"dtype": "bfloat16"}, "float16")
    with pytest.raises(UserError, match="hub ids"):
        H.load_model(H.resolve_model_source("smollm2-135m", {"revision": "main"}))


def test_non_tty_eval_log_puts_the_table_on_its_own_line(tmp_path):
    """stdout and stderr into one log file (no terminal): the progress bar's last state ends with a carriage
    return, so the table must still start on a line of its own."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    log = tmp_path / "log.txt"
    with open(log, "w") as f:
        p = subprocess.run([sys.executable, "-m", "reasonlab.cli", "eval", "--model", "tiny-random", "--task",
                            "arithmetic", "--limit", "2", "--max-new-tokens", "3", "--no-chat", "--device", "cpu",
                            "--out", str(tmp_path)], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=300,
                           env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    text = log.read_bytes().decode()  # not read_text(): universal newlines would turn the carriage returns into lines
    assert p.returncode == 0, text
    assert "generate" in text  # the bar was drawn into the log
    head = next(line for line in text.split("\n") if "arithmetic [test] model=tiny-random" in line)
    assert head.startswith("arithmetic [test]"), repr(head)


@pytest.mark.parametrize("polled", [False, True])
def test_a_chat_prompt_is_templated_once_and_decoded_as_recorded(tiny, monkeypatch, polled):
    """The recorded prompt is what the model reads: the chat template is applied once (it was applied twice, a
    system turn and a user turn nested inside the user turn), with and without the stop flag's batch polling."""
    from reasonlab.eval import generate as G

    model, tok = tiny
    monkeypatch.setattr(tok, "chat_template", "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                                              "{% if add_generation_prompt %}<assistant>{% endif %}", raising=False)
    read = []
    real = G._decode_stream
    monkeypatch.setattr(G, "_decode_stream", lambda m, t, prompts, *a, **k: read.extend(prompts) or
                        real(m, t, prompts, *a, **k))
    records, _ = H.evaluate(model, tok, "arithmetic", split="test", limit=2, max_new_tokens=3, chat=True,
                            progress=False, task_kwargs=ARITH, stop=(lambda: False) if polled else None)
    assert records[0]["prompt"].startswith("<user>") and records[0]["prompt"].count("<user>") == 1
    assert sorted(tok.decode(x) for x in read) == sorted(r["prompt"] for r in records)
