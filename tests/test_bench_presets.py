"""The benchmark's realistic data preset and its padding accounting (no training here), and
the GPU check's dry run."""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys

import pytest
from conftest import ROOT

from benchmarks.bench_dpo import processed_positions, token_id_agreement
from benchmarks.synthetic import (
    ULTRAFEEDBACK_LENGTHS,
    WORD_MARGIN,
    _target_lengths,
    max_prompt_length_for,
)


def test_ultrafeedback_lengths_have_its_medians_and_fit_after_clipping():
    """Unclipped medians scale with max_length (80 / 250 / 200 at 1024); at 256 the long tail
    is clipped to what truncation leaves, and draws are reproducible for a seed."""
    draws = [_target_lengths("ultrafeedback", 4096, random.Random(seed)) for seed in range(1500)]
    for index, part in enumerate(("prompt", "chosen", "rejected")):
        median = statistics.median(d[index] for d in draws)
        assert median == pytest.approx(4 * ULTRAFEEDBACK_LENGTHS[part][0], rel=0.1), part
    rng = random.Random(0)
    small = [_target_lengths("ultrafeedback", 256, rng) for _ in range(2000)]
    budget = max_prompt_length_for("ultrafeedback", 256) - WORD_MARGIN
    assert max(p for p, _, _ in small) == budget  # the heavy tail reaches the limit
    assert all(p + max(c, r) <= 256 - WORD_MARGIN for p, c, r in small)
    assert min(min(d) for d in small) >= 1
    again = random.Random(0)
    assert small[:50] == [_target_lengths("ultrafeedback", 256, again) for _ in range(50)]


def test_processed_positions_count_padding_per_layout():
    batch = [[10, 5, 20], [2, 30, 1]]  # (P, C, R) per pair
    real_two_rows = (2 * 10 + 5 + 20) + (2 * 2 + 30 + 1)
    assert processed_positions("ours", {"padding_free": False, "prefix_sharing": False},
                               batch) == (2 * 2 * 32, real_two_rows)
    assert processed_positions("ours", {"padding_free": False, "prefix_sharing": True},
                               batch) == (2 * 35, 35 + 33)
    assert processed_positions("ours", {"padding_free": True, "prefix_sharing": False},
                               batch) == (real_two_rows, real_two_rows)
    assert processed_positions("ours", {}, batch) == (35 + 33, 35 + 33)  # defaults: packed, shared
    assert processed_positions("trl", {}, batch) == (2 * 2 * 32, real_two_rows)


def test_token_id_agreement_names_the_rows_and_parts_that_differ():
    ours = [[[1, 2], [3], [4]], [[5], [6, 7], [8]], [[9], [10], [11]]]
    theirs = [[[1, 2], [3], [4]], [[5], [6], [8]], [[9, 9], [10], [12]]]
    assert token_id_agreement(ours, theirs) == {
        "rows": 3, "identical_rows": 1, "differing_rows": [1, 2],
        "differing_parts": {"prompt": 1, "chosen": 1, "rejected": 1},
        "first_difference": {"chosen": {"ours": [6, 7], "trl": [6]}}}
    assert token_id_agreement(ours, ours)["first_difference"] is None


def test_gpu_check_dry_run_builds_every_part_on_the_cpu(tmp_path):
    """benchmarks/gpu_check.py only runs on a GPU machine; its dry run builds each part's
    models, batches, benchmark command and QLoRA config here, so a change that breaks it shows
    in CI."""
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TMPDIR": str(tmp_path)}
    subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--out", str(out)],
                   cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    report = json.loads(out.read_text())
    assert report["attention"]["float32"]["dry_run"] and report["attention"]["bfloat16"]["batches"]
    assert report["bench"]["dry_run"] and "auto" in report["bench"]["variants"]
    assert report["qlora"] == {"dry_run": True, "model_dir": "model-cpu-medium"}
