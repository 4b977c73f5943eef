"""miniworld/pretrain_rrm.py: the command that makes the committed RRM base runs from scratch,
learns (its loss falls far below a random model's ~ln(vocab) = 7), and writes a base that
loads through the Auto classes. The full 40-minute run's held-out numbers are in
miniworld/checkpoints/rrm_base/pretrain_summary.json and the README."""
import json
import os

import pytest

import common as C
from stage_fixtures import run_script


@pytest.mark.slow
def test_pretraining_command_learns_and_saves_a_loadable_base(tmp_path):
    out = tmp_path / "rrm_base"
    run_script(["-m", "miniworld.pretrain_rrm", "--minutes", "10", "--max_steps", "60", "--out_dir", str(out),
                "--eval_pairs", "8", "--batch_size", "16", "--warmup_steps", "10"])
    summary = json.load(open(out / "pretrain_summary.json"))
    assert summary["steps"] == 60
    assert summary["final_loss"] < 5.0, summary["final_loss"]   # random: ~ln(1100) = 7
    assert set(summary["held_out"]) >= {"object_accuracy", "change_accuracy", "exact_match"}
    model, processor = C.load_rrm(str(out))
    assert model.config.model_type == "qwen2_5_vl"
    # the committed base is the same recipe, run for 40 minutes
    committed = json.load(open(os.path.join(C.__file__.rsplit("/", 1)[0], "miniworld", "checkpoints",
                                            "rrm_base", "pretrain_summary.json")))
    assert committed["held_out"]["object_accuracy"] > 0.9
