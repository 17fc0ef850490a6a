"""bench_sara's --rows: ROW or ROW:LEARNING_RATE, refused by name before anything is written."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("sarah", "unknown row 'sarah'"),
        ("base:1e-3", "unknown row 'base:1e-3'"),
        ("lora:fast", "the learning rate after ':' is a positive number"),
        ("sara:-1e-3", "the learning rate after ':' is a positive number"),
    ],
)
def test_a_bad_row_is_refused_before_any_work(tmp_path, row, message):
    work = tmp_path / "bench"
    cmd = [sys.executable, "scripts/bench_sara.py", "--rows", "sara", row, "--work_dir", str(work)]
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 2 and message in run.stderr
    assert not work.exists()


@pytest.mark.parametrize("flags", [["--memory_only"], ["--model", "runs/my-model"]])
def test_the_sd15_memory_run_refuses_flags_it_would_ignore(tmp_path, flags):
    work = tmp_path / "bench"
    cmd = [sys.executable, "scripts/bench_sara.py", "--sd15_memory", *flags, "--work_dir", str(work)]
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 2 and "leave out --memory_only and --model" in run.stderr
    assert not work.exists()


def test_rows_take_a_learning_rate():
    sys.path.insert(0, "scripts")
    from bench_sara import row_name

    assert row_name("sara:2e-3") == "sara:2e-3" and row_name("full") == "full"


def test_rows_trained_with_several_seeds_report_the_mean_and_range():
    sys.path.insert(0, "scripts")
    from bench_sara import cell, mean_over_seeds

    runs = [
        {"new_value": 0.2, "new_all_correct": 0.1, "retained_all_correct": 0.9, "seconds_per_step": 0.3, "seed": 0},
        {"new_value": 0.4, "new_all_correct": 0.3, "retained_all_correct": 0.8, "seconds_per_step": 0.9, "seed": 1},
        {"new_value": 0.3, "new_all_correct": 0.2, "retained_all_correct": 0.85, "seconds_per_step": 0.5, "seed": 2},
    ]
    row = mean_over_seeds(runs)
    assert row["new_value"] == pytest.approx(0.3) and row["retained_all_correct"] == pytest.approx(0.85)
    assert row["seconds_per_step"] == 0.5 and [r["seed"] for r in row["runs"]] == [0, 1, 2]
    assert cell(row, "new_value") == "0.300 (0.200-0.400)"
    single = mean_over_seeds(runs[:1])
    assert "runs" not in single and cell(single, "new_value") == "0.200"


def test_the_sd15_memory_report_gives_each_row_and_the_ratio(tmp_path, monkeypatch):
    sys.path.insert(0, "scripts")
    import argparse

    import bench_sara

    measured = {"sara": 300.0, "lora": 200.0}
    monkeypatch.setattr(bench_sara, "RESULTS", tmp_path)
    monkeypatch.setattr(bench_sara, "write_concept_kit", lambda *a, **k: tmp_path / "kit")
    monkeypatch.setattr(bench_sara, "lora_count", lambda model, rank: 797_184)
    monkeypatch.setattr(bench_sara, "matching_threshold", lambda model, count: 9.2e-6)

    def memory_run(args, spec, kit):
        assert args.model == bench_sara.SD15 and (spec["method"] != "sara" or spec["sara"]["threshold"] == 9.2e-6)
        row = {"trainable": 797_184, "seconds_per_step": 61.0, "peak_rss_mib": 9000.0}
        return row | {"peak_rss_above_loaded_mib": 5000.0, "peak_tensor_mib": measured[spec["method"]]}

    monkeypatch.setattr(bench_sara, "memory_run", memory_run)
    args = argparse.Namespace(model="tinyworld", concept="checkered", kit_size=2, seed=0, lora_rank=4, batch_size=1,
                              memory_steps=2, work_dir=str(tmp_path / "w"), lora_lr=1e-3, full_lr=1e-4)  # fmt: skip
    bench_sara.measure_sd15(args)
    text = (tmp_path / "sara_sd15_memory.md").read_text()
    assert "| sara | 797,184 | 61.0 | 9000 (5000) | 300 | - |" in text
    assert "| lora | 797,184 | 61.0 | 9000 (5000) | 200 | - |" in text
    assert "SaRA's peak of live tensors is 1.50x LoRA's." in text
