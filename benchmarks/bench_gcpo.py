"""benchmarks/bench_gcpo.py -- trajectories per second of one GCPO step: ours vs TRL's GRPOTrainer.

A benchmark, not a test: it prints figures. Same model, same sizes, same work per step, in
the same run, interleaved (runs on these machines vary by about +-20%):
  - 1 preference pair = 2 prompts x N=8 trajectories = 16 trajectories per step
  - each prompt: two 448 px images (256 merged image tokens each), ~10 principles
  - completions of exactly 128 tokens (end-of-turn blocked until then), temperature 1
  - one update per step (generation + log-probs + backward + AdamW), no KL, no checkpointing
Contestants:
  ours/shared   common.generate_shared + common.completion_logprobs_shared (gcpo.py default):
                images and prompt encoded once per prompt, KV cache shared by the N samples
  ours/plain    HF generate(num_return_sequences=N) + a full forward (gcpo.py --share_prefix false)
  trl           trl.GRPOTrainer (no vLLM, gradient checkpointing off, bf16 off)

Install once (not in requirements.txt): .venv/bin/pip install trl==1.16.0
Run:  .venv/bin/python benchmarks/bench_gcpo.py            (both sizes, 2 rounds: ~30 minutes on 2 cores)
      BENCH_SIZES=1.6M BENCH_ROUNDS=1 BENCH_STEPS=2 .venv/bin/python benchmarks/bench_gcpo.py   (~4 minutes)
      (BENCH_THREADS sets torch's CPU threads, default 2)
"""
from __future__ import annotations

import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import common as C  # noqa: E402
import miniworld  # noqa: E402
from miniworld import bases, world  # noqa: E402

N, T, IMG, WARMUP = 8, 128, 448, 1
STEPS = int(os.environ.get("BENCH_STEPS", "4"))        # timed steps per contestant and round
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "2"))      # interleaved rounds
SIZES = os.environ.get("BENCH_SIZES", "1.6M,5M").split(",")


def make_model(out: str, **size) -> str:
    """A tiny Qwen2.5-VL whose processor keeps 448 px images (16 x 16 = 256 tokens each)."""
    tok = bases.build_tokenizer(miniworld.text_corpus(50))
    proc = bases.qwen_vl_processor(tok, image_size=IMG)
    model = bases.qwen_vl_model(tok, **size)
    model.save_pretrained(out)
    proc.save_pretrained(out)
    return out


def prompts(k: int, seed: int = 0):
    """k (messages, [src, edited]) with ~10 principles each (the world's, padded)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(k):
        ctx = world.sample_context(rng)
        ps = (ctx["principles"] * 4)[:10]
        src, ed = ctx["source_image"].resize((IMG, IMG)), ctx["target_image"].resize((IMG, IMG))
        out.append((C.verify_messages(ctx["instruction"], ps, "full"), [src, ed]))
    return out


def ours_step(model, processor, opt, reqs, share: bool) -> None:
    batch = C.encode_prompts(processor, [m for m, _ in reqs], [i for _, i in reqs])
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.eval()
    if share:
        gen = C.generate_shared(model, processor, batch, n=N, temperature=1.0, max_new_tokens=T, min_new_tokens=T)
    else:
        gen = C.generate_n(model, processor, batch, n=N, temperature=1.0, max_new_tokens=T, min_new_tokens=T)
    assert int(gen["completion_mask"].sum(1).min()) == T or eos is None
    adv = torch.randn(2 * N)  # stands in for GCPO's advantages (scoring costs ~nothing)
    model.train()
    if share:
        logp = C.completion_logprobs_shared(model, batch, [i // N for i in range(2 * N)],
                                            gen["completion_ids"], gen["completion_mask"])
    else:
        logp = C.completion_logprobs(model, C.repeat_prompts(batch, N), gen["completion_ids"], gen["completion_mask"])
    loss, _ = C.ppo_clip_loss(logp, gen["old_logp"], adv, gen["completion_mask"])
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def bench_ours(path: str, share: bool) -> float:
    model, processor = C.load_rrm(path)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    times = []
    for s in range(STEPS + WARMUP):
        reqs = prompts(2, seed=s)
        t = time.perf_counter()
        ours_step(model, processor, opt, reqs, share)
        times.append(time.perf_counter() - t)
    return 2 * N / float(np.mean(times[WARMUP:]))


def bench_trl(path: str) -> float:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    rows = []
    for m, imgs in prompts(2 * (STEPS + WARMUP)):
        # the same interleaved prompt ("Source image:" <img> "Edited image:" <img> ...): TRL 1.16 fills
        # unfilled {"type": "image"} placeholders in order with the row's images
        msgs = [{"role": r["role"], "content": [c if c["type"] == "text" else {"type": "image"} for c in r["content"]]}
                for r in m]
        rows.append({"prompt": msgs, "images": imgs})
    ds = Dataset.from_list(rows)
    vision = [t for t in C.VISION_TOKENS]
    times = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t)

    with tempfile.TemporaryDirectory() as out:
        cfg = GRPOConfig(output_dir=out, num_generations=N, per_device_train_batch_size=2 * N,
                         max_completion_length=T, gradient_checkpointing=False, bf16=False, use_cpu=True,
                         max_steps=STEPS + WARMUP, logging_steps=1000, save_strategy="no", report_to="none",
                         learning_rate=1e-5, temperature=1.0, beta=0.0, shuffle_dataset=False,
                         generation_kwargs={"min_new_tokens": T})
        trainer = GRPOTrainer(model=path, reward_funcs=lambda completions, **k: list(np.random.rand(len(completions))),
                              args=cfg, train_dataset=ds, callbacks=[Clock()])
        ids = [trainer.processing_class.tokenizer.convert_tokens_to_ids(t) for t in vision]
        trainer.generation_config.suppress_tokens = ids
        trainer.train()
    return 2 * N / float(np.mean(times[WARMUP:]))


def main() -> None:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    with tempfile.TemporaryDirectory() as d:
        for name, size in [(k, v) for k, v in (("1.6M", {}), ("5M", dict(hidden_size=256, num_layers=4,
                                                                            intermediate_size=1024))) if k in SIZES]:
            path = make_model(os.path.join(d, name), **size)
            res = {"ours/shared": [], "ours/plain": [], "trl": []}
            for _ in range(ROUNDS):  # interleave the contestants
                res["ours/shared"].append(bench_ours(path, True))
                res["ours/plain"].append(bench_ours(path, False))
                res["trl"].append(bench_trl(path))
            m = {k: float(np.mean(v)) for k, v in res.items()}
            print(f"\nmodel {name}: two {IMG}px images (256 tokens each), ~10 principles, N={N}, {T} new tokens, "
                  f"16 trajectories/step, {STEPS} timed steps x {ROUNDS} rounds, {torch.get_num_threads()} thread(s)")
            for k, v in m.items():
                print(f"  {k:12s} {v:6.2f} trajectories/s   (rounds: {', '.join(f'{x:.2f}' for x in res[k])})")
            print(f"  ratio ours/shared : trl = {m['ours/shared'] / m['trl']:.2f}x   "
                  f"ours/plain : trl = {m['ours/plain'] / m['trl']:.2f}x")


if __name__ == "__main__":
    main()
