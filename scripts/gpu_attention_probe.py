"""scripts/gpu_attention_probe.py -- is the Flow-GRPO LoRA gradient finite, per attention kernel?

    python scripts/gpu_attention_probe.py RUN_DIR [POLICY]      (RUN_DIR holds data/contexts.jsonl)

Why it exists: on an H200 (torch 2.11, cu130) a Flow-GRPO run of the tiny Kontext editor in bf16
turned its LoRA into NaN after the first update. This probe takes one rollout of 4 training
contexts x 2 samples, then one backward of flow_grpo.py's own log-prob objective, under each
scaled-dot-product-attention kernel (default dispatch, math, flash, memory-efficient, cuDNN),
with and without gradient checkpointing, in bf16 (frozen weights bf16, LoRA float32, as
flow_grpo.py --bf16) and in float32. It prints the gradient norm and how many LoRA tensors got
a non-finite gradient. Measured there (README, "GPU check"): only cuDNN's kernel (which the
default dispatch picks) gave NaN, in bf16; hence `torch.backends.cuda.enable_cudnn_sdp(False)`
in the three training scripts. On a CPU only the default and math kernels exist.
"""
import contextlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402
from diffusers.training_utils import cast_training_params  # noqa: E402
from peft import LoraConfig  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

import common as C  # noqa: E402
import flow_grpo as F  # noqa: E402

device = "cuda" if torch.cuda.is_available() else "cpu"
run = sys.argv[1]
policy = sys.argv[2] if len(sys.argv) > 2 else "miniworld/checkpoints/kontext"
args = F.Args(policy=policy, run_dir=run)
rows = [r for r in C.read_jsonl(os.path.join(run, "data", "contexts.jsonl")) if r["split"] == "train"][:4]
kernels = {"default": None, "math": SDPBackend.MATH}
if device == "cuda":
    kernels.update(flash=SDPBackend.FLASH_ATTENTION, efficient=SDPBackend.EFFICIENT_ATTENTION,
                   cudnn=SDPBackend.CUDNN_ATTENTION)

for bf16 in (True, False):
    # the policy as flow_grpo.py builds it: frozen pipeline, LoRA on the transformer (B = 0)
    pipe = C.load_edit_pipeline(policy, dtype=torch.bfloat16 if bf16 else torch.float32).to(device)
    pipe.set_progress_bar_config(disable=True)
    for m in (pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None), pipe.transformer):
        if m is not None:
            m.requires_grad_(False).eval()
    tr = pipe.transformer
    tr.add_adapter(LoraConfig(r=8, lora_alpha=16, init_lora_weights="gaussian", target_modules=F.LORA_TARGETS))
    cast_training_params(tr, dtype=torch.float32)
    autocast = (lambda: torch.autocast(device, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    # one rollout: 2 samples per context, the first 2 denoising steps stochastic (the default)
    with torch.no_grad():
        ctx = F.encode_contexts(pipe, [C.load_image(r["source"]) for r in rows], [r["instruction"] for r in rows],
                                args, device)
    sched = F.schedule(pipe, args.num_steps, (args.resolution // 16) ** 2)
    trained = [0, 1]
    idx = torch.arange(len(rows), device=device).repeat_interleave(2)          # (8,) context of each sample
    _, traj = F.denoise(tr, pipe, ctx, idx, list(range(len(idx))), sched, trained, args.noise_level, args, autocast)
    std_k = F.noise_stds(sched[0], trained, args.noise_level)
    si = torch.arange(len(idx), device=device)                                 # every sample ...
    sj = torch.tensor([0, 1] * len(rows), device=device)                       # ... at one of its trained steps
    adv = torch.randn(len(idx), generator=torch.Generator().manual_seed(0)).to(device)

    for checkpointing in (False, True):
        tr.enable_gradient_checkpointing() if checkpointing else tr.disable_gradient_checkpointing()
        for name, kernel in kernels.items():
            tr.zero_grad(set_to_none=True)
            try:
                with sdpa_kernel([kernel]) if kernel is not None else contextlib.nullcontext():
                    with autocast():
                        mean, s = F.transition_mean(tr, pipe, ctx, idx[si], traj["x"][si, sj],
                                                    torch.tensor([trained[j] for j in sj.tolist()]), sched,
                                                    std_k[sj.cpu()], args)
                    logp = F.gaussian_logprob(traj["x_next"][si, sj], mean, s, "mean")      # (8,)
                    (-(logp * adv).sum()).backward()
            except RuntimeError as e:  # e.g. flash attention has no float32 kernel
                print(f"bf16={bf16!s:5} checkpointing={checkpointing!s:5} sdpa={name:9} not available: {str(e)[:80]}")
                continue
            grads = {n: p.grad for n, p in tr.named_parameters() if p.grad is not None}
            bad = [n for n, g in grads.items() if not torch.isfinite(g).all()]
            norm = torch.sqrt(sum((g.float() ** 2).sum() for g in grads.values()))
            print(f"bf16={bf16!s:5} checkpointing={checkpointing!s:5} sdpa={name:9} forward finite="
                  f"{bool(torch.isfinite(mean).all())}  grad norm {float(norm):.3e}  non-finite LoRA grads "
                  f"{len(bad)}/{len(grads)} {bad[:2]}", flush=True)
