"""flow_grpo.py -- Flow-GRPO of an image-editing model with the RRM as reward (Edit-R1 paper Sec. 3.4).

The editing model (FLUX.1-Kontext or Qwen-Image-Edit, through diffusers) is the policy; the
reasoning reward model (RRM), which is not differentiable, is the reward. For each context
(source image, instruction, principles):

  1. rollout     G edits by an SDE version of the flow sampler, keeping every sampled
                 transition x_t -> x_{t-1} and its Gaussian log-prob            (Eq. A-C)
  2. score       the RRM checks each edit against the principles: reward tau_i = parsed
                 <score> (common.aggregate_score); per-principle verdicts are logged
  3. advantages  A_i = (tau_i - mean_G) / (std_G + 1e-4), clipped to +-5, per group  (D)
  4. update      clipped ratio objective per trained step + beta * exact KL to the
                 reference (LoRA off), averaged over samples and trained steps   (E, F)
  5. log / eval / checkpoint

Equations (sigma = the scheduler's noise level, 1 = noise, 0 = data; dt = sigma' - sigma < 0):
  (A) flow x_sigma = (1 - sigma) x0 + sigma eps, velocity v = eps - x0, so eps = x + (1 - sigma) v
      and the score is grad log p = -(x + (1 - sigma) v) / sigma.
  (B) the reverse SDE with the ODE's marginals, noise g = std_t (Flow-GRPO):
        dx = [v + std_t^2 / (2 sigma) (x + (1 - sigma) v)] dt + std_t dw,
        std_t = a sqrt(sigma / (1 - sigma))   (a = --noise_level; at sigma = 1 the first step's
        denominator uses the next sigma instead, as Flow-GRPO does).
      Euler-Maruyama: x' ~ N(mu, s^2 I), mu = x + dt [v + std_t^2/(2 sigma) (x + (1 - sigma) v)],
      s = std_t sqrt(-dt). With a = 0 this is the pipeline's Euler step x + dt v.
  (C) log pi(x' | x) = reduce_d [-(x' - mu)^2 / (2 s^2) - log s - log sqrt(2 pi)]
  (D) group-normalised advantages (common.grpo_advantages, population std)
  (E) L_clip = -min(r A, clip(r, 1 - eps, 1 + eps) A),  r = exp(log pi - log pi_old)
  (F) KL(N(mu, s^2) || N(mu_ref, s^2)) = reduce_d (mu - mu_ref)^2 / (2 s^2): exact for two
      Gaussians of equal std, WITH the step size inside s (the public code divides by std_t^2
      only, dropping dt: a known defect we do not repeat).
  reduce_d is the mean over latent dimensions by default (Flow-GRPO's; its clip range ~1e-4
  is calibrated for it) or the sum (the exact density); the KL uses the same reduction.

Choices the paper leaves open (flags): SDE noise only on the trained steps (the others are
plain ODE steps, as in Flow-GRPO-Fast: noise there adds variance no update can credit, and
noise on the last step would leave grain in the image; the mini default trains the first two
of ten, 0:-1 is Flow-GRPO's all-but-last); the starting noise x_T is drawn per edit
(--init_noise group shares it within a group, so only the trained steps spread it); an
unparseable RRM answer is the judge's failure, not the edit's, so by default it takes no part
in its group (--unparseable exclude; counted; `zero` scores it 0 instead, the lowest
reward); a group with zero reward
variance is counted and skipped (it carries no signal; the loss is averaged over the live
samples); sampling noise is drawn per sample from a seed of (seed, step, sample index), so the
edits do not depend on the number of processes, and a resumed run continues the same
trajectory. Evaluation edits are deterministic (ODE, noise 0) on fixed held-out contexts/seeds.
Not done here: full fine-tuning (the KL reference is the LoRA-free model), EMA, CFG-free
distillation, the RRM's own training (gcpo.py).

Run
  python flow_grpo.py            # mini world, CPU, ~4.5 min on 2 threads, after gcpo.py (runs/mini/gcpo_rrm)
  accelerate launch flow_grpo.py --policy black-forest-labs/FLUX.1-Kontext-dev --run_dir runs/real \\
      --reward_model runs/real/gcpo_rrm --world none --variant full --rrm_max_new_tokens 1024 \\
      --resolution 512 --max_sequence_length 512 --group_size 24 --contexts_per_step 2 --train_steps 0:-1 \\
      --sample_batch 8 --micro_batch 8 --lora_r 64 --lora_alpha 128 --lr 1e-4 --steps 1000 \\
      --bf16 --gradient_checkpointing --checkpoint_every 50 --eval_every 50            # 1 GPU
  accelerate launch --num_processes 8 flow_grpo.py ...same flags... --contexts_per_step 16 \\
      --reward_backend openai:rrm@http://rrm-host:8000/v1       # 8 GPUs, RRM served by vLLM elsewhere
  Qwen-Image-Edit: --policy Qwen/Qwen-Image-Edit --true_cfg_scale 4.0 (two passes per step).

On a CPU shared with other jobs, set OMP_NUM_THREADS=1: with two OpenMP threads per process
on two busy cores the same step ran 10-20x slower here.

Legend: N = samples in a step (contexts_per_step x G), n = samples on this process,
S = denoising steps, K = trained steps, L = latent tokens ((res/16)^2), C = 64 packed
channels, T = text tokens, D = text width, b = transitions in a micro-batch.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from tqdm import tqdm
from transformers import HfArgumentParser

import common as C


@dataclass
class Args:
    # --- data and models
    policy: str = field(default="miniworld/checkpoints/kontext", metadata={"help": "FluxKontextPipeline or QwenImageEditPipeline (folder or hub id)"})
    run_dir: str = field(default="runs/mini", metadata={"help": "run folder: reads <run_dir>/data/contexts.jsonl"})
    output_name: str = field(default="flow_grpo", metadata={"help": "output subfolder of run_dir"})
    reward_model: str = field(default="runs/mini/gcpo_rrm", metadata={"help": "the RRM (Qwen2.5-VL folder) for --reward_backend inprocess"})
    reward_backend: str = field(default="inprocess", metadata={"help": "inprocess (batched generate+parse here), openai:<model>@<url> (RRM served on other GPUs), mini:<member> (the mini world's simulated verifier, an ablation) or mini:truth (its exact utility: the oracle ablation)"})
    variant: str = field(default="compact", metadata={"help": "verify prompt wording the RRM was trained with"})
    reward_mode: str = field(default="holistic", metadata={"help": "holistic (<score>, the paper's), weighted, deductions or capped (common.aggregate_score: deductions charges each failed principle a fixed cost; capped = min(<score>, deductions))"})
    costs: str = field(default="", metadata={"help": "deductions / capped: points lost per failed principle, follow:F,keep:K,quality:Q ('' = common.DEFAULT_COSTS, the mini world's 4 / 5 / 2; real data: how your raters weigh failures). A judge that catches only a share r of one category's failures can be charged cost / r per failure it does catch, so the expected charge is right (the 0..10 clip bounds that; README, session 18)"})
    verdicts: str = field(default="points", metadata={"help": "what the points-based --reward_mode reads: points (the RRM's <points> block) or reasoning (the verdicts its reasoning lines state, common.reasoning_verdicts; mini format; an ablation: the mini SFT-RRM's <points> differ from its own lines on 0.13 of them; README, session 18) or probs (the RRM's own P(yes) at each <points> digit, one teacher-forced pass over its answer, common.verdict_probabilities: deductions becomes the expected deductions; --reward_backend inprocess only; README, session 19)"})
    noop_call: bool = field(default=False, metadata={"help": "reward 0 when the RRM's reasoning says the edit changed nothing (common.aggregate_score noop_call; METHOD's 'a no-op scores 0' from the RRM's own call; with --reward_mode deductions: a no-op 0, a failed Keep charged more than a failed Follow; an ablation: seed 0 change-line judges, test, paired, with deductions: SFT-RRM -0.33, GCPO-RRM -0.27, Keep pass 0.90 -> 0.86; README, session 17)"})
    oracle_blind: str = field(default="", metadata={"help": "--reward_backend mini:truth only: CATEGORY:P[,CATEGORY:P] (keep, follow, quality): each truly failed principle of that category is passed with probability P (drawn per edit) before --reward_mode prices the verdicts; with deductions --noop_call true and no blind spot this is exactly the oracle. An ablation: a judge's blind spot alone, every other verdict right (the judges pass 0.4-0.8 of Keep failures; README, session 18)"})
    reward_noise: float = field(default=0.0, metadata={"help": "std of Gaussian noise added to every reward (drawn per edit). An ablation: with mini:truth, a judge whose errors are random, at the within-group agreement the noise leaves (README, session 18)"})
    follow_gate: bool = field(default=False, metadata={"help": "reward 0 when the RRM's own points fail every Follow principle (common.aggregate_score: METHOD's 'a no-op scores 0' from the verdicts; the mini judges score no-ops ~8.4 though their verdicts fail every Follow; an ablation: seed 0, test, paired: SFT-RRM -0.12, GCPO-RRM -0.32 against -0.02 / -0.10 without it, README)"})
    rrm_max_new_tokens: int = field(default=256, metadata={"help": "RRM answer length, greedy (mini SFT targets are ~190-225 tokens: a cut answer does not parse)"})
    rrm_batch_size: int = field(default=128, metadata={"help": "edits per RRM generate call (mini: 128 = one step's 8 x 16 in one call, 8.1 s on 2 CPU threads where 4 calls of 32 take 10.9 s; GPU: what memory allows)"})
    unparseable: str = field(default="exclude", metadata={"help": "an unparseable RRM answer (counted either way): exclude (no part in its group's statistics, advantage 0: the judge failed, not the edit) or zero (reward 0, pushes the editor towards edits the RRM can parse)"})
    world: str = field(default="mini", metadata={"help": "mini: also log the mini world's exact ground truth of every edit; none: real data"})
    resolution: int = field(default=96, metadata={"help": "edit side in px (sources are resized to it; multiple of 16)"})
    # --- sampling (Flow-GRPO's SDE)
    num_steps: int = field(default=10, metadata={"help": "S: denoising steps of rollouts and evaluation"})
    noise_level: float = field(default=0.7, metadata={"help": "a in std_t = a sqrt(sigma / (1 - sigma)) (Flow-GRPO: 0.7)"})
    init_noise: str = field(default="sample", metadata={"help": "starting noise x_T: sample (its own per edit) or group (one per context, shared by its G edits: the group's spread then comes only from the trained SDE steps, the part the update can credit)"})
    train_steps: str = field(default="0:2", metadata={"help": "python slice of the S steps that are SDE and trained: 0:-1 = all but the last (Flow-GRPO; the GPU recipe), 0:2 = the first two, where the edit's layout is decided (mini default: a quarter of the update's cost, so 4x the samples per step, a window as Flow-GRPO-Fast trains)"})
    guidance_scale: float = field(default=2.5, metadata={"help": "Kontext: guidance embedding value (one pass)"})
    true_cfg_scale: float = field(default=4.0, metadata={"help": "Qwen-Image-Edit: true classifier-free guidance scale (two passes; 1 = off)"})
    max_sequence_length: int = field(default=24, metadata={"help": "Kontext T5 tokens (mini instructions <= 19; real: 512)"})
    sample_batch: int = field(default=32, metadata={"help": "samples per denoising batch in rollouts and evaluation"})
    # --- GRPO (paper: G=24, beta=0.04; the rest is Flow-GRPO's practice or ours)
    group_size: int = field(default=16, metadata={"help": "G: edits per context (paper 24; the mini run uses 16 to fit 5 CPU minutes)"})
    contexts_per_step: int = field(default=8, metadata={"help": "GLOBAL contexts per step; N = contexts_per_step x G must divide by the process count (a group may span processes)"})
    adv_std: str = field(default="population", metadata={"help": "std of the advantage normalisation: population (Flow-GRPO) or sample"})
    adv_clip: float = field(default=5.0, metadata={"help": "advantages clipped to +-adv_clip"})
    clip_range: float = field(default=1e-4, metadata={"help": "ratio clip epsilon (Flow-GRPO ~1e-4 with per-dimension mean log-probs)"})
    beta: float = field(default=0.04, metadata={"help": "KL coefficient (paper 0.04; 0 skips the reference pass)"})
    logprob_reduce: str = field(default="mean", metadata={"help": "log-prob and KL over latent dims: mean (Flow-GRPO) or sum (exact density)"})
    minibatches: int = field(default=1, metadata={"help": "optimizer steps per rollout batch and inner epoch (1 = on-policy, the ratio is exactly 1 and the clip inert; >1: later ones are off-policy and clipped)"})
    inner_epochs: int = field(default=1, metadata={"help": "passes over each step's rollouts"})
    micro_batch: int = field(default=64, metadata={"help": "transitions (sample, step) per forward/backward; gradients accumulate over them"})
    lr: float = field(default=3e-3, metadata={"help": "AdamW learning rate of the LoRA (constant after warm-up)"})
    warmup_steps: int = field(default=2, metadata={"help": "linear warm-up steps"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank on attention + MLP (Flow-GRPO FLUX: 64)"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha"})
    steps: int = field(default=20, metadata={"help": "rollout/update steps"})
    bf16: bool = field(default=False, metadata={"help": "bf16 weights + mixed precision (GPU); SDE math stays float32"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "trade compute for memory (GPU)"})
    # --- evaluation, logging, checkpoints
    eval_split: str = field(default="val", metadata={"help": "held-out split of contexts.jsonl"})
    eval_contexts: int = field(default=60, metadata={"help": "fixed held-out contexts (the first ones of the split)"})
    eval_seeds: int = field(default=2, metadata={"help": "fixed seeds per held-out context"})
    eval_every: int = field(default=0, metadata={"help": "evaluate every N steps (0 = start and end only)"})
    grid_rows: int = field(default=8, metadata={"help": "held-out contexts shown in each eval grid image"})
    report_to: str = field(default="tensorboard", metadata={"help": "tensorboard, wandb, all or none"})
    checkpoint_every: int = field(default=0, metadata={"help": "save_state every N steps (0 = never)"})
    checkpoints_total_limit: int = field(default=2, metadata={"help": "keep at most this many checkpoints"})
    resume_from_checkpoint: str = field(default="", metadata={"help": "a checkpoint folder or 'latest'"})
    seed: int = field(default=0, metadata={"help": "random seed"})


LORA_TARGETS = (r".*transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
                r"|ff(_context)?\.net\.(0\.proj|2)|(img|txt)_mlp\.net\.(0\.proj|2)|proj_mlp|proj_out)")
# attention and MLP of FLUX's double/single blocks and Qwen-Image's blocks (not the final proj_out)


# =========================================================================================
# ALGO: the SDE step, its log-prob, the exact KL, the clipped objective (pure functions)
# =========================================================================================
def noise_stds(sigmas: torch.Tensor, steps: list[int], a: float) -> torch.Tensor:
    """std_t = a sqrt(sigma / (1 - sigma)) at each of `steps` (Eq. B), float32 (K,). At sigma = 1
    the denominator uses sigmas[1] (Flow-GRPO's guard against 1 / 0 at the first step)."""
    s = sigmas[steps].double()
    return (a * torch.sqrt(s / (1 - torch.where(s >= 1, sigmas[1].double(), s)))).float()


def sde_step(x, v, sigma, sigma_next, std_t):
    """Eq. B: mean and std of x' given x. x, v: (B, L, C); sigma, sigma_next, std_t: floats or
    (B, 1, 1). With std_t = 0 the mean is exactly the pipeline's Euler step x + dt v."""
    dt = sigma_next - sigma                                               # < 0
    mean = x + dt * (v + std_t ** 2 / (2 * sigma) * (x + (1 - sigma) * v))  # (B, L, C)
    return mean, std_t * (-dt) ** 0.5


def gaussian_logprob(x, mean, std, reduce: str = "mean"):
    """Eq. C: log N(x; mean, std^2) per row, reduced over all but the batch dim. (B, ...) -> (B,)"""
    std = torch.as_tensor(std, dtype=x.dtype)
    lp = -(x - mean) ** 2 / (2 * std ** 2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return lp.flatten(1).mean(1) if reduce == "mean" else lp.flatten(1).sum(1)


def gaussian_kl(mean, mean_ref, std, reduce: str = "mean"):
    """Eq. F: KL(N(mean, s^2 I) || N(mean_ref, s^2 I)) = ||mean - mean_ref||^2 / (2 s^2). (B,)"""
    std = torch.as_tensor(std, dtype=mean.dtype)
    kl = (mean - mean_ref) ** 2 / (2 * std ** 2)
    return kl.flatten(1).mean(1) if reduce == "mean" else kl.flatten(1).sum(1)


def clipped_objective(logp, old_logp, adv, clip_range: float):
    """Eq. E per transition: -min(r A, clip(r, 1-eps, 1+eps) A). All (b,). Returns (loss (b,), ratio (b,))."""
    ratio = torch.exp(logp - old_logp)
    loss = -torch.minimum(ratio * adv, torch.clamp(ratio, 1 - clip_range, 1 + clip_range) * adv)
    return loss, ratio


def group_advantages(rewards, valid, G: int, args: Args):
    """Eq. D over the whole step (N,) -> (advantages (N,), live groups (N/G,)). `valid` marks
    parseable rewards; with --unparseable exclude an invalid one takes no part (advantage 0)."""
    r = np.where(valid, rewards, 0.0)
    if args.unparseable == "zero":
        adv = C.grpo_advantages(r, G, std=args.adv_std, clip=args.adv_clip)
    else:
        adv = np.zeros_like(r)
        for g in range(len(r) // G):
            sl = slice(g * G, (g + 1) * G)
            ok = np.flatnonzero(valid[sl]) + g * G
            if len(ok) >= 2:
                adv[ok] = C.grpo_advantages(r[ok], len(ok), std=args.adv_std, clip=args.adv_clip)
    return adv, np.any(adv.reshape(-1, G) != 0, axis=1)


def sample_seed(seed: int, step, k: int) -> int:
    """Seed of sample k of a step: its noise never depends on the process layout."""
    return int(hashlib.sha256(f"{seed}/{step}/{k}".encode()).hexdigest()[:15], 16)


def step_contexts(step: int, n: int, per_step: int, seed: int) -> list[int]:
    """Contexts of step `step` (a seeded permutation per epoch): resumable exactly."""
    epoch, k = divmod(step, n // per_step)
    perm = list(range(n))
    random.Random(seed * 7919 + epoch).shuffle(perm)
    return perm[k * per_step:(k + 1) * per_step]


# =========================================================================================
# The two policies, called exactly as their diffusers pipelines call them
# =========================================================================================
def is_qwen(pipe) -> bool:
    return type(pipe).__name__.startswith("QwenImageEdit")


def schedule(pipe, S: int, L: int):
    """The pipeline's sigmas (S+1,) and timesteps (S,): linspace(1, 1/S) through the scheduler's
    resolution-dependent shift mu(L) (calculate_shift), as __call__ / retrieve_timesteps do."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    cfg = pipe.scheduler.config
    mu = calculate_shift(L, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                         cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
    pipe.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / S, S), mu=mu)
    return pipe.scheduler.sigmas.clone().float(), pipe.scheduler.timesteps.clone().float()


@torch.no_grad()
def encode_contexts(pipe, images: list, instructions: list[str], args: Args, device) -> dict:
    """Per CONTEXT (not per sample): source latents and prompt embeddings, computed once and
    indexed by the G samples. cond: (n_ctx, L, C) normalised, 2x2-packed VAE posterior mode,
    the pipeline's own _encode_vae_image/_pack_latents."""
    R = args.resolution
    imgs = [pipe.image_processor.resize(im.convert("RGB"), R, R) for im in images]
    x = pipe.image_processor.preprocess(imgs, R, R).to(device, pipe.vae.dtype)    # (n_ctx, 3, R, R)
    if is_qwen(pipe):
        x = x.unsqueeze(2)                                                      # a 1-frame video
    z = pipe._encode_vae_image(x, generator=None)
    out = {"cond": pipe._pack_latents(z, z.shape[0], z.shape[1], z.shape[-2], z.shape[-1])}
    if not is_qwen(pipe):
        pe, pooled, _ = pipe.encode_prompt(prompt=instructions, prompt_2=None, device=device,
                                           max_sequence_length=args.max_sequence_length)
        return {**out, "pe": pe, "pooled": pooled}                              # (n_ctx, T, D), (n_ctx, D')
    # Qwen-Image-Edit's encoder reads the instruction AND the source image. The pipeline's own
    # encode_prompt omits mm_token_type_ids, so under transformers 5.x its Qwen2.5-VL encoder
    # silently uses 1-D positions; common.qwen_edit_prompt_embeds passes them (multimodal
    # M-RoPE positions), as Qwen-Image-Edit was trained.
    pe, mask = C.qwen_edit_prompt_embeds(pipe, instructions, imgs)
    out.update(pe=pe, mask=mask)
    if args.true_cfg_scale > 1:  # the pipeline's negative prompt " ", with the same image
        npe, nmask = C.qwen_edit_prompt_embeds(pipe, [" "] * len(imgs), imgs)
        out.update(npe=npe, nmask=nmask)
    return out


def velocity(tr, pipe, x, t, ctx: dict, idx, args: Args):
    """ALGO: the (guided) velocity v(x, t) of target tokens, as __call__ computes it.
    x: (B, L, C) noisy target latents; t: (B,) = timestep / 1000; idx: (B,) context row of
    each sample. Kontext: sequence [target, source] tokens, ids (0|1, row, col), guidance
    embedding, ONE pass. Qwen-Image-Edit: true CFG, neg + s (cond - neg), rescaled to the
    conditional velocity's norm (two passes)."""
    B, L, _ = x.shape
    h = w = args.resolution // 16
    dtype = pipe.transformer.dtype                                              # tr may be DDP-wrapped
    hidden = torch.cat([x, ctx["cond"][idx]], dim=1).to(dtype)                  # (B, 2L, C)
    if not is_qwen(pipe):
        ids = pipe._prepare_latent_image_ids(B, h, w, x.device, x.dtype)       # (L, 3)
        img_ids = ids.clone()
        img_ids[..., 0] = 1                                                     # the condition image
        pe = ctx["pe"][idx]
        out = tr(hidden_states=hidden, timestep=t.to(dtype), guidance=torch.full((B,), args.guidance_scale, device=x.device),
                 pooled_projections=ctx["pooled"][idx], encoder_hidden_states=pe,
                 txt_ids=torch.zeros(pe.shape[1], 3, device=x.device, dtype=x.dtype),
                 img_ids=torch.cat([ids, img_ids]), return_dict=False)[0]
        return out[:, :L].float()                                               # (B, L, C)

    def one(pe, mask):
        return tr(hidden_states=hidden, timestep=t.to(dtype), encoder_hidden_states=pe[idx],
                  encoder_hidden_states_mask=mask[idx], img_shapes=[[(1, h, w), (1, h, w)]] * B,
                  return_dict=False)[0][:, :L].float()
    v = one(ctx["pe"], ctx["mask"])
    if args.true_cfg_scale <= 1:
        return v
    neg = one(ctx["npe"], ctx["nmask"])
    comb = neg + args.true_cfg_scale * (v - neg)
    return comb * (v.norm(dim=-1, keepdim=True) / comb.norm(dim=-1, keepdim=True))


def transition_mean(tr, pipe, ctx, idx, x, step_idx, sched, std_t, args: Args):
    """Eq. B for a micro-batch of transitions from ANY steps: x (b, L, C) at steps step_idx (b,),
    std_t (b,) -> (mean (b, L, C), s (b, 1, 1)). The update's (and the test's) recomputation."""
    sigmas, timesteps = sched
    col = lambda v: v.to(x.device)[:, None, None]                              # (b,) -> (b, 1, 1)
    v = velocity(tr, pipe, x, (timesteps[step_idx] / 1000).to(x.device), ctx, idx, args)
    return sde_step(x, v, col(sigmas[step_idx]), col(sigmas[step_idx + 1]), col(std_t))


@torch.no_grad()
def decode(pipe, latents, R: int) -> list:
    """Packed latents (B, L, C) -> PIL, the pipeline's unpack / de-normalise / VAE decode."""
    z = pipe._unpack_latents(latents, R, R, pipe.vae_scale_factor).to(pipe.vae.dtype)
    if is_qwen(pipe):
        cfg = pipe.vae.config
        mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1).to(z)
        inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1).to(z)
        img = pipe.vae.decode(z / inv_std + mean, return_dict=False)[0][:, :, 0]
    else:
        img = pipe.vae.decode(z / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor, return_dict=False)[0]
    return pipe.image_processor.postprocess(img, output_type="pil")


@torch.no_grad()
def denoise(tr, pipe, ctx, idx, seeds, sched, trained: list[int], a: float, args: Args, autocast,
            init_seeds=None):
    """ALGO 1 (rollout): S steps from seeded noise; SDE on the `trained` steps (noise a), ODE
    elsewhere. Returns final latents (n, L, C) and, for the trained steps, x_t (n, K, L, C),
    x_{t-1} (n, K, L, C) and the old log-probs (n, K). Each sample's noise comes from its own
    generator, so batching never changes it. init_seeds (n,), optional: the starting noise x_T
    from these seeds instead (the same seed for a group's G samples = a shared start)."""
    sigmas, timesteps = sched
    L, Cc, K = (args.resolution // 16) ** 2, ctx["cond"].shape[-1], len(trained)
    std_k = noise_stds(sigmas, trained, a) if trained else None                  # (K,)
    noise = torch.stack([torch.randn((1 + K, L, Cc), generator=torch.Generator().manual_seed(s)) for s in seeds])
    if init_seeds is not None:
        noise[:, 0] = torch.stack([torch.randn((L, Cc), generator=torch.Generator().manual_seed(s)) for s in init_seeds])
    noise = noise.to(ctx["cond"].device)                                        # (n, 1+K, L, C)
    x = noise[:, 0]
    xs, xn, lp = [], [], []
    for j in range(len(timesteps)):
        t = (timesteps[j] / 1000).expand(x.shape[0]).to(x.device)               # (n,)
        with autocast():
            v = velocity(tr, pipe, x, t, ctx, idx, args)
        if j in trained:
            k = trained.index(j)   # the same float32 scalars the update uses, so the ratio starts at 1
            mean, s = sde_step(x, v, sigmas[j].to(x.device), sigmas[j + 1].to(x.device), std_k[k].to(x.device))
            nxt = mean + s * noise[:, 1 + k]
            xs.append(x), xn.append(nxt), lp.append(gaussian_logprob(nxt, mean, s, args.logprob_reduce))
        else:
            nxt = x + (sigmas[j + 1] - sigmas[j]) * v                            # the pipeline's Euler step
        x = nxt
    if not trained:
        return x, None
    return x, {"x": torch.stack(xs, 1), "x_next": torch.stack(xn, 1), "logp": torch.stack(lp, 1)}


@contextlib.contextmanager
def reference_policy(tr):
    """The reference policy = the same transformer with its LoRA disabled (peft's adapter
    switch, via diffusers' disable_adapters / enable_adapters)."""
    tr.disable_adapters()
    try:
        yield
    finally:
        tr.enable_adapters()


def save_lora(pipe_cls, tr, out_dir: str) -> None:
    """LoRA in the diffusers format: pipe.load_lora_weights(out_dir) loads it. The adapter
    config (rank AND alpha) goes into the metadata: without it the loader assumes alpha = rank."""
    from peft.utils import get_peft_model_state_dict
    pipe_cls.save_lora_weights(out_dir, transformer_lora_layers=get_peft_model_state_dict(tr),
                               transformer_lora_adapter_metadata=tr.peft_config["default"].to_dict())


def load_lora(pipe_cls, tr, in_dir: str) -> None:
    """Inverse of save_lora into an existing adapter (resume)."""
    from peft.utils import set_peft_model_state_dict
    sd = pipe_cls.lora_state_dict(in_dir)
    sd = sd[0] if isinstance(sd, tuple) else sd
    res = set_peft_model_state_dict(tr, {k[len("transformer."):]: v for k, v in sd.items()
                                         if k.startswith("transformer.")}, adapter_name="default")
    if getattr(res, "unexpected_keys", None):
        raise RuntimeError(f"LoRA checkpoint {in_dir} has unexpected keys: {res.unexpected_keys[:5]}")


def latest_checkpoint(ckpt_dir: str) -> str | None:
    if not os.path.isdir(ckpt_dir):
        return None
    steps = sorted(int(d.split("-")[1]) for d in os.listdir(ckpt_dir) if d.startswith("checkpoint-"))
    return os.path.join(ckpt_dir, f"checkpoint-{steps[-1]}") if steps else None


# =========================================================================================
# Reward: the RRM's verdicts (and, in the mini world, the exact ground truth)
# =========================================================================================
def make_judge(args: Args, device, counters: dict):
    """judge(rows, edits, seeds) -> one record per edit: reward (None if unparseable), the
    RRM's per-category pass counts, and the mini world's ground truth."""
    if args.reward_backend == "inprocess":
        model, processor = C.load_rrm(args.reward_model)
        model.to(device).eval()

        def verdicts(reqs, prins, seeds):
            outs = [o[0] for o in C.rrm_score(model, processor, reqs, prins, n=1, temperature=0.0, variant=args.variant,
                                              max_new_tokens=args.rrm_max_new_tokens, batch_size=args.rrm_batch_size)]
            if args.verdicts == "probs":  # its P(yes) at each verdict digit of its own answer
                soft = C.verdict_probabilities(model, processor, reqs, prins, [o["text"] for o in outs],
                                               args.variant, args.rrm_batch_size)
                outs = [dict(o, soft_points=q) for o, q in zip(outs, soft)]
            return outs
    elif args.reward_backend == "mini:truth":  # an oracle ablation: the mini world's exact verdicts and utility
        from miniworld import sim
        blind = {c: float(q) for c, q in (x.split(":") for x in filter(None, args.oracle_blind.split(",")))}

        def verdicts(reqs, prins, seeds):
            return sim.oracle(reqs, prins, seeds, blind)
    else:
        def verdicts(reqs, prins, seeds):
            msgs = [(C.verify_messages(ins, p, args.variant), [src, ed]) for (src, ed, ins), p in zip(reqs, prins)]
            if args.reward_backend.startswith("mini:"):  # a simulator: its draws seeded per edit
                texts = [C.make_backend(args.reward_backend, counters, seed=s % 2**32)([m], n=1)[0][0]
                         for m, s in zip(msgs, seeds)]
            else:
                texts = [t[0] for t in C.make_backend(args.reward_backend, counters)(
                    msgs, n=1, temperature=0.0, max_tokens=args.rrm_max_new_tokens)]
            return [C.parse_rrm_output(t, len(p)) for t, p in zip(texts, prins)]
    costs = C.parse_costs(args.costs)
    world = None
    if args.world == "mini":
        from miniworld import world

    def judge(rows, edits, seeds):
        srcs = [C.load_image(r["source"], r["id"]) for r in rows]
        parsed = verdicts([(s, e, r["instruction"]) for s, e, r in zip(srcs, edits, rows)],
                          [r["principles"] for r in rows], seeds)
        recs = []
        for r, src, ed, p, seed in zip(rows, srcs, edits, parsed, seeds):
            ps = r["principles"]
            rec = {"reward": C.aggregate_score(p, ps, args.reward_mode, costs=costs, follow_gate=args.follow_gate,
                                                  noop_call=args.noop_call, verdicts=args.verdicts),
                   "category": r.get("category", "")}
            if args.reward_noise > 0 and rec["reward"] is not None:  # the random-error ablation
                rec["reward"] += float(np.random.default_rng([seed % 2**32, 2]).normal(0.0, args.reward_noise))
            pts = {"reasoning": p.get("reasoning_points"), "probs": p.get("soft_points")}.get(args.verdicts, p.get("points"))  # what is priced
            if pts is not None and len(pts) == len(ps):
                for v, pr in zip(pts, ps):
                    rec.setdefault(f"rrm_{pr['category']}", []).append(v)
            if world is not None:
                for v, pr in zip(world.ground_truth(src, r["instruction"], ps, ed), ps):
                    rec.setdefault(f"gt_{pr['category']}", []).append(v)
                rec["gt_utility"] = world.utility(src, r["instruction"], ps, ed)
            recs.append(rec)
        return recs
    return judge


def summarize(recs: list[dict]) -> dict:
    """Means over edits: reward (parseable only), parse rate, per-principle pass rates of the
    RRM's verdicts and of the ground truth (pooled over principles of each category)."""
    ok = [r["reward"] for r in recs if r["reward"] is not None]
    out = {"reward": float(np.mean(ok)) if ok else 0.0, "parse_rate": len(ok) / max(len(recs), 1)}
    for src in ("rrm", "gt"):
        for cat in C.CATEGORIES:
            vals = [v for r in recs for v in r.get(f"{src}_{cat}", [])]
            if vals:
                out[f"{src}_pass_{cat}"] = float(np.mean(vals))
    if any("gt_utility" in r for r in recs):
        out["gt_utility"] = float(np.mean([r["gt_utility"] for r in recs]))
    return out


def save_grid(path: str, rows: list, sources: list, edits: list, recs: list, seeds_per_ctx: int) -> "Image":
    """One line per context: source, then its edits with 'RRM score | ground-truth utility'."""
    from PIL import Image, ImageDraw
    tile, pad, text_h = 2 * edits[0].size[0], 6, 34
    cols = 1 + seeds_per_ctx
    sheet = Image.new("RGB", (cols * (tile + pad) + pad, len(rows) * (tile + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for i, row in enumerate(rows):
        y = pad + i * (tile + text_h + pad)
        cells = [(sources[i], row["instruction"][:34])]
        for s in range(seeds_per_ctx):
            rec = recs[i * seeds_per_ctx + s]
            rw = "none" if rec["reward"] is None else f"{rec['reward']:.1f}"
            cells.append((edits[i * seeds_per_ctx + s], f"RRM {rw}" + (f" | u {rec['gt_utility']:g}" if "gt_utility" in rec else "")))
        for c, (img, text) in enumerate(cells):
            x = pad + c * (tile + pad)
            sheet.paste(img.convert("RGB").resize((tile, tile), Image.Resampling.NEAREST), (x, y))
            draw.text((x, y + tile + 2), text, fill="black")
    sheet.save(path)
    return sheet


# =========================================================================================
def main(args: Args) -> dict:
    out_dir = os.path.join(args.run_dir, args.output_name)
    # INFRA: cuDNN's fused attention backward, PyTorch's default SDPA kernel on H100/H200, gave
    # NaN gradients to this script's Kontext LoRA in bf16 on an H200 (torch 2.11; README "GPU
    # check", scripts/gpu_attention_probe.py; likely the cuDNN bug class of pytorch/pytorch#196678).
    # Flash, memory-efficient and math attention were clean, so training never uses it. CPU: no effect.
    torch.backends.cuda.enable_cudnn_sdp(False)
    accelerator = Accelerator(mixed_precision="bf16" if args.bf16 else None,
                              log_with=None if args.report_to == "none" else args.report_to, project_dir=out_dir)
    W, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    G, N = args.group_size, args.contexts_per_step * args.group_size
    if N % W:
        raise SystemExit(f"contexts_per_step x group_size ({N}) must divide by the {W} processes")
    n_local = N // W
    if args.lora_r <= 0 or args.noise_level <= 0:
        raise SystemExit("--lora_r and --noise_level must be > 0 (the KL reference is the LoRA-free transformer; "
                         "log-probs need a stochastic sampler)")
    for name, allowed in (("unparseable", ("zero", "exclude")), ("logprob_reduce", ("mean", "sum")),
                          ("world", ("mini", "none")), ("adv_std", ("population", "sample")),
                          ("init_noise", ("sample", "group")), ("verdicts", ("points", "reasoning", "probs"))):
        if getattr(args, name) not in allowed:
            raise SystemExit(f"--{name} must be one of {allowed}")
    C.parse_costs(args.costs)  # a bad --costs fails here, before any model loads
    if args.verdicts == "probs" and args.reward_backend != "inprocess":
        raise SystemExit("--verdicts probs reads the RRM's logits: it needs --reward_backend inprocess")
    if args.oracle_blind and args.reward_backend != "mini:truth":
        raise SystemExit("--oracle_blind corrupts the oracle's verdicts: it needs --reward_backend mini:truth")
    if args.oracle_blind and not all(x.count(":") == 1 and x.split(":")[0] in C.CATEGORIES
                                     and x.split(":")[1].replace(".", "", 1).isdigit()
                                     for x in args.oracle_blind.split(",")):
        raise SystemExit(f"--oracle_blind {args.oracle_blind!r}: expected CATEGORY:P[,CATEGORY:P] with categories "
                         f"{C.CATEGORIES}")
    set_seed(args.seed)  # same LoRA init everywhere; sampling noise is seeded per sample

    # INFRA: data (contexts.jsonl from build_data.py), policy pipeline with a LoRA, reward
    rows = C.read_jsonl(os.path.join(args.run_dir, "data", "contexts.jsonl"),
                        required=("id", "split", "instruction", "source", "principles"))
    train = [r for r in rows if r["split"] == "train" and r["principles"]]
    held_out = [r for r in rows if r["split"] == args.eval_split and r["principles"]][:args.eval_contexts]
    if len(train) < args.contexts_per_step:
        raise C.DataError(f"only {len(train)} training contexts, fewer than --contexts_per_step {args.contexts_per_step}")
    from peft import LoraConfig
    pipe = C.load_edit_pipeline(args.policy, dtype=torch.bfloat16 if args.bf16 else torch.float32)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    for m in (pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None), pipe.transformer):
        if m is not None:
            m.requires_grad_(False).eval()
    tr = pipe.transformer
    tr.add_adapter(LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, init_lora_weights="gaussian",
                              target_modules=LORA_TARGETS))     # B = 0: the policy starts AS the reference
    if args.bf16:  # frozen weights in bf16, the trained LoRA in float32 (diffusers' recipe)
        from diffusers.training_utils import cast_training_params
        cast_training_params(tr, dtype=torch.float32)
    if args.gradient_checkpointing:
        tr.enable_gradient_checkpointing()
    opt = torch.optim.AdamW([p for p in tr.parameters() if p.requires_grad], lr=args.lr, betas=(0.9, 0.999),
                            weight_decay=1e-4)
    model, opt = accelerator.prepare(tr, opt)
    pipe_cls = type(pipe)
    counters: dict = {}
    judge = make_judge(args, device, counters)
    R, L = args.resolution, (args.resolution // 16) ** 2
    sched = schedule(pipe, args.num_steps, L)
    trained = list(range(args.num_steps))[slice(*[int(x) if x else None for x in args.train_steps.split(":")])]
    K = len(trained)
    if K == 0:
        raise SystemExit(f"--train_steps {args.train_steps!r} selects none of the {args.num_steps} steps")

    # INFRA: checkpoints hold the LoRA (diffusers format), not the frozen transformer
    def save_hook(models, weights, path):
        if accelerator.is_main_process:
            save_lora(pipe_cls, accelerator.unwrap_model(models[0]), path)
        weights.clear()

    def load_hook(models, path):
        load_lora(pipe_cls, accelerator.unwrap_model(models.pop()), path)
    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
    ckpt_dir, start = os.path.join(out_dir, "checkpoints"), 0
    if args.resume_from_checkpoint:
        path = latest_checkpoint(ckpt_dir) if args.resume_from_checkpoint == "latest" else args.resume_from_checkpoint
        if path:
            accelerator.load_state(path)
            start = int(path.rstrip("/").split("-")[-1])
            accelerator.print(f"resumed from {path} at step {start}")
    if accelerator.is_main_process and args.report_to != "none":
        accelerator.init_trackers("flow_grpo", config={k: v for k, v in vars(args).items()})

    def generate(ctx_rows, seeds, a, tags, init_seeds=None):
        """Encode each distinct context once, then denoise its samples in sample_batch chunks."""
        uniq = list(dict.fromkeys(tags))                                        # context keys, in order
        by_key = {k: r for k, r in zip(tags, ctx_rows)}
        ctx = encode_contexts(pipe, [C.load_image(by_key[k]["source"], k) for k in uniq],
                              [by_key[k]["instruction"] for k in uniq], args, device)
        idx = torch.tensor([uniq.index(k) for k in tags], device=device)       # (n,) context row per sample
        imgs, traj = [], []
        for s in range(0, len(seeds), args.sample_batch):
            sl = slice(s, s + args.sample_batch)
            x0, tj = denoise(tr, pipe, ctx, idx[sl], seeds[sl], sched, trained if a > 0 else [], a, args,
                             accelerator.autocast, None if init_seeds is None else init_seeds[sl])
            imgs += decode(pipe, x0, R)
            traj.append(tj)
        traj = {k: torch.cat([t[k] for t in traj]) for k in traj[0]} if traj[0] else None
        return imgs, traj, ctx, idx

    def evaluate(tag: str, step: int) -> dict:
        """ODE edits (noise 0) of the fixed held-out contexts x eval_seeds fixed seeds."""
        E = len(held_out) * args.eval_seeds
        mine = list(range(E))[rank::W]
        recs_local = []
        if mine:
            rws = [held_out[k // args.eval_seeds] for k in mine]
            seeds = [sample_seed(args.seed, "eval", k) for k in mine]
            imgs, _, _, _ = generate(rws, seeds, 0.0, [r["id"] for r in rws])
            recs_local = list(zip(mine, judge(rws, imgs, seeds), imgs))
        gathered = sorted([x for part in gather_object([recs_local]) for x in part], key=lambda x: x[0])
        recs = [r for _, r, _ in gathered]
        out = summarize(recs)
        out["per_category"] = {c: summarize([r for r in recs if r["category"] == c])
                               for c in sorted({r["category"] for r in recs})}
        accelerator.print(f"[eval {tag}] RRM reward {out['reward']:.2f} (parse {out['parse_rate']:.2f})"
                          + (f"  ground-truth utility {out['gt_utility']:.2f}" if "gt_utility" in out else "")
                          + "  pass rates " + " ".join(f"{k}={v:.2f}" for k, v in out.items() if "_pass_" in k))
        if accelerator.is_main_process:
            n = min(args.grid_rows, len(held_out))
            os.makedirs(os.path.join(out_dir, "eval"), exist_ok=True)
            sheet = save_grid(os.path.join(out_dir, "eval", f"step_{step:05d}.png"), held_out[:n],
                              [C.load_image(r["source"], r["id"]) for r in held_out[:n]],
                              [im for _, _, im in gathered[:n * args.eval_seeds]], recs[:n * args.eval_seeds],
                              args.eval_seeds)
            if args.report_to in ("tensorboard", "all"):
                accelerator.get_tracker("tensorboard").log_images(
                    {"eval/grid": np.asarray(sheet)[None]}, step=step, dataformats="NHWC")
        return out

    history = {"eval": [{"step": start, **evaluate("start", start)}], "train": []}
    t0, skipped_in_a_row = time.time(), 0
    for step in tqdm(range(start, args.steps), initial=start, total=args.steps, desc="flow_grpo",
                     disable=not accelerator.is_local_main_process):
        tic = time.time()
        lr = args.lr * min(1.0, (step + 1) / max(1, args.warmup_steps))
        for g in opt.param_groups:
            g["lr"] = lr
        ctx_ids = step_contexts(step, len(train), args.contexts_per_step, args.seed)
        ks = list(range(rank * n_local, (rank + 1) * n_local))                  # my global sample indices
        my_rows = [train[ctx_ids[k // G]] for k in ks]
        seeds = [sample_seed(args.seed, step, k) for k in ks]
        init_seeds = None if args.init_noise == "sample" else [sample_seed(args.seed, f"{step}/x_T", k // G) for k in ks]

        # 1. rollout: n_local SDE trajectories (the G samples of a context share its encoding)
        tr.eval()
        imgs, traj, ctx, idx = generate(my_rows, seeds, args.noise_level, [r["id"] for r in my_rows], init_seeds)
        t_roll = time.time() - tic

        # 2. score: the RRM's verdicts on every edit (None = unparseable: counted, never invented)
        recs = judge(my_rows, imgs, seeds)
        reward = torch.tensor([r["reward"] if r["reward"] is not None else 0.0 for r in recs], device=device)
        valid = torch.tensor([float(r["reward"] is not None) for r in recs], device=device)
        t_score = time.time() - tic - t_roll

        # 3. advantages on the GATHERED step (a group may span processes), identical everywhere
        all_r, all_v = accelerator.gather(reward).cpu().numpy(), accelerator.gather(valid).cpu().numpy() > 0  # (N,)
        adv_all, live = group_advantages(all_r, all_v, G, args)                  # (N,), (N/G,)
        adv = torch.tensor(adv_all[ks], dtype=torch.float32, device=device)     # (n,)
        live_samples = [k for k in range(N) if live[k // G]]

        # 4. update: minibatches of live samples (global, seeded), each an optimizer step whose
        # gradient accumulates over (sample, trained step) transitions in micro-batches.
        # Per-transition loss = Eq. E + beta * Eq. F, averaged over the minibatch's transitions.
        tr.train()
        stats = {"clip_frac": [], "ratio_dev_first": [], "kl": [], "loss": []}
        grad_norm, n_minibatches = torch.tensor(0.0), 0
        std_k = noise_stds(sched[0], trained, args.noise_level)                  # (K,)
        for epoch in range(args.inner_epochs if live_samples else 0):
            perm = [live_samples[i] for i in np.random.default_rng([args.seed, step, epoch]).permutation(len(live_samples))]
            for mb_i, mb in enumerate(np.array_split(perm, min(args.minibatches, len(perm)))):
                trans = [(k - ks[0], j) for k in mb if ks[0] <= k <= ks[-1] for j in range(K)]  # local (sample, step)
                denom = len(mb) * K                                               # GLOBAL transitions of this minibatch
                chunks = [trans[i:i + args.micro_batch] for i in range(0, len(trans), args.micro_batch)] or [[]]
                for ci, ch in enumerate(chunks):
                    sync = ci == len(chunks) - 1
                    with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                        if not ch:  # nothing of this minibatch lives here: a zero loss keeps DDP in step
                            accelerator.backward(sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0)
                            continue
                        si = torch.tensor([i for i, _ in ch], device=device)     # (b,)
                        sj = torch.tensor([j for _, j in ch], device=device)     # (b,)
                        step_idx = torch.tensor([trained[j] for _, j in ch])     # (b,) denoising step
                        x, x_next = traj["x"][si, sj], traj["x_next"][si, sj]      # (b, L, C)
                        std_t = std_k[sj.cpu()]                                    # (b,)
                        if args.beta > 0:  # the reference first: disabling the LoRA toggles requires_grad
                            with torch.no_grad(), reference_policy(tr), accelerator.autocast():
                                mean_ref, _ = transition_mean(tr, pipe, ctx, idx[si], x, step_idx, sched, std_t, args)
                        with accelerator.autocast():
                            mean, s = transition_mean(model, pipe, ctx, idx[si], x, step_idx, sched, std_t, args)
                        logp = gaussian_logprob(x_next, mean, s, args.logprob_reduce)          # (b,)
                        pg, ratio = clipped_objective(logp, traj["logp"][si, sj], adv[si], args.clip_range)
                        kl = gaussian_kl(mean, mean_ref, s, args.logprob_reduce) if args.beta > 0 else torch.zeros_like(pg)
                        per = pg + args.beta * kl                                 # (b,)
                        accelerator.backward(per.sum() / denom * W)               # DDP averages over W
                        stats["loss"].append(float(per.detach().sum()) / denom)
                        stats["kl"] += kl.tolist()
                        stats["clip_frac"] += ((ratio.detach() - 1).abs() > args.clip_range).float().tolist()
                        if epoch == 0 and mb_i == 0:
                            stats["ratio_dev_first"].append(float((ratio.detach() - 1).abs().max()))
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                n_minibatches += 1
                if torch.isfinite(grad_norm):   # the norm is of the all-reduced gradient: every process agrees
                    opt.step()
                    skipped_in_a_row = 0
                else:  # one NaN/inf gradient would turn the LoRA, and every later edit, into NaN
                    counters["nonfinite_grad_skipped"] = counters.get("nonfinite_grad_skipped", 0) + 1
                    skipped_in_a_row += 1
                    accelerator.print(f"step {step + 1}: non-finite gradient norm ({float(grad_norm)}), update skipped "
                                      f"(counted in summary.json counters; try without --bf16 to see if it is precision)")
                    if skipped_in_a_row >= 5:  # not a stray batch: the run would end with its LoRA untouched
                        raise SystemExit(f"{skipped_in_a_row} updates in a row had a non-finite gradient norm; "
                                         f"stopping (check the attention kernel, --bf16 and --lr)")
                opt.zero_grad(set_to_none=True)

        # 5. log / eval / checkpoint (all numbers gathered over processes)
        all_recs = [r for part in gather_object([recs]) for r in part]
        st = {k: [x for part in gather_object([v]) for x in part] for k, v in stats.items()}
        logs = {f"train/{k}": v for k, v in summarize(all_recs).items()}
        if "gt_utility" in all_recs[0]:  # does the RRM's ranking within a group agree with the truth?
            u = np.array([r["gt_utility"] for r in all_recs]).reshape(-1, G)
            u = (u - u.mean(1, keepdims=True)).reshape(-1)                      # (N,) centred per group
            ok = np.repeat(live, G) & (np.abs(u) > 0)
            logs["train/adv_gt_corr"] = float(np.corrcoef(adv_all[ok], u[ok])[0, 1]) if ok.sum() > 2 and adv_all[ok].std() > 0 else 0.0
        logs.update({"train/zero_var_groups": float(1 - live.mean()), "train/lr": lr, "train/grad_norm": float(grad_norm),
                     "train/loss": float(np.sum(st["loss"]) / max(1, n_minibatches)),  # mean over minibatches
                     "train/kl": float(np.mean(st["kl"])) if st["kl"] else 0.0,
                     "train/clip_frac": float(np.mean(st["clip_frac"])) if st["clip_frac"] else 0.0,
                     "train/ratio_dev_first": float(np.max(st["ratio_dev_first"])) if st["ratio_dev_first"] else 0.0,
                     "train/unparseable": float(1 - all_v.mean()), "time/rollout_s": t_roll, "time/score_s": t_score,
                     "time/step_s": time.time() - tic})
        history["train"].append({"step": step + 1, **logs})
        accelerator.print(f"step {step + 1}/{args.steps}  reward {logs['train/reward']:.2f}  parse "
                          f"{logs['train/parse_rate']:.2f}  zero-var groups {logs['train/zero_var_groups']:.2f}  "
                          f"kl {logs['train/kl']:.2e}  clip {logs['train/clip_frac']:.2f}  "
                          + (f"gt utility {logs['train/gt_utility']:.2f}  " if "train/gt_utility" in logs else "")
                          + f"({t_roll:.1f}s roll, {t_score:.1f}s score, {time.time() - tic:.1f}s)")
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            ev = evaluate(f"step {step + 1}", step + 1)
            history["eval"].append({"step": step + 1, **ev})
            logs.update({f"eval/{k}": v for k, v in ev.items() if not isinstance(v, dict)})
        accelerator.log(logs, step=step + 1)
        if args.checkpoint_every and (step + 1) % args.checkpoint_every == 0:
            accelerator.wait_for_everyone()
            accelerator.save_state(os.path.join(ckpt_dir, f"checkpoint-{step + 1}"))
            if accelerator.is_main_process:
                old = sorted(int(d.split("-")[1]) for d in os.listdir(ckpt_dir) if d.startswith("checkpoint-"))
                for s in old[:-args.checkpoints_total_limit]:
                    shutil.rmtree(os.path.join(ckpt_dir, f"checkpoint-{s}"), ignore_errors=True)

    final = evaluate("final", args.steps)
    history["eval"].append({"step": args.steps, **final})
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_lora(pipe_cls, accelerator.unwrap_model(model), out_dir)   # pipe.load_lora_weights(out_dir)
        C.write_json_atomic(os.path.join(out_dir, "summary.json"), {
            "eval_start": history["eval"][0], "eval_final": final, "history": history, "counters": counters,
            "minutes": round((time.time() - t0) / 60, 2), "args": vars(args)})
    accelerator.end_training()
    return {"start": history["eval"][0], "final": final, "history": history, "counters": counters}


if __name__ == "__main__":
    main(HfArgumentParser(Args).parse_args_into_dataclasses()[0])
