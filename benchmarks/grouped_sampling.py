"""The own sampler vs HF generate on the embedded SmolLM2-135M, in one process, alternating repeats. Two cases:

shared     16 samples of ONE prompt: grouped sampling (prefill the prompt once, expand its KV cache across the group)
           vs `generate(num_return_sequences=16)`, which copies the prompt 16 times before prefill.
different  P different prompts (GSM8K test questions after a solved example; ../shared/data), one sample each,
           sampled at T = 1 until EOS, the stop string or --new tokens: the own loop's continuous batching
           (--rows rows decode together; finished rows are refilled from the next prompts, so the batch never
           drains to its longest row) vs HF generate on length-sorted, left-padded batches of 16 (as lm-eval's hf
           backend batches), the same stop string.

Prints generated tokens/s of each and the ratio (best of --repeats).

    HF_HUB_OFFLINE=1 python benchmarks/grouped_sampling.py [--case both] [--new 64] [--repeats 3] [--rows 64]
"""

import argparse
import json
import time
from pathlib import Path

import torch

from reasonlab.eval.generate import GenConfig, generate
from reasonlab.models.lm import load_causal_lm

FEWSHOT = ("Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
           "How many clips did Natalia sell altogether in April and May?\nAnswer: In May she sold 48 / 2 = 24 clips. "
           "Altogether she sold 48 + 24 = 72 clips. The answer is 72.\n\n")


GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"
STOP = "\n\nQuestion:"


def best(fns: dict, repeats: int) -> dict:
    """tokens/s of each fn, alternating so machine noise hits both; fn() -> tokens generated."""
    for fn in fns.values():
        fn()  # warm-up
    rates = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            n_tok = fn()
            rates[name].append(n_tok / (time.perf_counter() - t))
    return rates


def report(label: str, rates: dict, repeats: int) -> None:
    b = {k: max(v) for k, v in rates.items()}
    print(f"{label}: HF generate {b['hf']:.1f} tokens/s; ours {b['ours']:.1f} tokens/s -> ratio "
          f"{b['ours'] / b['hf']:.2f}x  (best of {repeats}; all: hf {[round(x, 1) for x in rates['hf']]}, "
          f"ours {[round(x, 1) for x in rates['ours']]})", flush=True)


def different_prompts(model, tok, args) -> None:
    if not GSM8K.exists():
        raise SystemExit(f"error: the different-prompt case reads {GSM8K} (the shared GSM8K test file)")
    qs = [json.loads(x)["question"] for x in GSM8K.read_text().splitlines()[:args.prompts]]
    prompts = [FEWSHOT + f"Question: {q}\nAnswer:" for q in qs]
    ids = [tok(p)["input_ids"] for p in prompts]
    lens = sorted(len(x) for x in ids)
    print(f"{len(ids)} different prompts ({lens[0]}-{lens[-1]} tokens), 1 sample each at T = 1 up to {args.new} new "
          f"tokens or {STOP!r}; HF in length-sorted batches of {args.hf_batch}, ours {args.rows} rows, "
          f"{torch.get_num_threads()} threads", flush=True)
    pad = tok.pad_token_id

    def hf() -> int:
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        total = 0
        tok.padding_side = "left"
        for c in range(0, len(order), args.hf_batch):
            enc = tok([prompts[i] for i in order[c:c + args.hf_batch]], return_tensors="pt", padding=True)
            with torch.no_grad():
                out = model.generate(**enc, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                     max_new_tokens=args.new, pad_token_id=pad, stop_strings=[STOP], tokenizer=tok)
            new = out[:, enc.input_ids.shape[1]:]
            total += int((new != pad).sum())
        return total

    def ours() -> int:
        cfg = GenConfig(n=1, temperature=1.0, max_new_tokens=args.new, batch_size=args.rows, stop=(STOP,),
                        progress=False)
        return sum(len(s.token_ids) + (s.finish == "eos") for g in generate(model, tok, ids, cfg) for s in g)

    report(f"different prompts ({len(ids)} x 1)", best({"hf": hf, "ours": ours}, args.repeats), args.repeats)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", choices=["shared", "different", "both"], default="both")
    ap.add_argument("--new", type=int, default=64, help="new tokens per sample (at most)")
    ap.add_argument("--n", type=int, default=16, help="samples of the one prompt (shared case)")
    ap.add_argument("--shots", type=int, default=4, help="copies of the solved example in the shared prompt")
    ap.add_argument("--prompts", type=int, default=64, help="different prompts (different case)")
    ap.add_argument("--hf-batch", type=int, default=16, help="HF generate's batch (different case)")
    ap.add_argument("--rows", type=int, default=64, help="rows the own loop decodes together (different case)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tok = load_causal_lm("smollm2-135m")
    model.eval()
    if args.case in ("different", "both"):
        different_prompts(model, tok, args)
    if args.case == "different":
        return
    prompt = FEWSHOT * args.shots + "Question: A farmer has 17 cows and buys 5 more each week for 6 weeks. How many " \
                                    "cows does he have?\nAnswer:"
    enc = tok(prompt, return_tensors="pt")
    print(f"prompt {enc.input_ids.shape[1]} tokens, {args.n} samples x up to {args.new} new tokens, "
          f"{torch.get_num_threads()} threads")

    def hf() -> int:
        with torch.no_grad():
            out = model.generate(**enc, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                 num_return_sequences=args.n, max_new_tokens=args.new, pad_token_id=tok.pad_token_id)
        new = out[:, enc.input_ids.shape[1]:]
        return int((new != tok.pad_token_id).sum())  # tokens generated (EOS included, padding after it not)

    def ours() -> int:
        cfg = GenConfig(n=args.n, temperature=1.0, max_new_tokens=args.new, batch_size=args.n, grouped=True,
                        progress=False)
        samples = generate(model, tok, [enc.input_ids[0].tolist()], cfg)[0]
        return sum(len(s.token_ids) + (s.finish == "eos") for s in samples)

    report(f"one shared prompt (1 x {args.n})", best({"hf": hf, "ours": ours}, args.repeats), args.repeats)


if __name__ == "__main__":
    main()
