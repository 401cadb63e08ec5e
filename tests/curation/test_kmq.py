"""Diversify and Conquer (lightning_ft.curation.kmq): per-cluster budgets that sum exactly and respect the caps on real
review embeddings, quality-weighted sampling inside clusters, the cluster weights as a hand-computed softmax, no example
selected twice across rounds, the one-shot command covering every cluster, and the round loop (real fits of a tiny
model) resuming after a kill without refitting the finished round."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from lightning_ft.curation import kmq
from lightning_ft.curation.kmq import (
    add_arguments,
    allocate_budget,
    cluster_weights,
    draw_cluster_counts,
    kmeans_labels,
    load_reward,
    round_sizes,
    sample_in_clusters,
    select_round,
)
from lightning_ft.data.files import load_records
from lightning_ft.errors import UserError

K = 5


def _args(tmp_path: Path, argv: list[str], **common: object) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    defaults = {"prompt_field": "text", "response_field": None, "cache_dir": str(tmp_path / "cache"), "seed": 0,
                "batch_size": 16, "model": "smollm2-135m"}  # fmt: skip
    return argparse.Namespace(**{**vars(parser.parse_args(argv)), **defaults, **common})


@pytest.fixture(scope="module")
def reviews(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict], np.ndarray]:
    """40 short real reviews as a JSONL pool, their MiniLM embeddings, and a cache folder holding them."""
    from lightning_ft.curation.embedder import Embedder

    root = tmp_path_factory.mktemp("kmq_reviews")
    rows = [{"text": r["text"], "label": r["label"]} for r in load_records("rotten_tomatoes", shuffle_seed=3)
            if len(r["text"]) < 80][:40]  # fmt: skip
    (root / "reviews.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    embeddings = Embedder("minilm-l6", cache_dir=root / "cache" / "embeddings", batch_size=16).embed(
        [r["text"] for r in rows]
    )
    return root, rows, embeddings


def test_budgets_sum_exactly_and_respect_the_caps(reviews: tuple[Path, list[dict], np.ndarray]) -> None:
    _, _, embeddings = reviews
    labels = kmeans_labels(embeddings, K, niter=50, restarts=2, seed=0)
    sizes = np.bincount(labels, minlength=K)
    assert (sizes > 0).all() and sizes.min() < sizes.max()
    rng = np.random.default_rng(0)
    for total in (3, K, K + 2, 25, sizes.sum() - 1, sizes.sum()):
        counts = allocate_budget(sizes, int(total), rng)
        assert counts.sum() == total and (counts <= sizes).all() and (counts >= 0).all()
        share = total / K
        capped = counts == sizes
        # equal shares: clusters below their cap differ by at most one, and each gets at least its floored share
        assert not (~capped).any() or np.ptp(counts[~capped]) <= 1
        assert all(counts[c] >= math.floor(min(share, sizes[c])) for c in range(K))
    big = allocate_budget(sizes, 30, rng)
    assert (big[sizes <= 30 // K] == sizes[sizes <= 30 // K]).all() and (sizes <= 30 // K).any()  # taken whole
    with pytest.raises(ValueError):
        allocate_budget(sizes, int(sizes.sum()) + 1, rng)


def test_quality_weighted_sampling_prefers_high_scores(reviews: tuple[Path, list[dict], np.ndarray]) -> None:
    _, rows, embeddings = reviews
    labels = kmeans_labels(embeddings, K, niter=50, restarts=2, seed=0)
    quality = np.array([30.0 if r["label"] == "positive" else 0.0 for r in rows])
    positives = np.bincount(labels[quality > 0], minlength=K)
    counts = np.minimum(positives, 2)
    picked = sample_in_clusters(labels, counts, np.random.default_rng(0), quality=quality)
    assert len(set(picked)) == len(picked) == counts.sum() and (quality[picked] > 0).all()
    assert (np.bincount(labels[picked], minlength=K) == counts).all()


def test_cluster_weights_are_the_softmax_of_mean_gaps() -> None:
    labels = np.array([0, 0, 1, 2, 2, 2, 1])
    gaps = np.array([1.0, 3.0, -1.0, 0.5, 0.5, 2.0, np.nan])  # the NaN gap is left out
    weights = cluster_weights(labels, gaps, 4)
    # means: c0 = 2, c1 = -1, c2 = 1; c3 has no scored example and gets the mean of all gaps, (1+3-1+0.5+0.5+2)/6 = 1
    e = [math.exp(2), math.exp(-1), math.exp(1), math.exp(1)]
    np.testing.assert_allclose(weights, [v / sum(e) for v in e], rtol=1e-12)
    np.testing.assert_allclose(weights, [0.5600528, 0.0278834, 0.2060319, 0.2060319], atol=1e-7)


def test_rounds_never_select_an_example_twice() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 6, size=120)
    sizes = round_sizes(100, 4)
    assert sizes == [25, 25, 25, 25] and round_sizes(10, 3) == [4, 3, 3]
    chosen = select_round(labels, sizes[0], np.random.default_rng(0), k=6)
    for r, size in enumerate(sizes[1:], start=1):
        weights = cluster_weights(labels[chosen], rng.normal(size=len(chosen)) * 3, 6)
        new = select_round(labels, size, np.random.default_rng(r), k=6, weights=weights, exclude=chosen)
        assert len(new) == size and not set(new) & set(chosen)
        chosen = np.concatenate([chosen, new])
    assert len(set(chosen)) == len(chosen) == 100
    # a draw caps each cluster at what it has left and hands the excess on: exact total
    room = np.array([1, 0, 5, 2])
    counts = draw_cluster_counts(np.array([0.97, 0.01, 0.01, 0.01]), 7, room, np.random.default_rng(0))
    assert counts.sum() == 7 and (counts <= room).all() and counts[0] == 1


def test_one_shot_selection_covers_every_cluster(tmp_path: Path, reviews: tuple[Path, list[dict], np.ndarray]) -> None:
    root, _, _ = reviews
    out = tmp_path / "selected.jsonl"
    argv = ["--budget", "15", "--clusters", str(K), "--kmeans-iters", "50", "--kmeans-restarts", "2"]
    report = kmq.run(_args(tmp_path, argv, data=str(root / "reviews.jsonl"), output=str(out),
                           cache_dir=str(root / "cache")))  # fmt: skip
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 15 == report["selected"] and len({r["text"] for r in rows}) == 15
    assert report["clusters_covered"] == K == len({r["kmq_cluster"] for r in rows})
    assert sum(report["per_cluster_selected"]) == 15 and max(report["per_cluster_selected"]) <= 15 // K + 1
    with pytest.raises(UserError, match="--clusters 100 needs at least 100 examples in --data"):
        kmq.run(_args(tmp_path, ["--budget", "5", "--clusters", "100"], data=str(root / "reviews.jsonl"),
                      output=str(out), cache_dir=str(root / "cache")))  # fmt: skip
    with pytest.raises(UserError, match="--rounds 2 needs --fit-config and --work-dir"):
        kmq.run(_args(tmp_path, ["--budget", "5", "--rounds", "2"], data="x", output=str(out)))


def _fit_config(tmp_path: Path, model_dir: Path) -> Path:
    config = {
        "seed_everything": 0,
        "wandb": "disabled",
        "trainer": {
            "accelerator": "cpu",
            "max_steps": 2,
            "limit_val_batches": 0,
            "num_sanity_val_steps": 0,
            "enable_progress_bar": False,
            "log_every_n_steps": 1,
        },
        "model": {
            "class_path": "lightning_ft.modules.CausalLMModule",
            "init_args": {"model": str(model_dir), "learning_rate": 1e-3, "warmup_steps": 0},
        },
        "data": {
            "class_path": "lightning_ft.data.InstructionDataModule",
            "init_args": {
                "prompt_template": "Question: {prompt}\nAnswer:",
                "response_template": " {response}",
                "val_size": 0,
                "test_size": 0,
                "control_size": 0,
                "batch_size": 4,
                "max_length": 48,
            },
        },
    }
    path = tmp_path / "round.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_rounds_resume_after_a_kill_without_refitting(
    tmp_path: Path, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = tmp_path / "trivia.jsonl"
    pool.write_text("".join(json.dumps(r) + "\n" for r in load_records("trivia", shuffle_seed=0)[:40]))
    work, out = tmp_path / "work", tmp_path / "selected.jsonl"
    argv = ["--budget", "12", "--clusters", "4", "--kmeans-iters", "20", "--kmeans-restarts", "1", "--rounds", "2",
            "--fit-config", str(_fit_config(tmp_path, tiny_llama_dir)), "--work-dir", str(work),
            "--max-new-tokens", "4", "--embedder", str(tiny_llama_dir)]  # fmt: skip
    from lightning_ft.cli import main as fit_command  # what lightning-ft data hands down to the rounds

    args = _args(tmp_path, argv, data=str(pool), output=str(out), prompt_field="prompt", model=str(tiny_llama_dir),
                 fit_command=fit_command)  # fmt: skip
    fits: list[str] = []
    real_fit = kmq.fit_round

    def killed_in_round_2(config: Path, dataset: Path, root: Path, fit: Any) -> Path:
        fits.append(root.name)
        if root.name == "round_2":
            raise KeyboardInterrupt  # the process dies while round 2 trains
        return real_fit(config, dataset, root, fit)

    monkeypatch.setattr(kmq, "fit_round", killed_in_round_2)
    with pytest.raises(KeyboardInterrupt):
        kmq.run(args)
    state = json.loads((work / "state.json").read_text())
    first, second = state["rounds"]
    assert fits == ["round_1", "round_2"] and first["model"] and second["model"] is None
    assert (Path(first["model"]) / "config.json").is_file() and len(first["new"]) == 6 == len(second["new"])
    assert sum(first["weights"]) == pytest.approx(1.0) and len(first["gaps"]) == 6
    generated = (work / "round_1" / "generations.jsonl").read_text()
    assert len(generated.splitlines()) == 6
    with pytest.raises(UserError, match=r"holds rounds of other settings \(budget differ\)"):
        kmq.run(argparse.Namespace(**{**vars(args), "budget": 10.0}))
    with pytest.raises(UserError, match="--rounds fits a model in every round through lightning-ft fit"):
        kmq.run(argparse.Namespace(**{**vars(args), "fit_command": None}))  # run() from Python without the CLI

    fits.clear()  # the rerun: round 2's fit stands in for a real one (round 1's was real), counting the calls
    monkeypatch.setattr(kmq, "fit_round", lambda config, dataset, root, fit: fits.append(root.name) or Path(first["model"]))
    report = kmq.run(args)
    assert fits == ["round_2"]  # round 1 is not refitted, nor regenerated
    assert (work / "round_1" / "generations.jsonl").read_text() == generated
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len({r["prompt"] for r in rows}) == len(rows) == 12 == report["selected"]
    assert [r["kmq_round"] for r in rows] == [1] * 6 + [2] * 6
    assert json.loads((work / "state.json").read_text())["rounds"][1]["model"] == first["model"]
    assert report["rounds"][0]["weights"] == first["weights"]


def test_reward_spec_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_rewards.py").write_text("def length(prompts, responses):\n    return [len(r) for r in responses]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert list(load_reward("my_rewards:length")(["q"], ["abc"])) == [3]
    with pytest.raises(UserError, match="must name a function as module:function"):
        load_reward("my_rewards")
    with pytest.raises(UserError, match="cannot be imported"):
        load_reward("my_rewards:missing")
