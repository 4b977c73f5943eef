"""scripts/flow_grpo_probe.py -- a positive control for flow_grpo.py's update (issue #7).

One training context of a mini run, the world's exact utility as the reward (the oracle), G
SDE edits per update, the Flow-GRPO loss without KL, AdamW on a fresh LoRA. Each update prints
the group's mean reward and sum_i A_i * (log p_after - log p_before) of the batch it trained
on (> 0 when the update goes the right way). Uses flow_grpo.py's own functions.

    python scripts/flow_grpo_probe.py [RUN_DIR] [LR] [G] [UPDATES]     # default runs/mini 3e-3 16 12
    env: POLICY=<pipeline folder>, CONTEXT=<context id> (default: the first color_alter one),
         INIT_NOISE=group (the G edits share their starting noise)
"""
import contextlib
import os
import sys

import numpy as np
import torch
from peft import LoraConfig

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common as C  # noqa: E402
import flow_grpo as F  # noqa: E402

run, lr, G, updates = (sys.argv[1:] + ["runs/mini", "3e-3", "16", "12"][len(sys.argv) - 1:])[:4]
lr, G, updates = float(lr), int(G), int(updates)
torch.set_num_threads(1)
torch.manual_seed(0)
args = F.Args(run_dir=run, reward_backend="mini:truth", policy=os.environ.get("POLICY", F.Args.policy),
              init_noise=os.environ.get("INIT_NOISE", "sample"))
row = next(r for r in C.read_jsonl(os.path.join(run, "data", "contexts.jsonl"))     # CONTEXT=<id> picks one
           if r["split"] == "train" and r["principles"] and (r["id"] == os.environ["CONTEXT"] if "CONTEXT" in os.environ
                                                             else r.get("category") == "color_alter"))
pipe = C.load_edit_pipeline(args.policy)
pipe.set_progress_bar_config(disable=True)
pipe.transformer.requires_grad_(False)
pipe.transformer.add_adapter(LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, init_lora_weights="gaussian",
                                        target_modules=F.LORA_TARGETS))
lora = [p for p in pipe.transformer.parameters() if p.requires_grad]
opt = torch.optim.AdamW(lora, lr=lr)
judge = F.make_judge(args, "cpu", {})
sched = F.schedule(pipe, args.num_steps, (args.resolution // 16) ** 2)
trained = list(range(args.num_steps))[:-1]
std_k = F.noise_stds(sched[0], trained, args.noise_level)
ctx = F.encode_contexts(pipe, [C.load_image(row["source"])], [row["instruction"]], args, "cpu")
idx = torch.zeros(G, dtype=torch.long)
print(f"context {row['id']}: {row['instruction']!r}; lr {lr}, G {G}")


def logps(traj):  # (G, K): the log-prob of every recorded transition under the current LoRA
    return torch.stack([F.gaussian_logprob(traj["x_next"][:, j], *F.transition_mean(
        pipe.transformer, pipe, ctx, idx, traj["x"][:, j], torch.full((G,), trained[j]), sched,
        std_k[[j] * G], args), "mean") for j in range(len(trained))], 1)


for it in range(updates):
    seeds = list(range(it * 1000, it * 1000 + G))
    with torch.no_grad():
        x0, traj = F.denoise(pipe.transformer, pipe, ctx, idx, seeds, sched, trained, args.noise_level, args,
                             contextlib.nullcontext, [it] * G if args.init_noise == "group" else None)
    r = np.array([rec["reward"] for rec in judge([row] * G, F.decode(pipe, x0, args.resolution), seeds)])
    adv = torch.tensor(F.group_advantages(r, np.ones(G, bool), G, args)[0], dtype=torch.float32)
    lp = logps(traj)
    loss, _ = F.clipped_objective(lp, traj["logp"], adv[:, None], args.clip_range)
    opt.zero_grad()
    loss.mean().backward()
    opt.step()
    with torch.no_grad():
        gain = float((adv * (logps(traj) - lp.detach()).sum(1)).sum())
    print(f"update {it}: reward {r.mean():.2f} (std {r.std():.2f})  sum A*dlogp {gain:+.3e}", flush=True)
