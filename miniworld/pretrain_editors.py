"""miniworld/pretrain_editors.py -- warm-start the mini world's two editors (the Flow-GRPO policies).

A real Edit-R1 run (paper Sec. 4) starts Flow-GRPO from FLUX.1-Kontext-dev or Qwen-Image-Edit,
models that already edit; GRPO then improves an editor that edits roughly, not noise. The
tiny bases of miniworld/bases.py are random, so this file gives them what the hub checkpoints
have: a VAE that autoencodes world images and a transformer that draws the requested edit.
It is the mini world's stand-in for pretraining, not part of the paper's method.

  1. VAEs: train each pipeline's VAE (AutoencoderKL for Kontext, AutoencoderKLQwenImage for
     Qwen-Image-Edit) to autoencode renders of random scenes (every background, 1-4 objects,
     5% with the world's pixel noise) on 48 px crops, then measure the latents' mean / std
     and store them in the VAE config (shift_factor / scaling_factor, latents_mean /
     latents_std), as the hub VAEs carry them. Checked on whole held-out renders:
     perceive(decoded) == perceive(original), and is the decoded image read as noisy?
  2. Transformers: plain rectified-flow matching on (source, instruction, target) triples of
     the world's TRAIN split, text encoders and VAE frozen:
         x_t = (1 - s) x_0 + s eps,   loss = || v_theta(x_t, s, source, text) - (eps - x_0) ||^2
     with x_0 the target latents, built with the pipelines' own helpers and conventions, so
     that the *unmodified* FluxKontextPipeline / QwenImageEditPipeline __call__ draws the
     trained edits. Before training, two Euler steps of the stock __call__ are replayed with
     our velocity() on the same noise: they must agree (they do, to 0.0).
  3. Evaluation of the saved, reloaded pipelines on held-out (test-split) contexts with the
     world's ground truth: per category the pass rates of Follow / Keep / Quality principles,
     the exact-edit and no-op rates and mean utility, for both editors, a no-op (the source
     returned unchanged) and the exact target render. Writes editors_summary.json and
     editors_grid.png next to the pipelines.

Not done here: GRPO, LoRA, EMA, any reward. Text encoders stay frozen (random but
deterministic, their embeddings still tell instructions apart), as in real fine-tuning.
One deliberate change to the random bases: the Kontext VAE is rebuilt with 2 GroupNorm
groups instead of 8 (--kontext_vae_norm_groups; see there).

Dimensions: B = batch, L = 36 latent tokens of a 96 px image (12 x 12 latents, 2 x 2 packed),
C = 64 packed channels (16 latent channels x 2 x 2), T = text tokens, D = text width.

Run (one CPU thread). The committed checkpoints were made in two runs: the defaults (~30 min)
made both editors; the Kontext one was then re-made alone (35 min) with a VAE trained on whole
images, half of them on the grey background of every world source, and a longer transformer
run (held-out true utility 2.6 -> 4.7, Keep pass 0.74 -> 0.87):
    python -m miniworld.pretrain_editors --out_dir miniworld/checkpoints
    python -m miniworld.pretrain_editors --out_dir miniworld/checkpoints --editors kontext \
        --minutes_vae 12 --minutes_editor 22 --vae_crop 96 --vae_grey_share 0.5 --vae_object_weight 4
    python -m miniworld.pretrain_editors --quick --out_dir /tmp/editors_quick   # ~1 minute
    python -m miniworld.pretrain_editors --minutes_vae 10 --minutes_editor 20   # better editors
The loops are timed, so a busy CPU gets fewer steps, not a longer run. On a GPU the same file
runs unchanged (it is small enough not to need accelerate).

Use the results anywhere:
    pipe = FluxKontextPipeline.from_pretrained("miniworld/checkpoints/kontext")
    pipe(image=src, prompt=instruction, height=96, width=96, max_area=96 * 96, _auto_resize=False,
         guidance_scale=2.5, max_sequence_length=24, num_inference_steps=10)
    pipe = QwenImageEditPipeline.from_pretrained("miniworld/checkpoints/qwen_edit")
    with bases.qwen_edit_at_area(96 * 96):
        pe, mask = bases.qwen_edit_prompt_embeds(pipe, instruction, src)
        pipe(image=src, prompt_embeds=pe, prompt_embeds_mask=mask, height=96, width=96,
             true_cfg_scale=1.0, num_inference_steps=10)

Library traps (diffusers 0.42.1, transformers 5.24; see notes/LIBRARY-FACTS.md):
  * Both pipelines pass `timestep / 1000` to the transformer, whose timestep embedding
    multiplies by 1000 again: the transformer's `timestep` argument is the sigma in [0, 1].
    FLUX's guidance is multiplied by 1000 inside the transformer too; pass it raw (2.5).
  * Both pipelines encode the condition image with the posterior *mode* (`sample_mode=
    "argmax"`) and normalise it: Kontext (z - shift_factor) * scaling_factor, Qwen
    (z - latents_mean) / latents_std per channel. We call the pipelines' own
    `_encode_vae_image` / `_pack_latents` / `_prepare_latent_image_ids`, so training sees
    exactly the tensors __call__ builds.
  * Qwen-Image's scheduler (shift_terminal=0.02) returns NaN sigmas for num_inference_steps=1
    (`stretch_shift_to_terminal` divides 0 by 0): use >= 2 steps.
  * AutoencoderKLQwenImage wants 5-D (B, C, T, H, W) input (an image is a 1-frame video),
    clamps its decoded output to [-1, 1] (a saturated decoder gets no gradient: it collapsed
    to a flat grey at lr 2e-3), and pads each causal conv with 2 zero frames (3x the work on
    images; `single_frame_convs` below).
  * AutoencoderKL's GroupNorm statistics are per image, so a VAE trained on crops can fail on
    whole images (with the base's 8 groups it did: crop MSE 0.05, whole-image MSE 0.23);
    check on whole images, as check_vae does.
  * `FluxKontextPipeline.encode_prompt` runs the text encoders with gradients on: call it
    under torch.no_grad() (else the second backward fails, "Trying to backward through the
    graph a second time").
  * QwenImageEditPipeline.__call__ defaults to true_cfg_scale=4.0 (only a warning without a
    negative prompt): pass true_cfg_scale explicitly. With true CFG it also rescales the
    guided velocity to the conditional one's norm.
  * QwenImageEditPipeline resizes to ~1 MP and encodes prompts with 1-D positions: use
    bases.qwen_edit_at_area and bases.qwen_edit_prompt_embeds (see miniworld/bases.py).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import tempfile
import textwrap
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import FluxKontextPipeline, QwenImageEditPipeline
from diffusers.models.autoencoders import autoencoder_kl_qwenimage
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from miniworld import bases, sim, world  # noqa: E402

EDITORS = ("kontext", "qwen_edit")


@dataclass
class Args:
    # --- output and budget
    out_dir: str = field(default="miniworld/checkpoints", metadata={
        "help": "writes kontext/, qwen_edit/ (pipelines), editors_summary.json and editors_grid.png"})
    minutes_vae: float = field(default=5.0, metadata={"help": "training time per VAE (wall clock)"})
    minutes_editor: float = field(default=8.0, metadata={"help": "training time per transformer (wall clock)"})
    quick: bool = field(default=False, metadata={
        "help": "smoke run (~1 minute): a few seconds per phase, small data and evaluation"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads"})
    seed: int = field(default=0, metadata={"help": "seeds the bases, data, noise and evaluation"})
    # --- 1. VAEs
    vae_batch_size: int = field(default=8, metadata={"help": "images per VAE step"})
    vae_crop: int = field(default=48, metadata={
        "help": "train on random crops of this side (multiples of 8 px; 96 = whole images): the VAEs are "
                "convolutional, and a 48 px crop costs a quarter of a whole image. But GroupNorm statistics "
                "are per image: the Kontext VAE (10 min, grey share 0.6, object weight 4) kept 0.78 of grey "
                "scenes intact trained on 48 px crops and 0.995 trained on whole images"})
    kontext_vae_lr: float = field(default=3e-3, metadata={"help": "AutoencoderKL AdamW peak learning rate"})
    qwen_vae_lr: float = field(default=1.5e-3, metadata={
        "help": "AutoencoderKLQwenImage AdamW peak learning rate; at 2e-3 it sometimes collapses (its decoder "
                "clamps to [-1, 1], and a saturated output gets no gradient)"})
    vae_warmup_steps: int = field(default=200, metadata={"help": "linear warm-up steps of the VAE learning rate"})
    vae_kl_weight: float = field(default=1e-4, metadata={
        "help": "weight of the KL term (per latent element) against the per-pixel MSE"})
    vae_noisy_fraction: float = field(default=0.05, metadata={
        "help": "share of training renders with the world's Gaussian pixel noise"})
    kontext_vae_norm_groups: int = field(default=2, metadata={
        "help": "GroupNorm groups of the Kontext VAE (0 = keep the base's 8). With 8 channels at full "
                "resolution, 8 groups is a per-channel instance norm that erases absolute colour; 2 groups "
                "learned ~2x faster per step here. Rebuilds the (random) base VAE with only this changed"})
    vae_grey_share: float = field(default=1 / 3, metadata={
        "help": "share of VAE training renders on the grey background every world SOURCE has (the rest white or "
                "black, which edits produce). At 1/3 (uniform) the VAE turned green into blue on grey: 0.64 of "
                "world sources survived its round trip. Default 1/3 = the first run's"})
    vae_object_weight: float = field(default=0.0, metadata={
        "help": "extra MSE weight on pixels that differ from the background: the objects, which the "
                "background's many pixels otherwise outvote (0 = plain MSE, as the first run; the Kontext re-make: 4)"})
    vae_eval_images: int = field(default=200, metadata={"help": "held-out renders for the VAE check"})
    # --- which editors
    editors: str = field(default="kontext,qwen_edit", metadata={
        "help": "editors to (re)train; an editor left out keeps the pipeline already in out_dir (evaluated too)"})
    # --- 2. transformers
    train_contexts: int = field(default=4000, metadata={
        "help": "train-split (source, instruction, target) triples, encoded once and reused"})
    batch_size: int = field(default=32, metadata={"help": "triples per transformer step"})
    lr: float = field(default=3e-3, metadata={"help": "transformer AdamW peak learning rate (cosine to 10%)"})
    warmup_steps: int = field(default=100, metadata={"help": "linear warm-up steps of the transformer"})
    logit_mean: float = field(default=0.0, metadata={
        "help": "timestep sampling: u = sigmoid(N(logit_mean, logit_std)), then the pipeline's shift"})
    logit_std: float = field(default=1.0, metadata={"help": "see logit_mean"})
    guidance_scale: float = field(default=2.5, metadata={
        "help": "Kontext's guidance embedding value, the same in training and inference"})
    max_sequence_length: int = field(default=24, metadata={
        "help": "Kontext T5 tokens (instructions are <= 19); the pipeline pads to it"})
    prompt_dropout: float = field(default=0.1, metadata={
        "help": "Qwen-Image-Edit: share of triples trained on the empty prompt (enables true CFG)"})
    # --- 3. evaluation
    eval_per_category: int = field(default=40, metadata={"help": "held-out contexts per edit category"})
    num_inference_steps: int = field(default=10, metadata={"help": "denoising steps at evaluation"})
    true_cfg_scale: float = field(default=1.0, metadata={
        "help": "Qwen-Image-Edit true CFG at evaluation (1 = off, one forward per step)"})
    grid_per_category: int = field(default=2, metadata={"help": "rows per category in editors_grid.png"})


def apply_quick(args: Args) -> Args:
    """--quick: every phase runs, each for a few seconds."""
    args.minutes_vae, args.minutes_editor = 0.1, 0.12
    args.train_contexts, args.vae_eval_images = 64, 16
    args.eval_per_category, args.num_inference_steps, args.grid_per_category = 2, 2, 1
    return args


def cosine_lr(peak: float, step: int, warmup: int, frac: float) -> float:
    """Linear warm-up, then cosine to 10% of the peak over the *time* budget (frac in [0, 1])."""
    return peak * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def log(msg: str) -> None:
    print(msg, flush=True)


# =========================================================================================
# 1. VAEs
# =========================================================================================
# Scenes for the autoencoder: any background, 1-4 objects (edit targets have 1-4), so every
# image an editor will ever see or draw is in the training distribution.
VAE_SCENES = world.make_config(min_objects=1, max_objects=4)


def vae_images(rng, n: int, noisy_fraction: float, grey_share: float = 1 / 3) -> list[Image.Image]:
    """n renders of random scenes (a grey_share of them on grey, the rest white or black); a
    noisy_fraction of them with the editors' pixel noise."""
    out = []
    for _ in range(n):
        bg = "grey" if rng.random() < grey_share else ["white", "black"][int(rng.integers(2))]
        img = world.render(world.sample_scene(rng, VAE_SCENES, backgrounds=[bg]))
        if rng.random() < noisy_fraction:
            img = world.add_noise(img, world.DEFAULT.noise_sigma, rng)
        out.append(img)
    return out


@contextlib.contextmanager
def single_frame_convs():
    """INFRA: run AutoencoderKLQwenImage's causal 3-D convolutions as 2-D ones on 1-frame input.

    Why: a causal conv pads 2 zero frames in front of a 1-frame image, so two of its three
    temporal kernel slices only ever multiply zeros; conv2d with the last slice gives the same
    output (to float rounding, ~5e-7) at about half the cost of the VAE step. Frames with a
    feature cache (video) take the stock path. Used for VAE training and latent precomputation
    only; evaluation runs the stock pipeline."""
    cls = autoencoder_kl_qwenimage.QwenImageCausalConv3d
    original = cls.forward

    def forward(self, x, cache_x=None):
        if cache_x is not None or x.shape[2] != 1:
            return original(self, x, cache_x)
        y = F.conv2d(F.pad(x[:, :, 0], self._padding[:4]), self.weight[:, :, -1], self.bias, stride=self.stride[1:])
        return y.unsqueeze(2)

    cls.forward = forward
    try:
        yield
    finally:
        cls.forward = original


def to_pixels(pipe, images: list) -> torch.Tensor:
    """PIL images -> the pipeline's VAE input: (B, 3, H, W) in [-1, 1] (Qwen: (B, 3, 1, H, W))."""
    x = pipe.image_processor.preprocess(images, world.DEFAULT.size, world.DEFAULT.size)
    return x.unsqueeze(2) if isinstance(pipe, QwenImageEditPipeline) else x


def from_pixels(pipe, x: torch.Tensor) -> list[Image.Image]:
    """The pipeline's own postprocess: (B, 3, [1,] H, W) in [-1, 1] -> PIL."""
    x = x[:, :, 0] if x.dim() == 5 else x
    return pipe.image_processor.postprocess(x.detach(), output_type="pil")


def random_crops(x: torch.Tensor, crop: int, rng) -> torch.Tensor:
    """A random crop of side `crop` per image, on the 8-px grid of the VAE's downsampling, so
    every crop sees the latent grid the whole image sees."""
    size = x.shape[-1]
    if crop >= size:
        return x
    offsets = rng.integers(0, (size - crop) // 8 + 1, size=(len(x), 2)) * 8
    return torch.stack([im[..., r:r + crop, c:c + crop] for im, (r, c) in zip(x, offsets)])


def rebuild_vae_norm(pipe, groups: int, seed: int) -> None:
    """Replace a random AutoencoderKL by the same config with `groups` GroupNorm groups."""
    config = {**pipe.vae.config, "norm_num_groups": groups}
    torch.manual_seed(seed)
    pipe.vae = type(pipe.vae).from_config(config)


def train_vae(pipe, args: Args, minutes: float, lr: float, rng) -> dict:
    """Autoencode world renders: per-pixel MSE + vae_kl_weight * KL(q(z|x) || N(0, 1)).

    The decoder learns from *sampled* latents (the reparameterisation trick), which makes it
    tolerant of the imperfect latents a diffusion transformer draws."""
    vae = pipe.vae
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    budget, start, step, hist = minutes * 60, time.time(), 0, []
    while time.time() - start < budget:
        for g in opt.param_groups:
            g["lr"] = cosine_lr(lr, step, args.vae_warmup_steps, (time.time() - start) / budget)
        x = to_pixels(pipe, vae_images(rng, args.vae_batch_size, args.vae_noisy_fraction, args.vae_grey_share))
        x = random_crops(x, args.vae_crop, rng)                 # (B, 3, [1,] c, c)
        post = vae.encode(x).latent_dist
        recon = vae.decode(post.sample()).sample
        # object pixels: any channel far from the image's background colour (its corner pixel;
        # a corner is always background, cells leave a margin)
        corner = x[..., :1, :1]
        obj = ((x - corner).abs().amax(1, keepdim=True) > 0.25).float()
        mse = ((recon - x).pow(2) * (1 + args.vae_object_weight * obj)).mean()
        kl = 0.5 * (post.mean.pow(2) + post.var - 1.0 - post.logvar).mean()
        loss = mse + args.vae_kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        hist.append((mse.item(), kl.item()))
        step += 1
        if step % 25 == 0:
            m = np.mean(hist[-25:], 0)
            log(f"  vae step {step:4d}  mse {m[0]:.5f}  kl {m[1]:.3f}  {time.time() - start:5.0f}s")
    vae.eval().requires_grad_(False)
    return {"steps": step, "minutes": round((time.time() - start) / 60, 2),
            "final_mse": float(np.mean([h[0] for h in hist[-25:]]))}


@torch.no_grad()
def set_latent_statistics(pipe, rng, n: int = 256) -> dict:
    """Measure the posterior means of n renders and store the normalisation in the VAE config,
    the way the hub VAEs carry it: FLUX a scalar (shift_factor, scaling_factor), Qwen-Image
    per-channel lists (latents_mean, latents_std). Normalised latents then have mean 0 and
    std 1, the scale the flow's Gaussian noise assumes."""
    x = to_pixels(pipe, vae_images(rng, n, 0.0))
    z = torch.cat([pipe.vae.encode(c).latent_dist.mode() for c in x.split(64)])
    if isinstance(pipe, FluxKontextPipeline):
        stats = {"shift_factor": z.mean().item(), "scaling_factor": 1.0 / z.std().item()}
    else:
        dims = [0, 2, 3, 4]  # (B, C, 1, h, w): per channel
        stats = {"latents_mean": z.mean(dims).tolist(), "latents_std": z.std(dims).tolist()}
    pipe.vae.register_to_config(**stats)
    return stats


@torch.no_grad()
def check_vae(pipe, rng, n: int) -> dict:
    """Held-out renders (a fresh seed; every background; 15% noisy): reconstruction MSE in
    [-1, 1] units, perceive(decoded) == perceive(original), and whether the decoder adds
    anything noise_level() reads as noise (Quality principles ask "free of noise?")."""
    images = vae_images(rng, n, 0.0)
    grey = vae_images(rng, n, 0.0, grey_share=1.0)
    noisy = [world.add_noise(im, world.DEFAULT.noise_sigma, rng) for im in vae_images(rng, max(1, n // 6), 0.0)]
    out = {}
    for name, imgs in (("clean", images), ("grey", grey), ("noisy", noisy)):
        x = to_pixels(pipe, imgs)
        recon = torch.cat([pipe.vae.decode(pipe.vae.encode(c).latent_dist.mode()).sample for c in x.split(64)])
        dec = from_pixels(pipe, recon)
        levels = [world.noise_level(d) for d in dec]
        out[name] = {"images": len(imgs), "mse": (recon - x).pow(2).mean().item(),
                     "perceive_match": float(np.mean([world.perceive(d) == world.perceive(i)
                                                      for d, i in zip(dec, imgs)])),
                     "noise_level_mean": float(np.mean(levels)), "noise_level_max": float(np.max(levels)),
                     "read_as_noisy": float(np.mean([world.is_noisy(d) for d in dec]))}
    return out


# =========================================================================================
# 2. Transformers: rectified-flow matching with the pipelines' conventions
# =========================================================================================
def sample_train_contexts(n: int, seed: int) -> list[dict]:
    """n train-split contexts (sample_context only draws source scenes of that split)."""
    return world.sample_contexts("train", n, seed)


@torch.no_grad()
def encode_images(pipe, images: list) -> torch.Tensor:
    """PIL -> normalised, 2x2-packed latents (B, L, C), exactly as __call__ prepares the
    condition image (the pipeline's own _encode_vae_image and _pack_latents)."""
    out = []
    for i in range(0, len(images), 64):
        x = to_pixels(pipe, images[i:i + 64])
        z = pipe._encode_vae_image(x, generator=None)        # mode; Kontext (B,16,h,w), Qwen (B,16,1,h,w)
        out.append(pipe._pack_latents(z, z.shape[0], z.shape[1], z.shape[-2], z.shape[-1]))
    return torch.cat(out)                                       # (B, L, C)


@torch.no_grad()
def encode_prompts(pipe, args: Args, instructions: list, sources: list) -> dict:
    """Frozen text encoders, run once. Kontext: T5 tokens (B, T, D) + CLIP pooled (B, D/2).
    Qwen-Image-Edit: the Qwen2.5-VL encoder reads instruction *and source image*;
    bases.qwen_edit_prompt_embeds gives it the multimodal positions the pipeline forgets.
    The empty prompt (with the same image) is the 'dropped' condition for true CFG."""
    if isinstance(pipe, FluxKontextPipeline):
        pe, pooled, _ = pipe.encode_prompt(prompt=instructions, prompt_2=None,
                                           max_sequence_length=args.max_sequence_length)
        return {"prompt_embeds": pe, "pooled": pooled}
    rows, empty = [], []
    for i in range(0, len(instructions), 32):
        imgs = sources[i:i + 32]
        pe, m = bases.qwen_edit_prompt_embeds(pipe, instructions[i:i + 32], imgs)
        rows += [e[mm.bool()] for e, mm in zip(pe, m)]          # unpadded (T_b, D)
        pe, m = bases.qwen_edit_prompt_embeds(pipe, [" "] * len(imgs), imgs)
        empty += [e[mm.bool()] for e, mm in zip(pe, m)]
    return {"rows": rows, "empty": empty}


def pad_rows(rows: list) -> tuple[torch.Tensor, torch.Tensor]:
    """B x (T_b, D) -> zero-padded (B, T, D) and its mask (B, T), as the pipeline pads."""
    t = max(r.shape[0] for r in rows)
    embeds = torch.stack([torch.cat([r, r.new_zeros(t - r.shape[0], r.shape[1])]) for r in rows])
    mask = torch.stack([torch.arange(t) < r.shape[0] for r in rows]).long()
    return embeds, mask


def latent_grid() -> tuple[int, int]:
    """(h, w) of the packed token grid: 96 px / 8 (VAE) / 2 (packing) = 6 x 6."""
    s = world.DEFAULT.size // 16
    return s, s


def velocity(pipe, args: Args, x_t, cond, sigma, text: dict, idx) -> torch.Tensor:
    """ALGO: the transformer's velocity for the target tokens, called as __call__ calls it.

    x_t, cond: (B, L, C) noisy target / condition latents; sigma (B,) in [0, 1] (what the
    pipeline passes as `timestep / 1000`); text: encode_prompts output, rows `idx`."""
    B, L, _ = x_t.shape
    h, w = latent_grid()
    hidden = torch.cat([x_t, cond], dim=1)                                  # (B, 2L, C): [target, image]
    if isinstance(pipe, FluxKontextPipeline):
        ids = pipe._prepare_latent_image_ids(B, h, w, x_t.device, x_t.dtype)   # (L, 3): (0, row, col)
        image_ids = ids.clone()
        image_ids[..., 0] = 1                                               # condition image: index 1
        pe = text["prompt_embeds"][idx]                                     # (B, T, D)
        out = pipe.transformer(
            hidden_states=hidden, timestep=sigma, guidance=torch.full((B,), args.guidance_scale),
            pooled_projections=text["pooled"][idx], encoder_hidden_states=pe,
            txt_ids=torch.zeros(pe.shape[1], 3), img_ids=torch.cat([ids, image_ids]), return_dict=False)[0]
    else:
        pe, mask = text["embeds"], text["mask"]                             # (B, T, D), (B, T)
        out = pipe.transformer(
            hidden_states=hidden, timestep=sigma, encoder_hidden_states=pe, encoder_hidden_states_mask=mask,
            img_shapes=[[(1, h, w), (1, h, w)]] * B, return_dict=False)[0]
    return out[:, :L]                                                       # (B, L, C): target tokens only


def sample_sigmas(pipe, n: int, args: Args, gen) -> torch.Tensor:
    """ALGO: training noise levels. u ~ logit-normal (SD3; diffusers' "logit_normal" density),
    then the same resolution-dependent shift the pipeline applies to its inference sigmas
    (mu from calculate_shift at L tokens, the scheduler's exponential time_shift), so training
    concentrates where inference spends its steps."""
    cfg = pipe.scheduler.config
    L = math.prod(latent_grid())
    m = (cfg.max_shift - cfg.base_shift) / (cfg.max_image_seq_len - cfg.base_image_seq_len)
    mu = cfg.base_shift + m * (L - cfg.base_image_seq_len)                  # calculate_shift
    u = torch.sigmoid(torch.randn(n, generator=gen) * args.logit_std + args.logit_mean)
    return pipe.scheduler.time_shift(mu, 1.0, u)                            # (n,)


def batch_text(pipe, text: dict, idx, drop: torch.Tensor | None) -> dict:
    """Qwen: gather (and pad) the rows of a batch, the empty prompt where drop is True."""
    if isinstance(pipe, FluxKontextPipeline):
        return text
    rows = [text["empty"][i] if d else text["rows"][i] for i, d in zip(idx.tolist(), drop.tolist())]
    embeds, mask = pad_rows(rows)
    return {"embeds": embeds, "mask": mask}


@torch.no_grad()
def check_pipeline_convention(pipe, args: Args, contexts: list, steps: int = 2) -> float:
    """Run the *unmodified* __call__ for `steps` Euler steps with a seeded generator, then
    replay them with our velocity() on the same noise and the scheduler's own sigmas:
    x <- x + (s_next - s) v(x, s). Returns the max abs difference of the final latents (0
    up to float rounding when every convention agrees). Two steps, not one: Qwen-Image's
    scheduler (shift_terminal=0.02) divides 0 by 0 for a one-step schedule and returns NaN."""
    srcs, instrs = [c["source_image"] for c in contexts], [c["instruction"] for c in contexts]
    B, (h, w) = len(contexts), latent_grid()
    common = dict(image=srcs, height=world.DEFAULT.size, width=world.DEFAULT.size, num_inference_steps=steps,
                  output_type="latent", generator=torch.Generator().manual_seed(0))
    shape = (B, 16, 2 * h, 2 * w)
    if isinstance(pipe, FluxKontextPipeline):
        got = pipe(prompt=instrs, max_area=world.DEFAULT.size ** 2, _auto_resize=False,
                   guidance_scale=args.guidance_scale, max_sequence_length=args.max_sequence_length, **common).images
        text = encode_prompts(pipe, args, instrs, srcs)
    else:
        enc = encode_prompts(pipe, args, instrs, srcs)
        embeds, mask = pad_rows(enc["rows"])
        with bases.qwen_edit_at_area(world.DEFAULT.size ** 2):
            got = pipe(prompt_embeds=embeds, prompt_embeds_mask=mask, true_cfg_scale=1.0, **common).images
        text, shape = {"embeds": embeds, "mask": mask}, (B, 1, 16, 2 * h, 2 * w)
    sigmas, timesteps = pipe.scheduler.sigmas, pipe.scheduler.timesteps   # (steps + 1,), (steps,)
    x = pipe._pack_latents(randn_tensor(shape, generator=torch.Generator().manual_seed(0)), B, 16, 2 * h, 2 * w)
    cond = encode_images(pipe, srcs)
    for i in range(steps):
        v = velocity(pipe, args, x, cond, (timesteps[i] / 1000).expand(B), text, torch.arange(B))
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    return (got - x).abs().max().item()


def train_editor(pipe, args: Args, contexts: list, minutes: float, seed: int) -> dict:
    """ALGO: rectified-flow matching, Eq. x_t = (1 - s) x0 + s eps, target v = eps - x0.

    Precomputes target latents x0, condition latents and prompt embeddings of every context
    once (VAE and text encoders are frozen), then trains the transformer only."""
    t0 = time.time()
    x0 = encode_images(pipe, [c["target_image"] for c in contexts])         # (N, L, C)
    cond = encode_images(pipe, [c["source_image"] for c in contexts])       # (N, L, C)
    text = encode_prompts(pipe, args, [c["instruction"] for c in contexts], [c["source_image"] for c in contexts])
    encode_s = time.time() - t0
    is_qwen = isinstance(pipe, QwenImageEditPipeline)
    tr = pipe.transformer
    tr.train().requires_grad_(True)
    opt = torch.optim.AdamW(tr.parameters(), lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    budget, start, step, hist = minutes * 60, time.time(), 0, []
    while time.time() - start < budget:
        for g in opt.param_groups:
            g["lr"] = cosine_lr(args.lr, step, args.warmup_steps, (time.time() - start) / budget)
        idx = torch.randint(len(contexts), (args.batch_size,), generator=gen)           # (B,)
        drop = torch.rand(args.batch_size, generator=gen) < (args.prompt_dropout if is_qwen else 0.0)
        sigma = sample_sigmas(pipe, args.batch_size, args, gen)                         # (B,)
        eps = torch.randn(x0[idx].shape, generator=gen)                                 # (B, L, C)
        s = sigma[:, None, None]
        x_t = (1 - s) * x0[idx] + s * eps                                               # (B, L, C)
        v = velocity(pipe, args, x_t, cond[idx], sigma, batch_text(pipe, text, idx, drop), idx)
        loss = (v - (eps - x0[idx])).pow(2).mean()                                      # flow matching MSE
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tr.parameters(), 1.0)
        opt.step()
        hist.append(loss.item())
        step += 1
        if step % 50 == 0:
            log(f"  step {step:5d}  loss {np.mean(hist[-50:]):.4f}  {time.time() - start:5.0f}s")
    tr.eval().requires_grad_(False)
    return {"steps": step, "triples_seen": step * args.batch_size, "encode_seconds": round(encode_s, 1),
            "minutes": round((time.time() - start) / 60, 2), "final_loss": float(np.mean(hist[-50:]))}


# =========================================================================================
# 3. Evaluation with the world's ground truth
# =========================================================================================
def test_contexts(per_category: int, seed: int) -> list[dict]:
    """per_category held-out (test-split) contexts of every edit category, in category order."""
    rng = np.random.default_rng([seed, 7])
    buckets = {c: [] for c in world.EDIT_CATEGORIES}
    while min(len(b) for b in buckets.values()) < per_category:
        ctx = world.sample_context(rng, split="test")
        if len(buckets[ctx["category"]]) < per_category:
            buckets[ctx["category"]].append(ctx)
    return [c for cat in world.EDIT_CATEGORIES for c in buckets[cat]]


@torch.no_grad()
def run_editor(pipe, args: Args, contexts: list, chunk: int = 40) -> list[Image.Image]:
    """Edits from the *unmodified* pipeline __call__, in batches, seeded."""
    size, out = world.DEFAULT.size, []
    for i in range(0, len(contexts), chunk):
        part = contexts[i:i + chunk]
        srcs, instrs = [c["source_image"] for c in part], [c["instruction"] for c in part]
        gen = torch.Generator().manual_seed(args.seed + i)
        kw = dict(image=srcs, height=size, width=size, num_inference_steps=args.num_inference_steps, generator=gen)
        if isinstance(pipe, FluxKontextPipeline):
            out += pipe(prompt=instrs, max_area=size * size, _auto_resize=False, guidance_scale=args.guidance_scale,
                        max_sequence_length=args.max_sequence_length, **kw).images
        else:
            with bases.qwen_edit_at_area(size * size):
                pe, mask = bases.qwen_edit_prompt_embeds(pipe, instrs, srcs)
                if args.true_cfg_scale > 1:
                    npe, nmask = bases.qwen_edit_prompt_embeds(pipe, [" "] * len(part), srcs)
                    kw.update(negative_prompt_embeds=npe, negative_prompt_embeds_mask=nmask)
                out += pipe(prompt_embeds=pe, prompt_embeds_mask=mask, true_cfg_scale=args.true_cfg_scale, **kw).images
    return out


def score(contexts: list, edits: list) -> dict:
    """Per category and overall: pass rates of Follow / Keep / Quality principles (share of
    principles of that kind judged 1 by world.ground_truth), exact (perceive(edit) == the
    target scene), noop (perceive(edit) == the source scene), mean world.noise_level (the
    Quality principle fails above world.DEFAULT.noise_threshold) and mean world.utility."""
    rows = {}
    for ctx, img in zip(contexts, edits):
        src, ins, ps = ctx["source_image"], ctx["instruction"], ctx["principles"]
        gt = world.ground_truth(src, ins, ps, img)
        seen = world.perceive(img)
        r = rows.setdefault(ctx["category"], {"follow": [], "keep": [], "quality": [], "exact": [], "noop": [],
                                              "noise_level": [], "utility": []})
        for v, p in zip(gt, ps):
            r[p["category"]].append(v)
        r["exact"].append(seen == ctx["target"])
        r["noop"].append(seen == ctx["source"])
        r["noise_level"].append(world.noise_level(img))
        r["utility"].append(world.utility(src, ins, ps, img))
    rows["all"] = {k: sum((rows[c][k] for c in list(rows)), []) for k in next(iter(rows.values()))}
    return {cat: {k: round(float(np.mean(v)), 3) for k, v in r.items()} for cat, r in rows.items()}


def print_table(results: dict) -> None:
    cols = ("follow", "keep", "quality", "exact", "noop", "noise_level", "utility")
    log(f"{'category':18s} {'editor':10s} " + " ".join(f"{c[:7]:>7s}" for c in cols))
    for cat in list(world.EDIT_CATEGORIES) + ["all"]:
        for name, res in results.items():
            log(f"{cat:18s} {name:10s} " + " ".join(f"{res[cat][c]:7.2f}" for c in cols))


def save_grid(path, contexts: list, columns: dict, per_category: int) -> None:
    """Rows: the first per_category test contexts of each category; columns: source (with the
    instruction), target, each editor's edit with its utility u."""
    picks = [i for cat in world.EDIT_CATEGORIES
             for i in [j for j, c in enumerate(contexts) if c["category"] == cat][:per_category]]
    scale, text_h, size = 2, 40, world.DEFAULT.size
    tile = size * scale
    names = ["source", "target"] + list(columns)
    sheet = Image.new("RGB", (len(names) * (tile + 8) + 8, len(picks) * (tile + text_h + 8) + 8), "white")
    draw = ImageDraw.Draw(sheet)
    for r, i in enumerate(picks):
        ctx = contexts[i]
        imgs = [ctx["source_image"], ctx["target_image"]] + [col[i] for col in columns.values()]
        for c, (name, img) in enumerate(zip(names, imgs)):
            x, y = 8 + c * (tile + 8), 8 + r * (tile + text_h + 8)
            sheet.paste(img.resize((tile, tile), Image.Resampling.NEAREST), (x, y))
            if c == 0:
                lines = textwrap.wrap(ctx["instruction"], 30)[:3]
            else:
                u = world.utility(ctx["source_image"], ctx["instruction"], ctx["principles"], img)
                lines = [name, f"u={u:g}"]
            draw.multiline_text((x, y + tile + 2), "\n".join(lines), fill="black", spacing=1)
    sheet.save(path)


# =========================================================================================
# main
# =========================================================================================
def main(args: Args) -> dict:
    torch.set_num_threads(args.threads)
    if args.quick:
        args = apply_quick(args)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    t_start, timings, summary = time.time(), {}, {"args": asdict(args)}
    wanted = args.editors.split(",")
    if not set(wanted) <= set(EDITORS) or any(not (out_dir / k).is_dir() for k in EDITORS if k not in wanted):
        raise SystemExit(f"--editors {args.editors!r}: choose from {EDITORS}; one left out must exist in {out_dir}")
    old_summary = json.loads((out_dir / "editors_summary.json").read_text()) \
        if (out_dir / "editors_summary.json").exists() else {}

    # 0. the random bases, as miniworld.bases.build_all writes them (same corpus, tokenizer, seed)
    log("# 0. random bases")
    tmp = tempfile.TemporaryDirectory()
    corpus = sim.text_corpus()
    paths = {"kontext": bases.build_kontext(Path(tmp.name) / "kontext_base", corpus, world.DEFAULT.size,
                                            seed=args.seed),
             "qwen_edit": bases.build_qwen_edit(Path(tmp.name) / "qwen_edit_base", corpus, world.DEFAULT.size,
                                                tokenizer=bases.build_tokenizer(corpus), seed=args.seed)}
    pipes = {"kontext": FluxKontextPipeline.from_pretrained(paths["kontext"]),
             "qwen_edit": QwenImageEditPipeline.from_pretrained(paths["qwen_edit"])}
    if args.kontext_vae_norm_groups:
        rebuild_vae_norm(pipes["kontext"], args.kontext_vae_norm_groups, args.seed)
    for p in pipes.values():
        p.set_progress_bar_config(disable=True)
        for module in (p.vae, p.transformer, p.text_encoder, getattr(p, "text_encoder_2", None)):
            if module is not None:
                module.requires_grad_(False).eval()
    summary["params"] = {k: {m: bases.param_count(getattr(p, m)) for m in ("vae", "transformer")}
                         for k, p in pipes.items()}
    timings["bases_s"] = round(time.time() - t_start, 1)

    # 1. VAEs: autoencode world renders, then set the latent normalisation
    summary["vae"] = {}
    with single_frame_convs():  # exact, ~2x faster Qwen VAE (see its docstring)
        for name, pipe in pipes.items():
            if name not in wanted:
                continue
            log(f"# 1. VAE of {name}")
            t0 = time.time()
            lr = args.kontext_vae_lr if name == "kontext" else args.qwen_vae_lr
            res = train_vae(pipe, args, args.minutes_vae, lr, rng)
            res["latent_stats"] = set_latent_statistics(pipe, np.random.default_rng([args.seed, 1]))
            res["held_out"] = check_vae(pipe, np.random.default_rng([args.seed, 2]), args.vae_eval_images)
            summary["vae"][name] = res
            timings[f"vae_{name}_s"] = round(time.time() - t0, 1)
            h = res["held_out"]
            log(f"  held-out clean: mse {h['clean']['mse']:.5f}  perceive match {h['clean']['perceive_match']:.3f}  "
                f"(grey background {h['grey']['perceive_match']:.3f})  "
                f"noise_level mean {h['clean']['noise_level_mean']:.2f} max {h['clean']['noise_level_max']:.2f}  "
                f"read as noisy {h['clean']['read_as_noisy']:.3f} | noisy inputs: perceive match "
                f"{h['noisy']['perceive_match']:.3f}, decoded read as noisy {h['noisy']['read_as_noisy']:.3f}")

    # 2. transformers: flow matching on train-split triples
    contexts = sample_train_contexts(args.train_contexts, args.seed)
    summary["editor_training"] = {}
    for name, pipe in pipes.items():
        if name not in wanted:
            continue
        log(f"# 2. transformer of {name}")
        diff = check_pipeline_convention(pipe, args, contexts[:2])   # stock VAE convs, stock __call__
        log(f"  pipeline convention check (2 Euler steps replayed): max |diff| = {diff:.2e}")
        assert diff < 1e-4, f"{name}: training inputs differ from the pipeline's ({diff})"
        t0 = time.time()
        with single_frame_convs():
            res = train_editor(pipe, args, contexts, args.minutes_editor, args.seed + 1)
        res["convention_max_abs_diff"] = diff
        summary["editor_training"][name] = res
        timings[f"editor_{name}_s"] = round(time.time() - t0, 1)
        pipe.save_pretrained(out_dir / name)

    for part in ("vae", "editor_training"):  # an editor not retrained keeps its recorded training
        for name in EDITORS:
            if name not in wanted and name in old_summary.get(part, {}):
                summary[part][name] = old_summary[part][name]

    # 3. evaluation of the *saved* pipelines, reloaded as a user would
    log("# 3. held-out evaluation")
    t0 = time.time()
    tests = test_contexts(args.eval_per_category, args.seed)
    reloaded = {"kontext": FluxKontextPipeline.from_pretrained(out_dir / "kontext"),
                "qwen_edit": QwenImageEditPipeline.from_pretrained(out_dir / "qwen_edit")}
    edits = {}
    for name, pipe in reloaded.items():
        pipe.set_progress_bar_config(disable=True)
        edits[name] = run_editor(pipe, args, tests)
    edits["noop"] = [c["source_image"] for c in tests]
    edits["target"] = [c["target_image"] for c in tests]
    results = {name: score(tests, imgs) for name, imgs in edits.items()}
    summary["eval"] = results
    summary["eval_contexts"] = len(tests)
    print_table(results)
    save_grid(out_dir / "editors_grid.png", tests, {k: edits[k] for k in EDITORS}, args.grid_per_category)
    timings["eval_s"] = round(time.time() - t0, 1)
    timings["total_min"] = round((time.time() - t_start) / 60, 2)
    summary["timings"] = timings
    summary["paths"] = {k: str(out_dir / k) for k in EDITORS}
    (out_dir / "editors_summary.json").write_text(json.dumps(summary, indent=1))
    log(f"timings: {timings}")
    tmp.cleanup()
    return summary


if __name__ == "__main__":
    from transformers import HfArgumentParser
    main(HfArgumentParser(Args).parse_args_into_dataclasses()[0])
