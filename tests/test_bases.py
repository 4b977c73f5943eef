"""Tests for miniworld/bases.py: each tiny base reloads offline with the classes a user would
use for the hub model, and runs at the mini world's 96 px.

One module-scoped build (~1 s) feeds every test; the whole file runs in ~15 s on 2 cores.
"""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: common, miniworld

import pytest
import torch
from diffusers import FluxKontextPipeline, QwenImageEditPipeline
from PIL import Image, ImageDraw
from transformers import (AutoModelForImageTextToText, AutoProcessor, AutoTokenizer,
                          Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor)

import common
from miniworld import bases

torch.set_num_threads(1)

CORPUS = ["a red circle at top left", "make the blue square green", "remove the yellow triangle",
          "move the green circle to the bottom right", "Is the red circle now blue?"]
SIZE = 96
PROMPT = "make the red circle blue"


def scene(color=(220, 30, 30)) -> Image.Image:
    img = Image.new("RGB", (SIZE, SIZE), (128, 128, 128))
    ImageDraw.Draw(img).ellipse([10, 10, 40, 40], fill=color)
    return img


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return bases.build_all(tmp_path_factory.mktemp("bases"), CORPUS, image_size=SIZE)


@pytest.fixture(scope="module")
def rrm(built):
    path = built["paths"]["rrm_base"]
    return AutoProcessor.from_pretrained(path), AutoModelForImageTextToText.from_pretrained(path)


@pytest.fixture(scope="module")
def qwen_edit(built):
    pipe = QwenImageEditPipeline.from_pretrained(built["paths"]["qwen_edit_base"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------------------
# Tokenizer and chat template
# ---------------------------------------------------------------------------------------
def test_tokenizer_specials_roundtrip_and_determinism():
    tok = bases.build_tokenizer(CORPUS)
    ids = [tok.convert_tokens_to_ids(t) for t in bases.QWEN_SPECIAL_TOKENS]
    assert len(set(ids)) == len(ids) and min(ids) >= len(tok) - len(ids)  # appended after the BPE
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    text = "<|im_start|>user\nmake the red circle blue, ünïcödé 7.5 {\"x\": 1}<|im_end|>"
    enc = tok(text).input_ids
    assert enc[0] == tok.convert_tokens_to_ids("<|im_start|>")          # a special is one token
    assert tok.decode(enc) == text                                      # byte-level: lossless
    assert bases.build_tokenizer(CORPUS).get_vocab() == tok.get_vocab()  # same corpus, same vocab


def test_qwen_edit_prefix_is_the_64_tokens_the_pipeline_drops():
    # QwenImageEditPipeline drops prompt_template_encode_start_idx = 64 tokens (counted with
    # Qwen's 151k vocabulary); ours, trained on the template, must cut at the same place.
    tok = bases.build_tokenizer(CORPUS)
    pipe = QwenImageEditPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None,
                                 processor=None, transformer=None)
    prefix = pipe.prompt_template_encode.split("<|vision_start|>")[0]
    assert len(tok(prefix).input_ids) == pipe.prompt_template_encode_start_idx == 64


def test_chat_template_renders_roles_and_two_image_slots(rrm):
    processor, _ = rrm
    msgs = common.verify_messages(PROMPT, [{"question": "Is the circle blue?", "category": "follow"}], "compact")
    msgs = msgs + [{"role": "assistant", "content": "<score>7</score>"}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=False)
    slot = "<|vision_start|><|image_pad|><|vision_end|>"
    assert text.count(slot) == 2
    assert text.startswith("<|im_start|>system\nJudge the edit.")
    assert f"<|im_start|>user\nSource:{slot}Edited:{slot}Instruction: {PROMPT}" in text
    assert text.endswith("<|im_start|>assistant\n<score>7</score><|im_end|>\n")
    prompt = processor.apply_chat_template(msgs[:2], add_generation_prompt=True)
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    # the tokenizer alone carries the same template (TRL and `transformers serve` use it)
    tok = AutoTokenizer.from_pretrained(processor.tokenizer.name_or_path)
    assert tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True) == prompt


# ---------------------------------------------------------------------------------------
# RRM base
# ---------------------------------------------------------------------------------------
def test_rrm_reloads_with_auto_classes(built, rrm):
    processor, model = rrm
    assert isinstance(processor, Qwen2_5_VLProcessor)
    assert isinstance(model, Qwen2_5_VLForConditionalGeneration)
    assert 1_000_000 <= bases.param_count(model) <= 5_000_000
    assert model.config.image_token_id == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    rope = model.config.text_config.rope_parameters
    head_dim = model.config.text_config.hidden_size // model.config.text_config.num_attention_heads
    assert sum(rope["mrope_section"]) == head_dim // 2


def test_processor_gives_nine_tokens_per_96px_image_and_forward_runs(rrm):
    processor, model = rrm
    text = processor.apply_chat_template(common.verify_messages(PROMPT, [], "compact"), add_generation_prompt=True)
    enc = processor(text=[text], images=[scene(), scene((30, 30, 220))], return_tensors="pt")
    assert enc["image_grid_thw"].tolist() == [[1, 6, 6], [1, 6, 6]]      # 84 px / 14 = 6 patches
    image_id = model.config.image_token_id
    assert int((enc["input_ids"] == image_id).sum()) == 2 * 9            # 2x2 merge: 3 x 3 each
    assert int(enc["mm_token_type_ids"].sum()) == 2 * 9
    logits = model(**enc).logits
    assert logits.shape == (1, enc["input_ids"].shape[1], len(processor.tokenizer))


def test_generate_never_samples_vision_tokens(rrm):
    processor, model = rrm
    text = processor.apply_chat_template(common.verify_messages(PROMPT, [], "compact"), add_generation_prompt=True)
    enc = processor(text=[text], images=[scene(), scene((30, 30, 220))], return_tensors="pt")
    banned = torch.tensor(bases.vision_token_ids(processor.tokenizer))
    # Make the vision tokens by far the likeliest, so the saved generation_config is what stops them.
    bias = 100.0 * torch.isin(torch.arange(model.config.text_config.vocab_size), banned)
    hook = model.lm_head.register_forward_hook(lambda mod, inp, out: out + bias)
    try:
        torch.manual_seed(0)
        seqs = model.generate(**enc, do_sample=True, num_return_sequences=4, max_new_tokens=12)
        control = model.generate(**enc, do_sample=True, num_return_sequences=4, max_new_tokens=12,
                                 suppress_tokens=[])
    finally:
        hook.remove()
    n_prompt = enc["input_ids"].shape[1]
    assert seqs.shape[0] == 4 and not torch.isin(seqs[:, n_prompt:], banned).any()
    assert torch.isin(control[:, n_prompt:], banned).all()               # the trap, when not suppressed
    # The sampled rows go through the next (training) forward: prompt-major rows, images repeated,
    # mm_token_type_ids extended with zeros, stale rope_deltas cleared (LIBRARY-FACTS).
    model.model.rope_deltas = None
    mm = torch.cat([enc["mm_token_type_ids"].repeat(4, 1),
                    torch.zeros(4, seqs.shape[1] - n_prompt, dtype=enc["mm_token_type_ids"].dtype)], 1)
    out = model(input_ids=seqs, attention_mask=torch.ones_like(seqs), mm_token_type_ids=mm,
                pixel_values=enc["pixel_values"].repeat(4, 1), image_grid_thw=enc["image_grid_thw"].repeat(4, 1))
    assert torch.isfinite(out.logits).all()


# ---------------------------------------------------------------------------------------
# Editors
# ---------------------------------------------------------------------------------------
def test_kontext_reloads_and_edits_at_96px(built):
    pipe = FluxKontextPipeline.from_pretrained(built["paths"]["kontext_base"])
    pipe.set_progress_bar_config(disable=True)
    assert 300_000 <= bases.param_count(pipe.transformer) <= 2_000_000
    assert pipe.vae.config.latent_channels == 16 and pipe.vae_scale_factor == 8
    kw = dict(image=scene(), prompt=PROMPT, height=SIZE, width=SIZE, max_area=SIZE * SIZE,
              _auto_resize=False, num_inference_steps=2, guidance_scale=2.5, max_sequence_length=32,
              generator=torch.Generator().manual_seed(0))
    assert pipe(**kw).images[0].size == (SIZE, SIZE)
    kw["generator"] = torch.Generator().manual_seed(0)
    latents = pipe(**kw, output_type="latent").images                  # packed 2x2: (B, (H/16)(W/16), 64)
    assert latents.shape == (1, (SIZE // 16) ** 2, 64)


def test_qwen_edit_reloads_and_edits_at_96px(qwen_edit):
    pipe = qwen_edit
    assert 300_000 <= bases.param_count(pipe.transformer) <= 2_000_000
    assert pipe.vae_scale_factor == 8 and pipe.vae.config.z_dim == 16
    module = sys.modules[QwenImageEditPipeline.__module__]
    original = module.calculate_dimensions
    with bases.qwen_edit_at_area(SIZE * SIZE):
        assert module.calculate_dimensions(1024 * 1024, 1.0)[:2] == (SIZE, SIZE)
        out = pipe(image=scene(), prompt=PROMPT, height=SIZE, width=SIZE, num_inference_steps=2,
                   true_cfg_scale=1.0, generator=torch.Generator().manual_seed(0))
        pe, mask = bases.qwen_edit_prompt_embeds(pipe, PROMPT, scene())
        out2 = pipe(image=scene(), prompt_embeds=pe, prompt_embeds_mask=mask, height=SIZE, width=SIZE,
                    num_inference_steps=2, true_cfg_scale=1.0, generator=torch.Generator().manual_seed(0))
    assert module.calculate_dimensions is original                      # restored after the block
    assert out.images[0].size == out2.images[0].size == (SIZE, SIZE)


def test_qwen_edit_prompt_embeds_use_multimodal_positions(qwen_edit):
    pipe = qwen_edit
    image = scene()
    ours, mask = bases.qwen_edit_prompt_embeds(pipe, PROMPT, image)
    stock, _ = pipe._get_qwen_prompt_embeds(PROMPT, image)              # 1-D positions (no mm_token_type_ids)

    # An independent answer: write Qwen2.5-VL's 3-D positions by hand and run the encoder with them.
    # Text before the image counts 0..s-1 on all three axes; the 3 x 3 merged image tokens sit at
    # (t, h, w) = (s, s + row, s + col); text after resumes at s + 3.
    enc = pipe.processor(text=[pipe.prompt_template_encode.format(PROMPT)], images=[image], return_tensors="pt")
    ids = enc["input_ids"][0]
    where = (ids == pipe.text_encoder.config.image_token_id).nonzero().flatten()
    s, n, side = int(where[0]), len(where), SIZE // 28 * 28 // 28
    assert n == side * side
    pos = torch.zeros(3, 1, len(ids), dtype=torch.long)
    pos[:, 0, :s] = torch.arange(s)
    pos[0, 0, s:s + n] = s
    pos[1, 0, s:s + n] = s + torch.arange(side).repeat_interleave(side)
    pos[2, 0, s:s + n] = s + torch.arange(side).repeat(side)
    pos[:, 0, s + n:] = s + side + torch.arange(len(ids) - s - n)
    with torch.no_grad():
        hidden = pipe.text_encoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                   pixel_values=enc["pixel_values"], image_grid_thw=enc["image_grid_thw"],
                                   position_ids=pos, output_hidden_states=True, use_cache=False).hidden_states[-1]
    manual = hidden[:, pipe.prompt_template_encode_start_idx:]

    assert ours.shape == stock.shape == manual.shape and mask.all()
    assert torch.allclose(ours, manual, atol=1e-5)
    assert (ours - stock).abs().max() > 1e-3

    # Batched prompts of different lengths: each row equals its single-prompt result, zero-padded.
    both, both_mask = bases.qwen_edit_prompt_embeds(pipe, [PROMPT, "remove it"], [image, image])
    short, _ = bases.qwen_edit_prompt_embeds(pipe, "remove it", image)
    assert torch.allclose(both[0], ours[0], atol=1e-5)
    assert torch.allclose(both[1, :short.shape[1]], short[0], atol=1e-5)
    assert both_mask[1].sum() == short.shape[1] and not both[1, short.shape[1]:].any()


def test_shape_negatives_set_the_share_of_shape_wrong_guesses():
    """--shape_negatives: the share of task 3's wrong guesses about an object that keep its colour
    and get its shape wrong (the rest keep the shape and get the colour wrong)."""
    import numpy as np

    from miniworld import pretrain_rrm
    rng = np.random.default_rng(0)
    for share in (0.5, 0.9):
        guesses = [pretrain_rrm._other_object("red circle", rng, share).split(" ") for _ in range(1000)]
        shape_wrong = [c == "red" and s != "circle" for c, s in guesses]
        colour_wrong = [c != "red" and s == "circle" for c, s in guesses]
        assert all(a != b for a, b in zip(shape_wrong, colour_wrong))     # exactly one attribute wrong
        assert abs(np.mean(shape_wrong) - share) < 0.05, (share, np.mean(shape_wrong))


def test_build_all_is_small(built):
    assert set(built["mb"]) == {"rrm_base", "kontext_base", "qwen_edit_base"}
    assert sum(built["mb"].values()) < 20


@pytest.mark.slow
def test_committed_bases_keep_their_measured_quality():
    """The committed mini-world checkpoints, re-measured on fresh held-out samples: what the
    README reports (RRM base object accuracy 0.95, comparison items 0.95 and yes/no answers 0.98 on 200 pairs,
    "no" to 93% of the guesses with a wrong shape and to all with a wrong colour;
    Kontext true utility 4.7, Follow 0.47, Keep 0.87 on 240 test contexts; no-op 0, target 10)
    within sampling error (30 edits here)."""
    from miniworld import pretrain_editors, pretrain_rrm
    root = Path(__file__).resolve().parents[1] / "miniworld" / "checkpoints"
    model, processor = common.load_rrm(str(root / "rrm_base"))
    r = pretrain_rrm.evaluate(model, processor, n_pairs=48, seed=1)
    assert r["object_accuracy"] > 0.85 and r["compare_item_accuracy"] > 0.8 and r["question_accuracy"] > 0.85, r
    # the verdict compares the shape too, not only the colour (session 7; the 4th run said "no" to 1%)
    assert r["question_accuracy_shape"] > 0.8 and r["question_accuracy_colour"] > 0.9 and r["question_accuracy_true"] > 0.9, r
    contexts = pretrain_editors.test_contexts(5, seed=1)                 # 5 per category
    pipe = common.load_edit_pipeline(str(root / "kontext"))
    pipe.set_progress_bar_config(disable=True)
    edits = pretrain_editors.run_editor(pipe, pretrain_editors.Args(seed=1), contexts)
    s = pretrain_editors.score(contexts, edits)["all"]
    assert 3.0 < s["utility"] < 7.0 and s["quality"] > 0.9, s                # edits roughly, not exactly
    assert s["follow"] > 0.25 and s["keep"] > 0.7 and s["noop"] < 0.35, s
