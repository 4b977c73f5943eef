"""gcpo.py -- Group Contrastive Preference Optimization of the RRM (Edit-R1 paper Sec. 3.3).

The reasoning reward model is the policy; human preference pairs are the data. For a pair
(winner x_w, loser x_l) of the same source and instruction:

  1. rollout     sample N trajectories for x_w and N for x_l (one batched generation)
  2. score       parse each trajectory's final <score>: tau^w_j, tau^l_j   (common.py)
  3. advantages  win ratio  r^w_j = (1/N) #{k : tau^w_j > tau^l_k}          (Eq. 2)
                 loss ratio r^l_j = (1/N) #{k : tau^l_j < tau^w_k}
                 A^w_j = r^w_j - mean(r^w),  A^l_j = r^l_j - mean(r^l)       (Eq. 3, no std)
  4. update      PPO clipped surrogate, token-level ratio, mean over each sequence's tokens,
                 then over the 2N sequences; NO KL term                     (Eq. 4)
  5. log / eval / checkpoint

The pairing is used only to compute the ratios: each trajectory is then rewarded like a
point-wise scorer would be (the paper: "discarding the original pairs").
A pair whose 2N rollouts give all-zero advantages (fully separated, or all tied) carries no
signal: it is counted and skipped. A pair's 2N rollouts always live on one process, so the
advantages never depend on the number of processes.

Run
  python gcpo.py                                        # mini world, CPU, ~3 min on 2 threads, after sft_rrm.py
  accelerate launch gcpo.py --model runs/real/sft_rrm --run_dir runs/real --variant full \\
      --n 8 --pairs_per_step 32 --per_device_pairs 4 --lr 1e-6 --steps 500 --max_new_tokens 1024 --bf16 \\
      --gradient_checkpointing                                                   # 1 GPU
  accelerate launch --config_file configs/zero2.yaml gcpo.py ...same flags...    # 8 GPUs

Legend: P = pairs in a step, N = trajectories per image, S = 2PN sequences, T = completion tokens.
"""
from __future__ import annotations

import os
import random
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
    # --- data and model
    model: str = field(default="runs/mini/sft_rrm", metadata={"help": "the SFT-RRM to start from (folder or hub id)"})
    run_dir: str = field(default="runs/mini", metadata={"help": "run folder: reads <run_dir>/data/pairs_*.jsonl"})
    output_name: str = field(default="gcpo_rrm", metadata={"help": "output subfolder of run_dir"})
    variant: str = field(default="compact", metadata={"help": "verify prompt wording; must match SFT"})
    # --- GCPO (the paper leaves all of these open; defaults are ours)
    n: int = field(default=4, metadata={"help": "N: trajectories per image (2N per pair; mini 4, paper-scale 8)"})
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature of rollouts (and of the ratio's log-probs); mini: 0.7 (at 1.0 the tiny RRM's samples parse less)"})
    max_new_tokens: int = field(default=256, metadata={"help": "max completion tokens"})
    clip_eps: float = field(default=0.2, metadata={"help": "PPO clip range epsilon"})
    unparseable: str = field(default="worst", metadata={"help": "unparseable score policy: worst (ratio 0, pushed down) or exclude (advantage 0); see common.gcpo_ratios"})
    inner_epochs: int = field(default=1, metadata={"help": "passes over each step's rollouts (1 = on-policy; >1 uses the clip)"})
    pairs_per_step: int = field(default=4, metadata={"help": "GLOBAL pairs per optimizer step"})
    per_device_pairs: int = field(default=4, metadata={"help": "pairs per process per step (rollouts)"})
    micro_batch: int = field(default=32, metadata={"help": "sequences per forward/backward in the update"})
    share_prefix: bool = field(default=True, metadata={"help": "encode each prompt (images included) once and share its KV cache across its N samples, in generation and in the update (exact); off = HF generate + full forward"})
    lr: float = field(default=2e-5, metadata={"help": "AdamW learning rate (constant after warm-up; mini 2e-5 for 60 steps: +5.0 to +5.6 test points in 3 seeds where 1e-5 gave +0.4 to +4.4; at 5e-5 an older SFT-RRM fell from 0.68 to 0.38 val accuracy in 20 steps, at 2e-4 its language collapsed; 7B ~1e-6)"})
    warmup_steps: int = field(default=3, metadata={"help": "linear warm-up steps"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping"})
    steps: int = field(default=60, metadata={"help": "optimizer steps (mini: 60 x 4 pairs; with both evaluations ~3 min alone on 2 threads, ~4 on one thread beside another job)"})
    lora_r: int = field(default=0, metadata={"help": "LoRA rank (0 = full fine-tuning)"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "trade compute for memory (GPU)"})
    bf16: bool = field(default=False, metadata={"help": "bf16 mixed precision (GPU)"})
    # --- evaluation, logging, checkpoints
    eval_every: int = field(default=0, metadata={"help": "held-out pairwise accuracy every N steps (0 = start and end only)"})
    eval_split: str = field(default="val", metadata={"help": "pairs_<split>.jsonl for evaluation"})
    eval_max_pairs: int = field(default=80, metadata={"help": "cap on evaluated pairs"})
    report_to: str = field(default="tensorboard", metadata={"help": "tensorboard, wandb, all or none"})
    checkpoint_every: int = field(default=0, metadata={"help": "save_state every N steps (0 = never)"})
    checkpoints_total_limit: int = field(default=2, metadata={"help": "keep at most this many checkpoints"})
    resume_from_checkpoint: str = field(default="", metadata={"help": "a checkpoint folder or 'latest'"})
    seed: int = field(default=0, metadata={"help": "random seed"})


# =========================================================================================
def step_pairs(step: int, n_pairs: int, per_step: int, seed: int) -> list[int]:
    """Pairs of optimizer step `step` (seeded permutation per epoch): resumable exactly."""
    per_epoch = n_pairs // per_step
    epoch, k = divmod(step, per_epoch)
    perm = list(range(n_pairs))
    random.Random(seed * 7919 + epoch).shuffle(perm)
    return perm[k * per_step:(k + 1) * per_step]


def hash_seed(*parts) -> int:
    """A 63-bit seed from integers (stable across runs and processes, unlike hash())."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def pair_advantages(scores: list[list], n: int, policy: str):
    """ALGO (Eq. 2-3) for a batch of pairs. scores: 2P lists of N scores (winner of pair i
    at 2i, loser at 2i+1). Returns advantages (2PN,) in rollout order, rewards (2PN,),
    and per pair whether it carries signal (some advantage != 0)."""
    adv, rew, live = [], [], []
    for i in range(0, len(scores), 2):
        a_w, a_l, r_w, r_l = C.gcpo_advantages(scores[i], scores[i + 1], unparseable=policy)
        adv += [*a_w, *a_l]
        rew += [*r_w, *r_l]
        live.append(bool(np.any(a_w != 0) or np.any(a_l != 0)))
    return torch.tensor(adv, dtype=torch.float32), np.array(rew), live




# =========================================================================================
def main(args: Args) -> dict:
    out_dir = os.path.join(args.run_dir, args.output_name)
    # INFRA: a precaution. cuDNN's fused attention backward (the default SDPA kernel on H100/H200)
    # gave NaN gradients to flow_grpo.py's Kontext LoRA in bf16 on an H200 (README "GPU check");
    # the same kernel class NaN'd Qwen2.5 DPO (huggingface/trl#7181, pytorch/pytorch#196678). Flash,
    # memory-efficient and math attention are unaffected, so training leaves it out. CPU: no effect.
    torch.backends.cuda.enable_cudnn_sdp(False)
    accelerator = Accelerator(mixed_precision="bf16" if args.bf16 else None,
                              log_with=None if args.report_to == "none" else args.report_to, project_dir=out_dir)
    W, rank = accelerator.num_processes, accelerator.process_index
    if args.pairs_per_step != W * args.per_device_pairs:
        raise SystemExit(f"--pairs_per_step ({args.pairs_per_step}) must equal processes x --per_device_pairs "
                         f"({W} x {args.per_device_pairs}): a pair's 2N rollouts stay on one process")
    set_seed(args.seed + rank)  # different samples per process, same init

    # INFRA: data (pairs written by build_data.py) and model
    data_dir = os.path.join(args.run_dir, "data")
    need = ("source", "winner", "loser", "instruction", "principles")
    pairs = C.read_jsonl(os.path.join(data_dir, "pairs_train.jsonl"), required=need)
    eval_pairs = C.read_jsonl(os.path.join(data_dir, f"pairs_{args.eval_split}.jsonl"), required=need)[:args.eval_max_pairs]
    for i, p in enumerate(pairs):
        if not p["principles"]:
            raise C.DataError(f"{data_dir}/pairs_train.jsonl row {i + 1} (id {p.get('id')}): empty principles; "
                              f"rebuild the data or drop the row")
    if len(pairs) < args.pairs_per_step:
        raise C.DataError(f"only {len(pairs)} training pairs, fewer than --pairs_per_step {args.pairs_per_step}")
    model, processor = C.load_rrm(args.model)
    if args.lora_r:
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(
            r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
            target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"))
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                            betas=(0.9, 0.99), weight_decay=args.weight_decay)
    model, opt = accelerator.prepare(model, opt)
    base = accelerator.unwrap_model(model)
    core = base.get_base_model() if args.lora_r else base

    ckpt_dir, start = os.path.join(out_dir, "checkpoints"), 0
    if args.resume_from_checkpoint:
        path = C.latest_checkpoint(ckpt_dir) if args.resume_from_checkpoint == "latest" else args.resume_from_checkpoint
        if path:
            accelerator.load_state(path)
            start = int(path.rstrip("/").split("-")[-1])
            set_seed(args.seed + rank + 1000 * start)  # rollouts after resume: same as an unbroken run
            accelerator.print(f"resumed from {path} at step {start}")
    if accelerator.is_main_process and args.report_to != "none":
        accelerator.init_trackers("gcpo", config=vars(args))

    def evaluate(tag: str) -> dict:
        shard = eval_pairs[rank::W]
        res = C.evaluate_pairs(core, processor, shard, args.variant, args.max_new_tokens) if shard else {"scores": []}
        scores = [None] * (2 * len(eval_pairs))
        for r, s in enumerate(gather_object([res["scores"]])):
            for j, v in enumerate(s):
                scores[2 * (r + W * (j // 2)) + j % 2] = v
        acc = C.pairwise_accuracy(scores[0::2], scores[1::2])
        valid = [s for s in scores if s is not None]
        out = {"accuracy": acc["accuracy"], "ties": acc["ties"], "parse_rate": len(valid) / max(len(scores), 1),
               "mean_score": sum(valid) / max(len(valid), 1)}
        accelerator.print(f"[eval {tag}] pairwise accuracy {out['accuracy']:.3f}  ties {out['ties']:.3f}  parse "
                          f"{out['parse_rate']:.3f}  mean score {out['mean_score']:.2f}  ({len(eval_pairs)} pairs)")
        return out

    history = {"eval": [{"step": start, **evaluate("start")}], "train": []}
    t0 = time.time()
    for step in tqdm(range(start, args.steps), initial=start, total=args.steps, desc="gcpo",
                     disable=not accelerator.is_local_main_process):
        set_seed(args.seed + rank + 1000 * step)  # rollouts depend on the step only (resume = unbroken run)
        lr = args.lr * min(1.0, (step + 1) / max(1, args.warmup_steps))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = step_pairs(step, len(pairs), args.pairs_per_step, args.seed)
        local = [pairs[i] for i in idx[rank * args.per_device_pairs:(rank + 1) * args.per_device_pairs]]

        # 1. rollout: 2P prompts (winner, loser of each pair), N samples each, one generation
        core.eval()
        reqs, prins = C.pair_requests(local)
        msgs = [C.verify_messages(ins, p, args.variant) for (_, _, ins), p in zip(reqs, prins)]
        prompts = C.encode_prompts(processor, msgs, [[s, e] for s, e, _ in reqs])      # (2P, L)
        if args.share_prefix:  # one seed per trajectory from (seed, step, pair, side, j):
            first = rank * args.per_device_pairs  # the same samples on 1 or k processes
            seeds = [hash_seed(args.seed, step, first + i // 2, i % 2, j)
                     for i in range(len(reqs)) for j in range(args.n)]
            gen = C.generate_shared(core, processor, prompts, n=args.n, temperature=args.temperature,
                                    max_new_tokens=args.max_new_tokens, seeds=seeds)
        else:
            gen = C.generate_n(core, processor, prompts, n=args.n, temperature=args.temperature,
                               max_new_tokens=args.max_new_tokens)
        ids, mask, old_logp = gen["completion_ids"], gen["completion_mask"], gen["old_logp"]  # (S, T)

        # 2. score: parse every trajectory (None = unparseable, never invented)
        parsed = [[C.parse_rrm_output(t, len(p)) for t in texts] for texts, p in zip(gen["texts"], prins)]
        scores = [[C.aggregate_score(x) for x in row] for row in parsed]                # 2P x N

        # 3. advantages (Eq. 2-3), per pair, on this process
        adv, rew, live = pair_advantages(scores, args.n, args.unparseable)             # (S,)

        # 4. update: PPO clip (Eq. 4), mean over tokens then over ALL S local sequences.
        # Sequences with zero advantage add exactly 0 to the loss and its gradient, so only
        # live ones are run; the denominator stays S, as in the paper's 1/(2N) per pair.
        core.train()
        # HF turns the KV cache off under gradient checkpointing, so the shared-prefix update
        # (which needs the prompt's cache) falls back to the full forward there.
        share = args.share_prefix and not args.gradient_checkpointing
        full = None if share else C.repeat_prompts(prompts, args.n)
        rows = torch.nonzero(adv != 0).flatten().tolist()
        S = adv.numel()
        stats = {"clip_frac": [], "approx_kl": [], "ratio_mean": []}
        for _ in range(args.inner_epochs):
            chunks = [rows[i:i + args.micro_batch] for i in range(0, len(rows), args.micro_batch)] or [[]]
            for ci, rb in enumerate(chunks):
                sync = ci == len(chunks) - 1
                with torch.enable_grad() if sync else accelerator.no_sync(model):
                    if rb and share:  # each prompt once, its cache gathered per row
                        uniq = sorted({r // args.n for r in rb})
                        where = [uniq.index(r // args.n) for r in rb]
                        logp = C.completion_logprobs_shared(model, C.select_rows(prompts, uniq), where,
                                                            ids[rb], mask[rb], args.temperature)  # (b, T)
                    elif rb:
                        logp = C.completion_logprobs(model, C.select_rows(full, rb), ids[rb], mask[rb],
                                                     args.temperature)                          # (b, T)
                    if rb:
                        loss, st = C.ppo_clip_loss(logp, old_logp[rb], adv[rb], mask[rb], args.clip_eps)
                        loss = loss * len(rb) / S
                        for k in stats:
                            stats[k].append(st[k])
                    else:  # nothing to learn on this process: a real forward of one row times 0
                        # keeps DDP in step (its gradient all-reduce needs a forward on every process)
                        loss = C.completion_logprobs_shared(model, C.select_rows(prompts, [0]), [0], ids[:1],
                                                            mask[:1]).sum() * 0.0 if share else \
                            C.completion_logprobs(model, C.select_rows(full, [0]), ids[:1], mask[:1]).sum() * 0.0
                    accelerator.backward(loss)
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)

        # 5. log / eval / checkpoint (all numbers gathered over processes)
        lengths = mask.sum(1).float().cpu()                                          # adv lives on the CPU
        valid = [s for row in scores for s in row if s is not None]
        local_log = {"reward": float(np.mean(valid)) if valid else 0.0, "parse_rate": len(valid) / S,
                     "win_ratio": float(np.mean(rew)), "zero_adv_pairs": 1 - float(np.mean(live)),
                     "length": float(lengths.mean()),
                     # the paper's Fig. 3c: do positively-rewarded trajectories get longer?
                     "adv_weighted_length": float((adv * lengths).sum() / max(float(adv.abs().sum()), 1e-9)),
                     **{k: float(np.mean(v)) if v else 0.0 for k, v in stats.items()}}
        logs = {f"train/{k}": float(np.mean(v)) for k, v in
                {k: [d[k] for d in gather_object([local_log])] for k in local_log}.items()}
        every = [s for part in gather_object([valid]) for s in part]  # a mean over all parsed scores,
        logs["train/reward"] = float(np.mean(every)) if every else 0.0  # not a mean of process means
        logs["train/lr"], logs["train/grad_norm"] = lr, float(grad_norm)
        history["train"].append({"step": step + 1, **logs})
        accelerator.print(f"step {step + 1}/{args.steps}  reward {logs['train/reward']:.2f}  parse "
                          f"{logs['train/parse_rate']:.2f}  zero-adv pairs {logs['train/zero_adv_pairs']:.2f}  "
                          f"clip {logs['train/clip_frac']:.3f}  len {logs['train/length']:.0f}")
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            ev = evaluate(f"step {step + 1}")
            history["eval"].append({"step": step + 1, **ev})
            logs.update({f"eval/{k}": v for k, v in ev.items()})
        accelerator.log(logs, step=step + 1)
        if args.checkpoint_every and (step + 1) % args.checkpoint_every == 0:
            C.save_checkpoint(accelerator, ckpt_dir, step + 1, args.checkpoints_total_limit)

    final = evaluate("final")
    history["eval"].append({"step": args.steps, **final})
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        to_save = base.merge_and_unload() if args.lora_r else base
        to_save.save_pretrained(out_dir)
        processor.save_pretrained(out_dir)
        C.write_json_atomic(os.path.join(out_dir, "summary.json"), {
            "eval_start": history["eval"][0], "eval_final": final, "history": history,
            "minutes": round((time.time() - t0) / 60, 2), "args": vars(args)})
    accelerator.end_training()
    return {"start": history["eval"][0], "final": final, "history": history}


if __name__ == "__main__":
    main(HfArgumentParser(Args).parse_args_into_dataclasses()[0])
