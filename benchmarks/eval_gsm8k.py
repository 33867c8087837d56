"""`reasonlab eval`'s generation path vs lm-eval's hf backend on the same GSM8K test items, in one process.

Both sides get the same model folder (the embedded SmolLM2-135M, fp32), the same prompt strings (our gsm8k task's
lm-eval layout "Question: {q}\\nAnswer:", raw, no chat template), greedy decoding, lm-eval gsm8k.yaml's `until`
("Question:", "</s>", "<|im_end|>", plus EOS) and the same token budget. lm-eval runs `HFLM.generate_until` on its
length-sorted batches (--lm-eval-batch); ours runs the harness (reasonlab.eval.harness.evaluate, what `reasonlab
eval` calls) with --batch rows (continuous batching). Prints items/s of each, the ratio, and the per-item
comparison: the outputs, lm-eval's own strict-match / flexible-extract filters applied to both outputs, and our
extractors applied to both. They must agree item for item; the script exits 1 when they do not.

    pip install "reasonlab[bench]"    # lm-eval 0.4.13 (benchmark-only extra)
    HF_HUB_OFFLINE=1 python benchmarks/eval_gsm8k.py [--items 64] [--max-new 256] [--batch 64] [--lm-eval-batch 16]

The GSM8K test file is read from ../shared/data (or $REASONLAB_DATA).
"""

import argparse
import os
import sys
import time
from pathlib import Path

import torch

UNTIL = ["Question:", "</s>", "<|im_end|>"]
STRICT = r"#### (\-?[0-9\.\,]+)"  # lm-eval gsm8k.yaml filter_list
FLEXIBLE = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=64, help="first N GSM8K test items")
    ap.add_argument("--fewshot", type=int, default=0, help="solved training examples before each question")
    ap.add_argument("--max-new", type=int, default=256, help="token budget (lm-eval max_gen_toks)")
    ap.add_argument("--batch", type=int, default=64, help="rows our loop decodes together")
    ap.add_argument("--lm-eval-batch", type=int, default=16, help="lm-eval HFLM batch_size")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    try:
        from lm_eval.api.instance import Instance
        from lm_eval.filters.extraction import RegexFilter
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:
        print(f'error: this benchmark needs lm-eval ({e}): pip install "reasonlab[bench]"', file=sys.stderr)
        raise SystemExit(2)
    data = Path(os.environ.get("REASONLAB_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    if not (data / "gsm8k" / "test.jsonl").is_file():
        print(f"error: no GSM8K test file under {data}: set REASONLAB_DATA to a folder with gsm8k/test.jsonl",
              file=sys.stderr)
        raise SystemExit(2)
    os.environ["REASONLAB_DATA"] = str(data)
    torch.set_num_threads(args.threads)

    from reasonlab.eval.extract import extract
    from reasonlab.eval.harness import EvalSettings, evaluate
    from reasonlab.models.embedded import resolve
    from reasonlab.models.lm import load_causal_lm

    folder = str(resolve("smollm2-135m"))
    model, tok = load_causal_lm(folder)
    model.eval()
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=args.lm_eval_batch, max_gen_toks=args.max_new)
    settings = EvalSettings(chat=False, fewshot=args.fewshot, max_new_tokens=args.max_new, stop=tuple(UNTIL),
                            batch_size=args.batch, progress=False)

    def ours():
        records, _ = evaluate(model, tok, "gsm8k", split="test", limit=args.items, settings=settings)
        return [r["prompt"] for r in records], [r["output"] for r in records]

    prompts, _ = ours()  # warm-up, and the prompt strings lm-eval gets

    def theirs():
        reqs = [Instance("generate_until", doc={}, arguments=(p, {"until": UNTIL, "max_gen_toks": args.max_new,
                                                                  "do_sample": False}), idx=i)
                for i, p in enumerate(prompts)]
        return lm.generate_until(reqs, disable_tqdm=True)

    print(f"{len(prompts)} GSM8K test items, {args.fewshot}-shot, greedy, up to {args.max_new} new tokens; lm-eval "
          f"batch {args.lm_eval_batch}, ours {args.batch} rows; {torch.get_num_threads()} thread(s)", flush=True)
    t = time.perf_counter()
    out_lm = theirs()
    t_lm = time.perf_counter() - t
    t = time.perf_counter()
    _, out_ours = ours()
    t_ours = time.perf_counter() - t

    def lm_filter(pattern: str, group: int, outs: list[str]) -> list[str]:
        return [x[0] for x in RegexFilter(regex_pattern=pattern, group_select=group).apply([[o] for o in outs],
                                                                                           [{}] * len(outs))]

    checks = {"output": (out_ours, out_lm),
              "lm-eval strict-match": (lm_filter(STRICT, 0, out_ours), lm_filter(STRICT, 0, out_lm)),
              "lm-eval flexible-extract": (lm_filter(FLEXIBLE, -1, out_ours), lm_filter(FLEXIBLE, -1, out_lm))}
    for name in ("strict-match", "flexible-extract"):
        checks[f"ours {name}"] = ([extract(name, o) for o in out_ours], [extract(name, o) for o in out_lm])
    n = len(prompts)
    print(f"lm-eval hf: {n / t_lm:.3f} items/s ({t_lm:.1f} s); ours: {n / t_ours:.3f} items/s ({t_ours:.1f} s) -> "
          f"ratio {t_lm / t_ours:.2f}x")
    ok = True
    for name, (a, b) in checks.items():
        same = sum(x == y for x, y in zip(a, b))
        ok &= same == n
        print(f"  {name}: {same}/{n} identical")
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y and name == "output":
                print(f"    item {i}: ours {x[:80]!r} | lm-eval {y[:80]!r}")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
