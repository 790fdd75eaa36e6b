"""`train.py --demo` end to end: DPO measurably changes the bundled model's behaviour."""

from __future__ import annotations

import json

import pytest

import train


def run_demo(out, *flags: str) -> dict:
    assert train.main(["--demo", "--output_dir", str(out), "--num_sample_prompts", "2",
                       *flags]) == 0
    return json.loads((out / "metrics.json").read_text())


def test_short_demo_run_moves_held_out_preference_up(tmp_path):
    """40 steps on 640 pairs: not the full demo, but the held-out log-prob preference (the
    same code before and after) must clearly rise, and the report files must be there."""
    metrics = run_demo(tmp_path / "short", "--num_samples", "640", "--learning_rate", "1e-4",
                       "--eval_steps", "0")
    before, after = metrics["before"], metrics["after"]
    assert 0.3 <= before["generation_accuracy"] <= 0.7
    assert before["reward_accuracy"] is None
    assert after["preference_accuracy"] >= before["preference_accuracy"] + 0.1
    assert after["reward_accuracy"] > 0.7
    for name in ("training_curves.png", "samples.md", "adapter_model.safetensors"):
        assert (tmp_path / "short" / name).is_file(), name


@pytest.mark.slow
def test_full_demo_reaches_its_targets(tmp_path):
    """The demo exactly as a user runs it (issue 3's bar: >= 90% on held-out prompts)."""
    metrics = run_demo(tmp_path / "full")
    before, after = metrics["before"], metrics["after"]
    assert 0.3 <= before["generation_accuracy"] <= 0.7
    assert after["generation_accuracy"] >= 0.9
    assert after["preference_accuracy"] >= 0.9
    assert after["reward_accuracy"] >= 0.9
    # Running the demo again overwrites its own output instead of refusing.
    assert train.main(["--demo", "--output_dir", str(tmp_path / "full"), "--max_steps", "1",
                       "--num_sample_prompts", "0"]) == 0
