"""End-to-end smoke test of miniworld/pretrain_editors.py: the --quick run writes pipelines
that reload offline with the stock classes and draw 96 px images, and a summary with every
key the README and later stages read. One subprocess (~50 s on one thread)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_run_saves_reloadable_editors_and_summary(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    out = tmp_path / "editors"
    proc = subprocess.run([sys.executable, "-m", "miniworld.pretrain_editors", "--quick", "--out_dir", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    summary = json.loads((out / "editors_summary.json").read_text())
    assert {"args", "params", "vae", "editor_training", "eval", "eval_contexts", "timings", "paths"} <= set(summary)
    for name in ("kontext", "qwen_edit"):
        assert summary["editor_training"][name]["convention_max_abs_diff"] < 1e-4
        assert summary["editor_training"][name]["steps"] > 0
        held = summary["vae"][name]["held_out"]
        assert {"mse", "perceive_match", "noise_level_mean", "read_as_noisy"} <= set(held["clean"])
    assert set(summary["eval"]) == {"kontext", "qwen_edit", "noop", "target"}
    for res in summary["eval"].values():
        assert set(res) == {"color_alter", "subject-add", "subject-remove", "subject-replace",
                            "background_change", "motion_change", "all"}
        assert set(res["all"]) == {"follow", "keep", "quality", "exact", "noop", "noise_level", "utility"}
    assert summary["eval"]["target"]["all"]["utility"] == 10.0     # the exact target is perfect
    assert summary["eval"]["noop"]["all"]["utility"] == 0.0        # and a no-op is worth nothing
    assert (out / "editors_grid.png").is_file()

    # The saved pipelines reload with the stock classes and edit at the world's size.
    import torch
    from diffusers import FluxKontextPipeline, QwenImageEditPipeline

    from miniworld import bases, world
    torch.set_num_threads(1)
    src = world.sample_contexts("test", 1)[0]
    kontext = FluxKontextPipeline.from_pretrained(out / "kontext")
    kontext.set_progress_bar_config(disable=True)
    img = kontext(image=src["source_image"], prompt=src["instruction"], height=96, width=96, max_area=96 * 96,
                  _auto_resize=False, guidance_scale=2.5, max_sequence_length=24, num_inference_steps=2).images[0]
    assert img.size == (96, 96)
    qwen = QwenImageEditPipeline.from_pretrained(out / "qwen_edit")
    qwen.set_progress_bar_config(disable=True)
    with bases.qwen_edit_at_area(96 * 96):
        pe, mask = bases.qwen_edit_prompt_embeds(qwen, src["instruction"], src["source_image"])
        img = qwen(image=src["source_image"], prompt_embeds=pe, prompt_embeds_mask=mask, height=96, width=96,
                   true_cfg_scale=1.0, num_inference_steps=2).images[0]
    assert img.size == (96, 96)
    # the VAE normalisation measured in phase 1 is saved with the pipeline
    assert kontext.vae.config.scaling_factor != 1.0 and qwen.vae.config.latents_std != [1.0] * 16
