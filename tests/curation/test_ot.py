"""GOT-D (lightning_ft.curation.ot): the Sinkhorn plan's marginals, the entropic cost approaching the exact OT cost,
calibrated potentials ranking a planted near-target group first, streamed batches equal to one shot and comparable
across batches, and the command on real text (MiniLM: trivia questions picked out of a trivia + reviews pool)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import ot
import pytest
from scipy.stats import spearmanr

from lightning_ft.curation.ot import (
    add_arguments,
    budget_value,
    calibrate,
    calibrated_potentials,
    resolve_budget,
    run,
    select_ot,
    sinkhorn_potentials,
    stream_ot_scores,
    transport_plan,
)
from lightning_ft.data.files import load_records
from lightning_ft.errors import UserError


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _small_case(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return _unit(rng.normal(size=(6, 8))), _unit(rng.normal(size=(20, 8)))


def _planted(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Targets around one direction; a pool of 10 candidates near it (indices 30-39) after 30 around two others."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng.normal(size=(3, 16)))

    def around(c: int, n: int) -> np.ndarray:
        return _unit(centres[c] + 0.1 * rng.normal(size=(n, 16)))

    target = around(0, 8)
    pool = np.concatenate([around(1, 15), around(2, 15), around(0, 10)])
    return target, pool, np.arange(30, 40)


def test_sinkhorn_plan_has_the_uniform_marginals() -> None:
    target, pool = _small_case()
    solved = sinkhorn_potentials(target, pool, epsilon=0.1, tol=1e-9, max_iter=5000)
    plan = transport_plan(target, pool, solved, 0.1)
    assert solved.converged and (plan >= 0).all()
    np.testing.assert_allclose(plan.sum(1), np.full(6, 1 / 6), atol=1e-6)
    np.testing.assert_allclose(plan.sum(0), np.full(20, 1 / 20), atol=1e-6)
    # the dual value <a,f> + <b,g> is the entropic cost: <P,C> + eps * KL(P | a b^T)
    cost = ot.dist(target, pool)
    kl = float((plan * np.log(plan * 6 * 20)).sum())
    assert solved.cost == pytest.approx(float((plan * cost).sum()) + 0.1 * kl, abs=1e-6)


def test_entropic_cost_approaches_the_exact_ot_cost() -> None:
    target, pool = _small_case(1)
    cost = ot.dist(target, pool)
    exact = ot.emd2(np.full(6, 1 / 6), np.full(20, 1 / 20), cost)
    gaps = []
    for eps in (0.3, 0.1, 0.03, 0.01):
        solved = sinkhorn_potentials(target, pool, epsilon=eps, tol=1e-7, max_iter=20000)
        gaps.append(float((transport_plan(target, pool, solved, eps) * cost).sum()) - exact)
    assert all(g > -1e-6 for g in gaps), gaps  # a feasible plan costs at least the optimum
    assert gaps == sorted(gaps, reverse=True) and gaps[-1] < 2e-3 * exact < gaps[0], (gaps, exact)


def test_calibrated_potentials_rank_the_planted_near_target_candidates_first() -> None:
    target, pool, near = _planted()
    scores = calibrated_potentials(target, pool)
    assert set(select_ot(scores, 10)) == set(near)
    assert abs(scores.sum()) < 1e-9  # LAVA's calibration removes the potentials' free constant
    g = sinkhorn_potentials(target, pool).g
    np.testing.assert_allclose(scores, g - (g.sum() - g) / (len(g) - 1), atol=1e-12)


def test_streamed_batches_equal_one_shot_and_stay_comparable() -> None:
    target, pool, near = _planted(2)
    one_shot = calibrated_potentials(target, pool)
    streamed = stream_ot_scores(target, iter([pool]))
    np.testing.assert_allclose(streamed.scores, one_shot, atol=1e-9)
    # batches of 10: three far batches, then the near one; the scores stay comparable across batches
    batches = stream_ot_scores(target, (pool[i : i + 10] for i in range(0, 40, 10)))
    assert batches.converged and len(batches.batch_costs) == 4
    assert set(select_ot(batches.scores, 10)) == set(near)
    assert batches.batch_costs[3] < min(batches.batch_costs[:3])
    assert spearmanr(batches.scores, one_shot)[0] > 0.95
    # re-centring every batch on its own (calibrating per batch) would lose that: half of each far batch ranks high
    per_batch = np.concatenate([calibrate(sinkhorn_potentials(target, pool[i : i + 10]).g) for i in range(0, 40, 10)])
    assert set(select_ot(per_batch, 10)) != set(near) and spearmanr(per_batch, one_shot)[0] < 0.8


def test_budget_count_or_fraction_and_errors() -> None:
    assert resolve_budget(budget_value("0.1"), 95) == 9 and resolve_budget(budget_value("12"), 95) == 12
    with pytest.raises(UserError, match=r"--budget 120 is more than the 95 examples of --data"):
        resolve_budget(budget_value("120"), 95)
    for bad in ("0", "1.5", "-3", "many"):
        with pytest.raises(argparse.ArgumentTypeError):
            budget_value(bad)


def _args(tmp_path: Path, **kwargs: object) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    ns = parser.parse_args(["--target", "x", "--budget", "1"])
    common = {"prompt_field": "text", "cache_dir": str(tmp_path / "cache"), "seed": 0, "batch_size": 32,
              "model": "smollm2-135m"}  # fmt: skip
    return argparse.Namespace(**{**vars(ns), **common, **kwargs})


def test_select_picks_trivia_questions_from_a_mixed_pool(tmp_path: Path) -> None:
    trivia = load_records("trivia", shuffle_seed=0)
    reviews = [r for r in load_records("rotten_tomatoes", shuffle_seed=0) if len(r["text"]) < 90][:20]
    target = tmp_path / "target.jsonl"
    target.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in trivia[:8]))
    pool = [{"text": r["prompt"], "source": "trivia"} for r in trivia[8:28]]
    pool += [{"text": r["text"], "source": "reviews"} for r in reviews]
    data = tmp_path / "pool.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in pool))
    out = tmp_path / "selected.jsonl"
    args = _args(tmp_path, data=str(data), target=str(target), target_field="prompt", output=str(out), budget=10.0,
                 ot_batch_size=16)  # fmt: skip
    report = run(args)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 10 and report["batches"] == 3 and report["pool_size"] == 40
    assert sum(r["source"] == "trivia" for r in rows) >= 8, [r["source"] for r in rows]
    scores = [r["ot_score"] for r in rows]
    assert scores == sorted(scores) and scores[-1] <= report["score_quantiles"]["median"]
    assert json.loads(out.with_name("selected.report.json").read_text())["selected"] == 10
