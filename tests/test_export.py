"""`reasonlab export` and `reasonlab eval --model <run | export>` on a real tiny LoRA run (the sft recipe, tiny-random
model, model.lora.r=4) and a real tiny TRM run: the merged folder loads in plain transformers with the lab's logits,
the run folder and its exports evaluate to identical records, the adapter loads in plain PEFT, TRM exports load back
bit for bit, and every bad input is one line, exit 2, with nothing written."""

import json
import warnings
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import ROOT
from reasonlab.cli import app

STEPS = 8


def invoke(*args):
    res = CliRunner().invoke(app, [str(a) for a in args])
    return res


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """The sft recipe with LoRA, trained in this process with every warning recorded (FutureWarnings are checked in
    test_no_future_warning_from_a_tiny_lora_run)."""
    from reasonlab.config import load_config
    from reasonlab.methods import sft
    from reasonlab.runs import Run

    root = tmp_path_factory.mktemp("lora")
    cfg = load_config(ROOT / "configs" / "sft" / "arithmetic-tiny.yaml",
                      ["model.lora.r=4", "train.lr=0.02", f"train.steps={STEPS}", "eval.every=4", "train.threads=1",
                       "tracking.tensorboard=false"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = Run(cfg, root / "run", install_signals=False, command=["reasonlab", "run", "arithmetic-tiny.yaml",
                                                                       "model.lora.r=4"])
        run.finish(results=sft.main(cfg, run))
    return run.dir, caught


def test_no_future_warning_from_a_tiny_lora_run(lora_run):
    _, caught = lora_run
    future = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught if issubclass(w.category, FutureWarning)]
    assert future == []


def lab_model(run_dir, step=None):
    from reasonlab.export import build_lm, open_run, run_checkpoint

    cfg, rd = open_run(run_dir)
    return build_lm(cfg, run_checkpoint(rd, step))


def logits(model, tok, texts):
    batch = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


TEXTS = ["What is 12 + 34? Answer:", "Question: 7 + 5 =", "hello"]


def test_merged_export_is_a_plain_transformers_model_with_the_labs_logits(lora_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from reasonlab.models.lm import tiny_causal_lm

    run_dir, _ = lora_run
    out = tmp_path / "merged"
    res = invoke("export", run_dir, "--step", STEPS, "--merge", "--out", out)
    assert res.exit_code == 0, res.output
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "README.md", "reasonlab_export.json"):
        assert (out / name).is_file(), name
    assert not list(out.glob("adapter_*")) and not list(tmp_path.glob(".tmp-*"))
    lab, tok = lab_model(run_dir, STEPS)
    plain = AutoModelForCausalLM.from_pretrained(out).eval()  # no reasonlab, no PEFT
    plain_tok = AutoTokenizer.from_pretrained(out)
    plain_tok.padding_side = "left"
    assert plain_tok(TEXTS)["input_ids"] == tok(TEXTS)["input_ids"]
    a, b = logits(lab, tok, TEXTS), logits(plain, tok, TEXTS)
    assert (a - b).abs().max().item() < 1e-5
    base, _ = tiny_causal_lm()
    assert (logits(base.eval(), tok, TEXTS) - b).abs().max().item() > 1e-3  # the adapter trained: not the base
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.eos_token_id
    meta = json.loads((out / "reasonlab_export.json").read_text())
    assert meta["kind"] == "merged" and meta["step"] == STEPS and meta["checkpoint"] == f"step_{STEPS}"
    card = (out / "README.md").read_text()
    assert "| val_step0 | val | 0 | accuracy |" in card and "n=" not in card.split("## Evaluation")[0]
    assert "[0.000, 0.324] | 8 | wilson |" in card  # every number with its 95% CI and n
    assert "reasonlab run arithmetic-tiny.yaml model.lora.r=4" in card and "lora:\n    r: 4" in card


# the test's own plain-PEFT call reads transformers' deprecated alias (reasonlab's calls filter exactly that warning)
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_adapter_export_loads_in_plain_peft(lora_run, tmp_path):
    from peft import PeftModel

    from reasonlab.models.lm import tiny_causal_lm

    run_dir, _ = lora_run
    out = tmp_path / "adapter"
    res = invoke("export", run_dir, "--step", STEPS, "--out", out)
    assert res.exit_code == 0, res.output
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= {p.name for p in out.iterdir()}
    assert not (out / "model.safetensors").exists()
    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["r"] == 4 and conf["base_model_name_or_path"] == "tiny-random"
    lab, tok = lab_model(run_dir, STEPS)
    base, _ = tiny_causal_lm()  # tiny-random is reasonlab's seeded model: PEFT gets it from us
    peft = PeftModel.from_pretrained(base, out).eval()
    assert (logits(lab, tok, TEXTS) - logits(peft, tok, TEXTS)).abs().max().item() < 1e-6


def records_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_eval_of_the_run_folder_equals_eval_of_its_exports(lora_run, tmp_path):
    """`--model RUN` (checkpoints/best, the validation choice) and `--model EXPORT` of the same checkpoint give the
    same records; so do `--model RUN --model_args step=N` and the merged and adapter exports of step N."""
    run_dir, _ = lora_run
    best = json.loads((run_dir / "checkpoints" / "best" / "state.json").read_text())["step"]
    exports = {}
    for name, extra in (("best-merged", ["--merge"]), ("step-merged", ["--step", STEPS, "--merge"]),
                        ("step-adapter", ["--step", STEPS])):
        exports[name] = tmp_path / name
        res = invoke("export", run_dir, *extra, "--out", exports[name])
        assert res.exit_code == 0, res.output
    common = ["--task", "arithmetic", "--limit", "6", "--max-new-tokens", "6", "--no-chat", "--device", "cpu",
              "--out", tmp_path / "ev"]
    evals = {"run-best": [run_dir], "run-step": [run_dir, "--model_args", f"step={STEPS}"],
             **{k: [v] for k, v in exports.items()}}
    recs, summ = {}, {}
    for tag, model in evals.items():
        res = invoke("eval", "--model", *model, *common, "--tag", tag)
        assert res.exit_code == 0, res.output
        recs[tag] = records_of(tmp_path / "ev" / "evals" / f"{tag}.jsonl")
        summ[tag] = json.loads((tmp_path / "ev" / "evals" / f"{tag}.json").read_text())
        assert (tmp_path / "ev" / "evals" / "lm_eval" / f"results_{tag}.json").is_file()
    assert len(recs["run-best"]) == 6
    assert recs["run-best"] == recs["best-merged"]
    assert recs["run-step"] == recs["step-merged"] == recs["step-adapter"]
    assert summ["run-best"]["model_source"] == {"kind": "run", "run": str(run_dir), "checkpoint": "best",
                                                "step": best, "base_model": "tiny-random", "lora": True}
    assert summ["run-step"]["model_source"]["checkpoint"] == f"step_{STEPS}"
    assert summ["step-adapter"]["model_source"]["export_kind"] == "adapter"
    assert summ["run-step"]["model_args"] == f"pretrained={run_dir},dtype=float32,step={STEPS}"


def one_line_exit_2(res, *needles):
    assert res.exit_code == 2, res.output
    lines = [x for x in res.output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    for n in needles:
        assert n in lines[0], lines[0]


def test_bad_export_input_is_one_line_exit_2_and_writes_nothing(lora_run, tmp_path, monkeypatch):
    run_dir, _ = lora_run
    out = tmp_path / "x" / "out"
    one_line_exit_2(invoke("export", tmp_path, "--out", out), "not a run folder")
    one_line_exit_2(invoke("export", run_dir, "--step", 999, "--out", out), "no checkpoint of step 999",
                    f"steps [{STEPS}]")
    one_line_exit_2(invoke("export", run_dir, "--step", STEPS, "--best", "--out", out), "not both")
    afile = tmp_path / "afile"
    afile.write_text("x")
    one_line_exit_2(invoke("export", run_dir, "--out", afile), "is a file")
    full = tmp_path / "x" / "nonempty"
    full.mkdir(parents=True)
    (full / "keep.txt").write_text("mine")
    one_line_exit_2(invoke("export", run_dir, "--out", full), "not empty")
    assert [p.name for p in full.iterdir()] == ["keep.txt"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    one_line_exit_2(invoke("export", run_dir, "--out", out, "--push-to-hub", "me/tiny"), "HF_HUB_OFFLINE=1",
                    "huggingface-cli upload me/tiny")
    one_line_exit_2(invoke("export", run_dir, "--out", out, "--push-to-hub", "no-slash"), "owner/name")
    fullft = tmp_path / "fullft"  # a run that trained every weight: nothing to merge
    fullft.mkdir()
    (fullft / "config.yaml").write_text((run_dir / "config.yaml").read_text().replace("r: 4", "r: 0"))
    one_line_exit_2(invoke("export", fullft, "--merge", "--out", out), "--merge", "trained every weight")
    assert not out.exists() and not list(out.parent.glob(".tmp-*"))
    assert afile.read_text() == "x"
    # eval of what is no model: one line, before anything loads
    one_line_exit_2(invoke("eval", "--model", run_dir, "--model_args", "step=999", "--task", "arithmetic"),
                    "no checkpoint of step 999")
    one_line_exit_2(invoke("eval", "--model", run_dir, "--model_args", "revsion=main", "--task", "arithmetic"),
                    "did you mean 'revision'")
    one_line_exit_2(invoke("eval", "--model", "tiny-random", "--model_args", "step=3", "--task", "arithmetic"),
                    "not one")


@pytest.fixture(scope="module")
def trm_run(tmp_path_factory):
    from reasonlab.config import load_config
    from reasonlab.methods import trm
    from reasonlab.runs import Run

    cfg = load_config(ROOT / "configs" / "trm" / "sudoku4-tiny.yaml", ["tracking.tensorboard=false"])
    run = Run(cfg, tmp_path_factory.mktemp("trm") / "run", install_signals=False)
    run.finish(results=trm.main(cfg, run))
    return run.dir


def test_trm_export_is_safetensors_and_config_that_load_back(trm_run, tmp_path):
    from reasonlab.export import load_trm_export
    from reasonlab.runs import open_checkpoint

    out = tmp_path / "trm"
    res = invoke("export", trm_run, "--out", out)
    assert res.exit_code == 0, res.output
    assert {"model.safetensors", "config.json", "README.md", "reasonlab_export.json"} <= {p.name for p in out.iterdir()}
    conf = json.loads((out / "config.json").read_text())
    assert conf["architecture"] == "trm" and conf["trm"]["vocab_size"] == 6 and conf["trm"]["seq_len"] == 16
    assert conf["tokens"].startswith("0 PAD, 1 blank")
    model, encoder, _ = load_trm_export(out)
    saved = open_checkpoint(trm_run / "checkpoints" / "best").tensors("module.model")
    own = model.state_dict()
    assert set(own) == set(saved) and all(torch.equal(own[k], saved[k]) for k in saved) and encoder is None
    card = (out / "README.md").read_text()
    assert "| test_best_step" in card and "pass@1" in card and "method: trm" in card
    one_line_exit_2(invoke("export", trm_run, "--merge", "--out", tmp_path / "m"), "--merge", "trm run")
    one_line_exit_2(invoke("eval", "--model", out, "--task", "arithmetic"), "not a language model")
    one_line_exit_2(invoke("eval", "--model", trm_run, "--task", "arithmetic"), "not a language model")
    assert not (tmp_path / "m").exists()
