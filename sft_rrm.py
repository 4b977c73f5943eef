"""sft_rrm.py -- cold-start SFT of the reasoning reward model (Edit-R1 paper Sec. 3.2).

A Qwen2.5-VL model learns to write, for (source image, edited image, instruction, principles),
the selected chain-of-thought trajectory of build_data.py: reasoning, per-principle 0/1
verdicts, their average and a final <score>. Loss: negative log-likelihood of the assistant
completion only (prompt and image tokens masked), mean over each sequence's tokens, then
over sequences -- so 1 process with batch B and k processes with batch B/k take the same step.

Batches are drawn by length (--group_by_length): each epoch's shuffled rows are cut into
windows of 16 batches, each window sorted by token count and cut into batches served in a
shuffled order, so a batch pads less (the idea of HF Trainer's group_by_length; in the mini
run 12% fewer tokens a batch: 332 instead of 377 a row). What it deliberately does not do:
packing, curriculum, or any reward. GCPO (gcpo.py) is the next stage. Held-out pairwise
accuracy and parse rate are measured with common.py's parser, the same numbers evaluate.py
reports.

Run
  python sft_rrm.py                                    # mini world, CPU, 500 steps: ~5.1 min on 2 threads, ~9 on one
  python sft_rrm.py --sft_set think_only               # the paper's Think-only ablation
  accelerate launch sft_rrm.py --model Qwen/Qwen2.5-VL-7B-Instruct --run_dir runs/real \\
      --batch_size 64 --per_device_batch_size 4 --lr 1e-5 --epochs 2 --bf16 \\
      --gradient_checkpointing --max_length 4096 --variant full          # 1 GPU
  accelerate launch --config_file configs/zero2.yaml sft_rrm.py ...same flags...  # 8 GPUs
Resume: add --resume_from_checkpoint latest (continues the same data order and schedule).

Legend: B = sequences in a (local) batch, L = prompt tokens, T = completion tokens.
"""
from __future__ import annotations

import json
import math
import os
import random
import re
import time
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from tqdm import tqdm
from transformers import HfArgumentParser

import common as C


@dataclass
class Args:
    # --- data and model
    model: str = field(default="miniworld/checkpoints/rrm_base", metadata={"help": "Qwen2.5-VL checkpoint (folder or hub id)"})
    run_dir: str = field(default="runs/mini", metadata={"help": "run folder: reads <run_dir>/data, writes <run_dir>/<output_name>"})
    sft_set: str = field(default="think_verify", metadata={"help": "think_verify (the paper's T+V) or think_only (T)"})
    output_name: str = field(default="", metadata={"help": "output subfolder (default sft_rrm or sft_rrm_think_only)"})
    variant: str = field(default="compact", metadata={"help": "verify prompt wording (common.VERIFY_SYSTEMS); mini: compact, real: full"})
    mix_data: str = field(default="", metadata={"help": "optional JSONL of generic rows {id, messages (chat with image placeholders), images, answer} mixed into the training rows (replay of the base's own tasks, as VLM SFT mixes keep generic VQA)"})
    max_length: int = field(default=1024, metadata={"help": "max prompt+completion tokens; longer samples stop the run with their id"})
    # --- optimisation
    epochs: float = field(default=1.78, metadata={"help": "passes over the SFT set (mini: 4500 rows x 1.78 / 16 = 500 steps; at 247 steps the tiny RRM still answers 'yes' to nearly everything, at 450 it has not yet learnt to compare; see README)"})
    batch_size: int = field(default=16, metadata={"help": "GLOBAL sequences per optimizer step (all processes, all accumulation)"})
    per_device_batch_size: int = field(default=16, metadata={"help": "sequences per forward on one process"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate (mini: 1e-3; 7B full FT: ~1e-5; LoRA: ~1e-4)"})
    schedule: str = field(default="cosine", metadata={"help": "cosine or linear decay after warm-up"})
    warmup_ratio: float = field(default=0.05, metadata={"help": "share of steps for linear warm-up"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "final lr as a share of the peak"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping"})
    freeze_vision: bool = field(default=True, metadata={"help": "keep the vision tower (ViT + merger) as pretrained; only the language model learns (the default, as in Qwen2.5-VL's own fine-tuning scripts; mini: 0.54 instead of 0.58 s a step, same accuracy; --freeze_vision false trains it too)"})
    lora_r: int = field(default=0, metadata={"help": "LoRA rank on the language model's linear layers (0 = full fine-tuning)"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "trade compute for memory (GPU runs)"})
    bf16: bool = field(default=False, metadata={"help": "bf16 mixed precision (GPU)"})
    # --- evaluation, logging, checkpoints
    eval_every: int = field(default=0, metadata={"help": "evaluate held-out pairs every N steps (0 = only at the end; each costs ~1 CPU minute in the mini run)"})
    eval_split: str = field(default="val", metadata={"help": "pairs_<split>.jsonl used for periodic evaluation"})
    eval_max_pairs: int = field(default=200, metadata={"help": "cap on evaluated pairs"})
    max_new_tokens: int = field(default=256, metadata={"help": "generation length at evaluation"})
    log_every: int = field(default=10, metadata={"help": "console/TensorBoard line every N steps"})
    report_to: str = field(default="tensorboard", metadata={"help": "tensorboard, wandb, all or none"})
    checkpoint_every: int = field(default=0, metadata={"help": "save_state every N steps (0 = never)"})
    checkpoints_total_limit: int = field(default=2, metadata={"help": "keep at most this many checkpoints"})
    resume_from_checkpoint: str = field(default="", metadata={"help": "a checkpoint folder or 'latest'"})
    max_steps: int = field(default=0, metadata={"help": "stop after this many steps (0 = from epochs)"})
    verdict_weight: float = field(default=1.0, metadata={"help": "loss weight of the verdict tokens (each <points> score 0/1 and each reasoning line's closing yes/no) against 1 for every other completion token; 1 = plain NLL (the paper). Mini: the verdicts are ~12 of ~190 tokens, and at 1 the judge passes half the Keep failures of its own train rows; seed 0, W=5, 500 steps: group agreement 0.634 -> 0.651, 1,000 plain steps: 0.765 (README, session 19)"})
    group_by_length: int = field(default=16, metadata={"help": "batches per length-sorted window (0 = plain shuffle); mini: 377 -> 332 padded tokens per sequence"})
    seed: int = field(default=0, metadata={"help": "random seed (data order and init of LoRA)"})


# =========================================================================================
# Small pure helpers
# =========================================================================================
def lr_at(step: int, total: int, args: Args) -> float:
    """Linear warm-up, then cosine (or linear) decay to min_lr_ratio * lr."""
    warm = max(1, int(args.warmup_ratio * total))
    if step < warm:
        return args.lr * (step + 1) / warm
    frac = (step - warm) / max(1, total - warm)
    decay = 0.5 * (1 + math.cos(math.pi * frac)) if args.schedule == "cosine" else 1 - frac
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * decay)


def batch_indices(step: int, n_rows: int, global_batch: int, seed: int,
                  lengths: list[int] | None = None, window: int = 0) -> list[int]:
    """The rows of optimizer step `step`: a fresh seeded permutation per epoch, read in
    order. With lengths and window > 0 the permutation is cut into windows of `window`
    batches; each window is sorted by length, cut into batches, and those batches are
    served in a seeded random order (so a batch holds rows of similar length). A pure
    function of the step, so resuming at step s replays exactly."""
    per_epoch = n_rows // global_batch
    epoch, k = divmod(step, per_epoch)
    perm = list(range(n_rows))
    random.Random(seed * 100003 + epoch).shuffle(perm)
    if not window or lengths is None:
        return perm[k * global_batch:(k + 1) * global_batch]
    w, j = divmod(k, window)                      # window w, its j-th batch in serving order
    n_batches = min(window, per_epoch - w * window)
    rows = sorted(perm[w * window * global_batch:(w * window + n_batches) * global_batch],
                  key=lambda i: lengths[i])
    order = list(range(n_batches))
    random.Random((seed * 100003 + epoch) * 1009 + w).shuffle(order)
    return rows[order[j] * global_batch:(order[j] + 1) * global_batch]


def row_lengths(tokenizer, rows: list[dict]) -> list[int]:
    """Each row's size for --group_by_length: tokens of its text (instruction and principles,
    or a generic row's messages) plus its target. The image tokens are the same for every
    row, and the chat template adds a constant, so this orders rows as their true lengths do."""
    texts, targets = [], []
    for row in rows:
        if "messages" in row:
            texts.append(" ".join(c.get("text", "") for m in row["messages"] for c in
                                  (m["content"] if isinstance(m["content"], list) else [{"text": m["content"]}])))
            targets.append(row["answer"])
        else:
            texts.append(row["instruction"] + " " + " ".join(p["question"] for p in row["principles"]))
            targets.append(row["target"])
    return [len(a) + len(b) for a, b in zip(tokenizer(texts)["input_ids"], tokenizer(targets)["input_ids"])]


# the verdicts in a target: each <points> entry's score, and the yes/no that closes a
# reasoning line ("q3 ...: want red triangle, see red triangle, yes.")
VERDICT = re.compile(C.POINT_VERDICT.pattern + r'|,\s*(yes|no)\.')


def verdict_weights(tokenizer, texts: list[str], shape, weight: float) -> torch.Tensor:
    """(B, T) loss weights aligned with C.tokenize_completions(texts): `weight` on the token
    of each verdict (VERDICT; each is one token), 1 elsewhere (padding is masked later)."""
    w = torch.ones(shape)
    for i, t in enumerate(texts):
        spans = [m.span(1) if m.group(1) else m.span(2) for m in VERDICT.finditer(t)]
        for j in C.span_tokens(tokenizer, t, spans):
            if j is not None:
                w[i, j] = weight
    return w


def sft_loss(model, processor, rows: list[dict], variant: str, max_length: int, verdict_weight: float = 1.0):
    """NLL of the target completions, mean over each sequence's tokens, then over sequences.
    With verdict_weight != 1 the per-sequence mean is weighted: a verdict token counts
    verdict_weight times (verdict_weights). Returns (loss, number of completion tokens)."""
    # an SFT row is verified against its principles; a --mix_data row carries its own chat
    msgs = [r["messages"] if "messages" in r else C.verify_messages(r["instruction"], r["principles"], variant)
            for r in rows]
    images = [[C.load_image(p, r["id"]) for p in r["images"]] if "messages" in r else
              [C.load_image(r["source"], r["id"]), C.load_image(r["edited"], r["id"])] for r in rows]
    prompts = C.encode_prompts(processor, msgs, images)                       # (B, L)
    targets = [r.get("target", r.get("answer")) for r in rows]
    ids, mask = C.tokenize_completions(processor, targets)                   # (B, T)
    lengths = prompts["attention_mask"].sum(1) + mask.sum(1)
    if int(lengths.max()) > max_length:  # never cut inside image tokens: stop and say which
        i = int(lengths.argmax())
        raise C.DataError(f"SFT row {rows[i]['id']} has {int(lengths[i])} tokens > --max_length "
                          f"{max_length}; raise --max_length or drop the row")
    logp = C.completion_logprobs(model, prompts, ids, mask)                  # (B, T), 0 on padding
    if verdict_weight == 1.0:
        per_seq = logp.sum(1) / mask.to(logp.device).sum(1).clamp(min=1)      # (B,)
    else:  # weighted mean: sum_t w_t log p_t / sum_t w_t over the completion's tokens
        w = verdict_weights(processor.tokenizer, targets, ids.shape, verdict_weight).to(logp.device) * mask.to(logp.device)
        per_seq = (logp * w).sum(1) / w.sum(1).clamp(min=1)
    return -per_seq.mean(), int(mask.sum())




# =========================================================================================
def main(args: Args) -> dict:
    out_dir = os.path.join(args.run_dir, args.output_name or ("sft_rrm" if args.sft_set == "think_verify"
                                                              else f"sft_rrm_{args.sft_set}"))
    # INFRA: a precaution. cuDNN's fused attention backward (the default SDPA kernel on H100/H200)
    # gave NaN gradients to flow_grpo.py's Kontext LoRA in bf16 on an H200 (README "GPU check");
    # the same kernel class NaN'd Qwen2.5 DPO (huggingface/trl#7181, pytorch/pytorch#196678). Flash,
    # memory-efficient and math attention are unaffected, so training leaves it out. CPU: no effect.
    torch.backends.cuda.enable_cudnn_sdp(False)
    # INFRA: one Accelerator; gradient accumulation is ours (global batch = processes x
    # per-device batch x accumulation), so the data order does not depend on the layout.
    accelerator = Accelerator(mixed_precision="bf16" if args.bf16 else None,
                              log_with=None if args.report_to == "none" else args.report_to, project_dir=out_dir)
    P, rank = accelerator.num_processes, accelerator.process_index
    if args.batch_size % (P * args.per_device_batch_size):
        raise SystemExit(f"--batch_size {args.batch_size} must be a multiple of processes x "
                         f"--per_device_batch_size ({P} x {args.per_device_batch_size})")
    accum = args.batch_size // (P * args.per_device_batch_size)
    set_seed(args.seed)

    # 1. data: the SFT set and held-out pairs written by build_data.py
    data_dir = os.path.join(args.run_dir, "data")
    rows = [r for r in C.read_jsonl(os.path.join(data_dir, f"sft_{args.sft_set}.jsonl"),
                                    required=("id", "source", "edited", "instruction", "principles", "target"))
            if r.get("split", "train") == "train"]
    if args.mix_data:  # generic rows join the permutation: their share is their count's
        rows += C.read_jsonl(args.mix_data, required=("id", "messages", "images", "answer"))
    if len(rows) < args.batch_size:
        raise C.DataError(f"only {len(rows)} training rows in sft_{args.sft_set}.jsonl, fewer than "
                          f"--batch_size {args.batch_size}; build more data or lower the batch")
    eval_pairs = C.read_jsonl(os.path.join(data_dir, f"pairs_{args.eval_split}.jsonl"),
                              required=("source", "winner", "loser", "instruction", "principles"))[:args.eval_max_pairs]
    total = args.max_steps or int(args.epochs * len(rows) // args.batch_size)

    # 2. model: Auto classes; LoRA (peft) optional
    model, processor = C.load_rrm(args.model)
    lengths = row_lengths(processor.tokenizer, rows) if args.group_by_length else None
    if args.freeze_vision:  # the base already sees; SFT then only teaches the language side
        model.model.visual.requires_grad_(False)
    if args.lora_r:
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(
            r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
            target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"))
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # fused: one kernel for all parameters (CPU and GPU); 1.3 instead of 7 ms a step in the mini run
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                            betas=(0.9, 0.98), weight_decay=args.weight_decay, fused=True)
    model, opt = accelerator.prepare(model, opt)
    base = accelerator.unwrap_model(model)
    core = base.get_base_model() if args.lora_r else base   # the Qwen2_5_VL model itself

    # INFRA: resume. save_state holds model, optimizer and RNG; the step is in the folder name.
    ckpt_dir, step = os.path.join(out_dir, "checkpoints"), 0
    if args.resume_from_checkpoint:
        path = C.latest_checkpoint(ckpt_dir) if args.resume_from_checkpoint == "latest" else args.resume_from_checkpoint
        if path:
            accelerator.load_state(path)
            step = int(path.rstrip("/").split("-")[-1])
            accelerator.print(f"resumed from {path} at step {step}")
    if accelerator.is_main_process and args.report_to != "none":
        accelerator.init_trackers("sft_rrm", config={k: v for k, v in vars(args).items()})

    def evaluate(tag: str) -> dict:
        # every process scores its shard of the pairs; results gathered in pair order
        shard = eval_pairs[rank::P]
        res = C.evaluate_pairs(core, processor, shard, args.variant, args.max_new_tokens) if shard else {"scores": []}
        scores = [None] * (2 * len(eval_pairs))
        for r, s in enumerate(gather_object([res["scores"]])):
            for j, v in enumerate(s):
                scores[2 * (r + P * (j // 2)) + j % 2] = v
        acc = C.pairwise_accuracy(scores[0::2], scores[1::2])
        valid = [s for s in scores if s is not None]
        out = {"accuracy": acc["accuracy"], "parse_rate": len(valid) / max(len(scores), 1),
               "ties": acc["ties"], "mean_score": sum(valid) / max(len(valid), 1), "pairs": len(eval_pairs)}
        accelerator.print(f"[eval {tag}] pairwise accuracy {out['accuracy']:.3f}  parse rate "
                          f"{out['parse_rate']:.3f}  ties {out['ties']:.3f}  ({len(eval_pairs)} {args.eval_split} pairs)")
        return out

    # 3. train
    history, t0 = [], time.time()
    model.train()
    bar = tqdm(range(step, total), initial=step, total=total, desc="sft", disable=not accelerator.is_local_main_process)
    for step in bar:
        lr = lr_at(step, total, args)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = batch_indices(step, len(rows), args.batch_size, args.seed, lengths, args.group_by_length)
        local = idx[rank * accum * args.per_device_batch_size:(rank + 1) * accum * args.per_device_batch_size]
        loss_sum, tokens = 0.0, 0
        for a in range(accum):
            micro = [rows[i] for i in local[a * args.per_device_batch_size:(a + 1) * args.per_device_batch_size]]
            with accelerator.no_sync(model) if a < accum - 1 else torch.enable_grad():
                loss, n_tok = sft_loss(model, processor, micro, args.variant, args.max_length, args.verdict_weight)
                accelerator.backward(loss / accum)   # mean over micro-batches = mean over sequences
            loss_sum += loss.item() / accum
            tokens += n_tok
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        # logging: the global loss is the mean of the processes' sequence means
        g_loss = accelerator.gather(torch.tensor([loss_sum], device=accelerator.device)).mean().item()
        g_tok = int(accelerator.gather(torch.tensor([tokens], device=accelerator.device)).sum())
        history.append(g_loss)
        logs = {"train/loss": g_loss, "train/lr": lr, "train/grad_norm": float(grad_norm),
                "train/tokens": g_tok, "train/seqs_per_s": (step + 1) * args.batch_size / (time.time() - t0 + 1e-9)}
        if (step + 1) % args.log_every == 0:
            accelerator.print(f"step {step + 1}/{total}  loss {g_loss:.4f}  lr {lr:.2e}  grad {float(grad_norm):.2f}")
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < total:
            logs.update({f"eval/{k}": v for k, v in evaluate(f"step {step + 1}").items()})
        accelerator.log(logs, step=step + 1)
        if args.checkpoint_every and (step + 1) % args.checkpoint_every == 0:
            C.save_checkpoint(accelerator, ckpt_dir, step + 1, args.checkpoints_total_limit)

    # 4. final evaluation and save (merged weights, loadable by the Auto classes)
    final = evaluate("final")
    accelerator.log({f"eval/{k}": v for k, v in final.items()}, step=total)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        to_save = base.merge_and_unload() if args.lora_r else base
        to_save.save_pretrained(out_dir)
        processor.save_pretrained(out_dir)
        summary = {"eval": final, "steps": total, "train_loss_last": history[-1] if history else None,
                   "loss_history": history, "minutes": round((time.time() - t0) / 60, 2),
                   "sft_set": args.sft_set, "rows": len(rows), "args": vars(args)}
        C.write_json_atomic(os.path.join(out_dir, "summary.json"), summary)
    accelerator.end_training()
    return final


if __name__ == "__main__":
    main(HfArgumentParser(Args).parse_args_into_dataclasses()[0])
