"""bench_memcontrol's report: the knee against full fine-tuning, and every other scored point of the front."""

import argparse
import sys


def row(extraction: float, quality: float, **extra) -> dict:
    return {
        "extraction_rate": extraction,
        "extraction_rate_repeated": extraction,
        "nn_similarity": 0.95,
        "memorization_max_norm": 3.0,
        "quality_all_correct": quality,
        "frechet_distance": 0.5,
        "trainable": 10,
        "trainable_fraction": 0.01,
        **extra,
    }


def test_the_report_scores_each_front_point_against_full_fine_tuning(tmp_path, monkeypatch):
    sys.path.insert(0, "scripts")
    import bench_memcontrol

    monkeypatch.setattr(bench_memcontrol, "RESULTS", tmp_path)
    args = argparse.Namespace(
        name="mc", unique=12, repeated=6, copies=6, concept="cyan", steps=300, batch_size=8, seeds=8,
        held_out=24, val_seeds=8, quality="accuracy", lr_min=1e-4, lr_max=2e-3, workers_demo=False,
    )  # fmt: skip
    point = {"trial": 7, "mask": [0, 1], "memorization": 3.32, "error_rate": 0.125, "pareto": True}
    results = {
        "full fine-tuning": row(0.5, 0.7, learning_rate=1e-4),
        "MemControl mask (knee)": row(0.1, 0.5, learning_rate=3e-4, mask=[1, 1], trials=16, search_seconds=60),
        "front point: trial 7": row(0.25, 0.68, learning_rate=1.2e-3, mask=[0, 1], front=point),
    }
    bench_memcontrol.write_results(args, results, ["a", "b"], {"trials": [point]})
    text = (tmp_path / "mc.md").read_text()
    assert "cuts the extraction rate by 80% (target >= 50%) with quality -20.0 points" in text
    assert "- front point: trial 7 (mask [0, 1], lr 0.0012; in the search memorization 3.32, error_rate 0.125)" in text
    assert "extraction cut 50%, quality -2.0 points" in text
