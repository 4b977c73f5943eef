"""The whole mini pipeline (scripts/mini_pipeline.sh) on a smaller setting: every stage runs as
a user runs it, and every artefact one stage hands to the next is checked, so a change in one
stage that breaks a later one fails here. Learning is not asserted here (a few steps of each
stage); the README's numbers come from the default run."""
import json
import os
import subprocess
import sys

import pytest

import common as C
from stage_fixtures import ENV, ROOT

SMALL = {
    "DATA_ARGS": "--n_train 10 --n_val 3 --n_test 3 --pool mini:lenient,mini:eager --temperatures 1.0",
    "SFT_ARGS": "--max_steps 2 --batch_size 4 --per_device_batch_size 4 --eval_max_pairs 2 --max_new_tokens 8 "
                "--report_to none",
    "GCPO_ARGS": "--steps 1 --n 2 --pairs_per_step 1 --per_device_pairs 1 --max_new_tokens 8 --eval_max_pairs 2 "
                 "--report_to none",
    "FLOW_ARGS": "--steps 1 --contexts_per_step 1 --group_size 2 --num_steps 3 --eval_contexts 1 --eval_seeds 1 "
                 "--rrm_max_new_tokens 8 --report_to none",
    "EVAL_ARGS": "--max_pairs 3 --max_contexts 2 --max_new_tokens 8 --edit_steps 3 --edit_seeds 2",
}


@pytest.mark.slow
def test_the_pipeline_chains_every_stage(tmp_path):
    run = str(tmp_path / "run")
    # --demo adds its demo-scale flags before SMALL's, so SMALL's win (checked below): the run
    # covers the demo branch and every stage exactly as the full run calls it
    out = subprocess.run(["bash", os.path.join(ROOT, "scripts", "mini_pipeline.sh"), "--demo", run, "0"], cwd=ROOT,
                         env={**ENV, **SMALL, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert out.stdout.startswith("demo scale:") and "(demo scale: not the reproduction table" in out.stdout
    for stage in ("build_data", "sft_think_verify", "sft_think_only", "gcpo", "flow_grpo_sft", "flow_grpo_gcpo",
                  "evaluate"):
        assert f"done   {stage}" in out.stdout, out.stdout
        assert os.path.getsize(os.path.join(run, "logs", f"{stage}.log")) > 0
    # 1. build_data -> the SFT sets and the preference pairs
    data = os.path.join(run, "data")
    for name in ("contexts", "candidates", "trajectories", "inspected", "sft_think_verify", "sft_think_only",
                 "pairs_train", "pairs_val", "pairs_test"):
        assert C.read_jsonl(os.path.join(data, f"{name}.jsonl")), name
    # 2. sft_rrm -> two RRMs that load with the Auto classes
    for name in ("sft_rrm", "sft_rrm_think_only"):
        model, processor = C.load_rrm(os.path.join(run, name))
        assert model.config.model_type == "qwen2_5_vl"
        args = json.load(open(os.path.join(run, name, "summary.json")))["args"]
        assert args["sft_set"] in ("think_verify", "think_only")
        assert (args["max_steps"], args["eval_max_pairs"]) == (2, 2)  # SMALL's flags beat the demo's 100, 60
    # 3. gcpo -> an RRM trained from the SFT one
    summary = json.load(open(os.path.join(run, "gcpo_rrm", "summary.json")))
    assert summary["args"]["model"] == os.path.join(run, "sft_rrm") and len(summary["history"]["train"]) == 1
    C.load_rrm(os.path.join(run, "gcpo_rrm"))
    # 4. flow_grpo x2 -> LoRAs in the diffusers format, each with the RRM it was rewarded by
    for name, rrm in (("flow_grpo_sft", "sft_rrm"), ("flow_grpo_gcpo", "gcpo_rrm")):
        assert os.path.isfile(os.path.join(run, name, "pytorch_lora_weights.safetensors")), name
        assert json.load(open(os.path.join(run, name, "summary.json")))["args"]["reward_model"] == os.path.join(run, rrm)
    # 5. evaluate -> every RRM and every editor in the report
    ev = json.load(open(os.path.join(run, "eval", "summary.json")))
    assert set(ev["rrm"]["pairs"]) >= {"base", "think_only", "think_verify", "gcpo"}
    assert set(ev["editing"]["editors"]) == {"base", "flow_grpo_sft", "flow_grpo_gcpo"}
    for name in ("report.html", "report.md", "headline.md"):
        assert os.path.getsize(os.path.join(run, "eval", name)) > 0
    assert "RRM pairwise accuracy" in out.stdout and "report: " in out.stdout
    # the reproduction table reads the same artefacts (one run: no spread)
    table = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "reproduction_table.py"), run], cwd=ROOT,
                           env=ENV, capture_output=True, text=True, timeout=120)
    assert table.returncode == 0, table.stderr
    assert "| RRM pairwise accuracy, + GCPO (%) |" in table.stdout and "| motion_change |" in table.stdout
    assert "| change over the base, GCPO-RRM (paired) |" in table.stdout
    assert "| edits per test context (starting noises) | 2 |" in table.stdout  # EVAL_ARGS --edit_seeds 2
    # an interrupted run resumes: finished stages are skipped, a stage without its last file
    # (here Flow-GRPO with the SFT-RRM, and so evaluate) runs again
    os.remove(os.path.join(run, "flow_grpo_sft", "summary.json"))
    os.remove(os.path.join(run, "eval", "summary.json"))
    again = subprocess.run(["bash", os.path.join(ROOT, "scripts", "mini_pipeline.sh"), "--demo", run, "0"], cwd=ROOT,
                           env={**ENV, **SMALL, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-2000:]
    for stage in ("build_data", "sft_think_verify", "sft_think_only", "gcpo", "flow_grpo_gcpo"):
        assert f"skip   {stage}" in again.stdout and f"done   {stage}" not in again.stdout, again.stdout
    for stage in ("flow_grpo_sft", "evaluate"):
        assert f"done   {stage}" in again.stdout, again.stdout
    assert os.path.isfile(os.path.join(run, "eval", "summary.json")) and "report: " in again.stdout
