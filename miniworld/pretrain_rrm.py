"""miniworld/pretrain_rrm.py -- give the tiny RRM base eyes: generic perception pretraining.

A real Edit-R1 run starts its RRM from Qwen2.5-VL-3B/7B-Instruct, a VLM that already sees.
Measured before this file (notes/MINIWORLD-DERISK.md): a tiny Qwen2.5-VL cannot learn
perception inside a 5-minute SFT. So the mini world's "hub checkpoint" is pretrained here on
*generic* perception of the world -- describe two images and say what differs -- and NOT on
the RRM's verification format (principles, 0/1 points, <score>), which stays sft_rrm.py's
job. The base therefore knows what is in a picture, but has never seen a verification.

Task (one chat turn, two images, plain teacher forcing on the answer only):
    user:      "Image A:" <img> "Image B:" <img> "Describe both images and what changed."
    assistant: "A: grey background; red circle at top left; blue square at center.
                B: grey background; green circle at top left; blue square at center; noisy.
                changed: top left red circle -> green circle."
Task 2 (grounded comparison, spot-the-difference at named places; --compare_share of the
samples):
    user:      "Image A:" <img> "Image B:" <img> "Compare both images at: top left, noise."
    assistant: "top left: red circle -> green circle; noise: none -> noisy."
Task 3 (yes/no visual questions, --question_share of the samples; 1-3 questions a sample):
    user:      "Image A:" <img> "Image B:" <img> "Answer yes or no. 1. In image B, is there a
                red circle at top left? 2. Is the background the same in both images?"
    assistant: "1. top left: want red circle, see green circle, no. 2. background: A grey, B grey, yes."
    What an instruction-tuned VLM does when asked "is there a ...?": say what was asked and
    what it sees, then answer -- in the style the simulated VLM pool (miniworld/sim.py) writes
    its verification lines, since the pool stands for VLMs of the same kind as the base. It
    asks about single places, never about an instruction, a list of principles, 0/1 points or
    a score: mapping principles to places and writing the verification stays SFT's job.
Image pairs: a world source and a candidate edit of it from the simulated editors (every
category, every error type, noise independent of correctness), the exact target, or the
source itself (a no-op, "changed: nothing").

The committed base was made in five runs, each continuing the previous one (--init_from): 40
minutes of task 1 from a random model; 30 minutes of tasks 1-2 (70% task 2); 20 minutes of
all three (20/25/55%) with task 3's answers in an earlier wording ("1. B top left: green
circle; asked red circle; no."); 12 minutes of all three (20/20/60%) in the present wording;
15 minutes more with 90% of task 3's wrong guesses wrong in the shape (--shape_negatives 0.9,
session 7). Measured after the fourth run (evaluate()'s question_accuracy_<kind>, 200 held-out
pairs): it said "no" to 99.8% of the guesses with a wrong colour and to none of those with a
wrong shape (after the fifth: 100% and 93%) --
"want green triangle, see green circle, yes": it saw the shape and ignored it. Every RRM SFT'd
from it inherited this (a judge that passes every shape-only failure), and Flow-GRPO's editor
learnt to let the shapes it must keep drift, unseen (README, flow_grpo.py section).
Measured before task 2: SFT taught the format in minutes but the tiny model answered every
question "yes" -- it described images when asked to describe, yet never
looked at a place a question named. Measured before task 3: SFT had to learn to *answer* a
yes/no question (the verdict is "yes" when what is seen equals what is asked) from the
verification data itself, which took ~500 SFT steps and in 2 seeds of 3 did not happen in
them; a real Qwen2.5-VL-Instruct answers such questions before any SFT.

Run (2-core CPU; one thread each but the last; what made the committed base):
    python -m miniworld.pretrain_rrm --out_dir /tmp/rrm_task1 --compare_share 0       # 40 min
    python -m miniworld.pretrain_rrm --init_from /tmp/rrm_task1 --out_dir /tmp/rrm_task2 \
        --minutes 30 --compare_share 0.7 --seed 1                                        # 30 min
    python -m miniworld.pretrain_rrm --init_from /tmp/rrm_task2 --out_dir /tmp/rrm_task3 \
        --minutes 20 --compare_share 0.25 --question_share 0.55 --seed 2                  # 20 min
    python -m miniworld.pretrain_rrm --init_from /tmp/rrm_task3 --out_dir /tmp/rrm_task4 \
        --minutes 12 --compare_share 0.2 --question_share 0.6 --seed 3 --warmup_steps 20  # 12 min
    python -m miniworld.pretrain_rrm --init_from /tmp/rrm_task4 --out_dir miniworld/checkpoints/rrm_base \
        --minutes 15 --compare_share 0.2 --question_share 0.6 --shape_negatives 0.9 --seed 4 \
        --warmup_steps 20 --threads 2                                                   # 15 min
    python -m miniworld.pretrain_rrm --minutes 1 --out_dir /tmp/rrm_quick      # smoke run
It builds the random base with miniworld.bases (tokenizer trained on the world's texts and
on this task's texts), trains, evaluates on held-out (test-split) scenes with greedy
decoding and writes out_dir/pretrain_summary.json.
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
from miniworld import bases, sim, world  # noqa: E402

PROMPT = "Describe both images and what changed."
COMPARE_PROMPT = "Compare both images at: {places}."
QUESTION_PROMPT = "Answer yes or no. {questions}"


@dataclass
class Args:
    out_dir: str = field(default="miniworld/checkpoints/rrm_base", metadata={"help": "where the pretrained base is saved"})
    minutes: float = field(default=40.0, metadata={"help": "training time budget (wall clock)"})
    max_steps: int = field(default=0, metadata={"help": "stop after this many steps too (0 = time budget only)"})
    batch_size: int = field(default=32, metadata={"help": "pairs per optimizer step"})
    lr: float = field(default=1e-3, metadata={"help": "AdamW peak learning rate (cosine to 10%)"})
    warmup_steps: int = field(default=30, metadata={"help": "linear warm-up steps"})
    eval_pairs: int = field(default=200, metadata={"help": "held-out pairs for the final perception check"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    compare_share: float = field(default=0.5, metadata={"help": "share of task-2 samples (grounded comparison)"})
    question_share: float = field(default=0.0, metadata={"help": "share of task-3 samples (yes/no visual questions)"})
    shape_negatives: float = field(default=0.5, metadata={
        "help": "task 3: share of wrong guesses about an object that get its shape wrong (else its colour)"})
    export_questions: str = field(default="", metadata={
        "help": "instead of training: write --export_n task-3 rows for sft_rrm.py --mix_data to this folder"})
    export_n: int = field(default=400, metadata={"help": "rows --export_questions writes"})
    init_from: str = field(default="", metadata={
        "help": "continue from this pretrained base (its tokenizer kept) instead of building a random one"})


# ----------------------------------------------------------------------------- 1. data
def describe_image(image) -> str:
    """What a perfect observer says about one image (perceive() is exact on renders)."""
    text = world.describe(world.perceive(image))
    return text + ("; noisy" if world.is_noisy(image) else "")


def describe_change(a, b) -> str:
    """Cell-by-cell difference between two perceived images (world.describe_change)."""
    return world.describe_change(world.perceive(a), world.perceive(b))


def target_text(a, b) -> str:
    return f"A: {describe_image(a)}.\nB: {describe_image(b)}.\nchanged: {describe_change(a, b)}."


def messages(prompt: str = PROMPT) -> list[dict]:
    return [{"role": "user", "content": [
        {"type": "text", "text": "Image A:"}, {"type": "image"},
        {"type": "text", "text": "Image B:"}, {"type": "image"},
        {"type": "text", "text": prompt}]}]


def compare_task(a, b, rng) -> tuple[str, str]:
    """Task 2, grounded comparison: (prompt, answer) for 1-4 named places (cells, the
    background, the noise), each answered 'place: in A -> in B', e.g.
        "Compare both images at: top left, background."
        "top left: red circle -> green circle; background: grey -> grey."
    Generic two-image perception (spot-the-difference at a given place); nothing about
    questions, verdicts or scores."""
    sa, sb = world.perceive(a), world.perceive(b)
    names = world.cell_names(world.DEFAULT.grid)
    cells = sorted(names)
    occupied = [c for c in cells if world.object_at(sa, c) or world.object_at(sb, c)]
    k = int(rng.integers(1, 4))
    pool = occupied if rng.random() < 0.7 and occupied else cells     # mostly places with something
    picked = [cells.index(c) for c in pool]
    chosen = sorted(set(int(i) for i in rng.choice(picked, size=min(k, len(picked)), replace=False)))
    places = [names[cells[i]] for i in chosen]
    places += ["background"] if rng.random() < 0.3 else []
    places += ["noise"] if rng.random() < 0.3 else []
    rng.shuffle(places)
    answer = "; ".join(f"{p}: {_seen(sa, a, p)} -> {_seen(sb, b, p)}" for p in places) + "."
    return COMPARE_PROMPT.format(places=", ".join(places)), answer


def _seen(scene, image, place):
    """What a perfect observer names at a place: 'red circle' / 'empty', the background
    colour, or 'noisy' / 'none'."""
    if place == "background":
        return scene.background
    if place == "noise":
        return "noisy" if world.is_noisy(image) else "none"
    o = world.object_at(scene, world.cell_from_name(place, world.DEFAULT.grid))
    return f"{o.color} {o.shape}" if o else "empty"


def _other_object(thing, rng, shape_share: float = 0.5):
    """A plausible wrong guess: the same object with another shape (shape_share of the time)
    or another colour, or an object where there is none."""
    if thing == "empty":
        return f"{rng.choice(list(world.COLORS))} {rng.choice(world.SHAPES)}"
    color, shape = thing.split(" ")
    if rng.random() < 1 - shape_share:  # (the draws of the earlier runs, at 0.5, unchanged)
        return f"{rng.choice([c for c in world.COLORS if c != color])} {shape}"
    return f"{color} {rng.choice([s for s in world.SHAPES if s != shape])}"


def question_task(a, b, rng, shape_share: float = 0.5) -> tuple[str, str]:
    """Task 3, yes/no visual questions (1-3 per sample), each answered with what was asked
    and what is seen first and the verdict last, as an instruction-tuned VLM answers "is
    there a ...?":
        "Answer yes or no. 1. In image B, is there a red circle at top left? 2. Is the
         background the same in both images?"
        "1. top left: want red circle, see green circle, no. 2. background: A grey, B grey, yes."
    Generic VQA about one image or both; no principles, points or scores. Half the questions
    are true; wrong guesses differ from the truth in one attribute (hard negatives), or are
    what image A shows there (an edit that was not made)."""
    sa, sb = world.perceive(a), world.perceive(b)
    names = world.cell_names(world.DEFAULT.grid)
    cells = sorted(names)
    occupied = [names[c] for c in cells if world.object_at(sa, c) or world.object_at(sb, c)]
    questions, answers = [], []
    for i in range(int(rng.integers(1, 4))):
        kind = str(rng.choice(["object", "object", "empty", "same", "same", "background", "bg_same", "noise"]))
        place = str(rng.choice(occupied)) if occupied and rng.random() < 0.8 else names[cells[rng.integers(len(cells))]]
        if kind in ("object", "empty"):
            seen = _seen(sb, b, place)
            if kind == "empty":
                asked = "empty"
                q = f"In image B, is {place} empty?"
            else:
                before = _seen(sa, a, place)
                u = rng.random()
                asked = seen if u < 0.5 and seen != "empty" else \
                    before if u < 0.7 and before not in ("empty", seen) else _other_object(seen, rng, shape_share)
                q = f"In image B, is there a {asked} at {place}?"
            ans = f"{place}: want {asked}, see {seen}, {'yes' if asked == seen else 'no'}."
        elif kind == "same":
            x, y = _seen(sa, a, place), _seen(sb, b, place)
            q, ans = f"Is {place} the same in both images?", f"{place}: A {x}, B {y}, {'yes' if x == y else 'no'}."
        elif kind == "background":
            seen = sb.background
            asked = seen if rng.random() < 0.5 else str(rng.choice([c for c in world.BACKGROUNDS if c != seen]))
            q = f"In image B, is the background {asked}?"
            ans = f"background: want {asked}, see {seen}, {'yes' if asked == seen else 'no'}."
        elif kind == "bg_same":
            q = "Is the background the same in both images?"
            ans = f"background: A {sa.background}, B {sb.background}, {'yes' if sa.background == sb.background else 'no'}."
        else:
            seen = _seen(sb, b, "noise")
            q, ans = "Is image B free of noise?", f"noise: want none, see {seen}, {'yes' if seen == 'none' else 'no'}."
        questions.append(f"{i + 1}. {q}")
        answers.append(f"{i + 1}. {ans}")
    return QUESTION_PROMPT.format(questions=" ".join(questions)), " ".join(answers)


def sample_task(rng, split: str, compare_share: float, question_share: float = 0.0,
                shape_negatives: float = 0.5):
    """(images, prompt, answer) of task 1 (describe, the default), task 2 (compare) or
    task 3 (yes/no questions)."""
    a, b = sample_pair(rng, split)
    u = rng.random()
    if u < question_share:
        prompt, answer = question_task(a, b, rng, shape_negatives)
        return [a, b], prompt, answer
    if u < question_share + compare_share:
        prompt, answer = compare_task(a, b, rng)
        return [a, b], prompt, answer
    return [a, b], PROMPT, target_text(a, b)


def sample_pair(rng, split: str):
    """(image A, image B): a source and one of: an editor's candidate (70%), the exact
    target (15%, noisy half the time), or itself (15%, a no-op)."""
    ctx = world.sample_context(rng, split=split)
    src, u = ctx["source_image"], rng.random()
    if u < 0.70:
        edited = sim.edit(str(rng.choice(list(sim.EDITORS))), src, ctx["instruction"], rng)
    elif u < 0.85:
        edited = ctx["target_image"]
        if rng.random() < 0.5:
            edited = world.add_noise(edited, world.DEFAULT.noise_sigma, rng)
    else:
        edited = src
    return src, edited


def corpus_for_tokenizer(seed: int) -> list[str]:
    """World texts plus this task's texts, so every word is one token."""
    rng = np.random.default_rng(seed + 99)
    texts = sim.text_corpus()
    texts += [target_text(*sample_pair(rng, "train")) for _ in range(300)] + [PROMPT, "Image A:", "Image B:"]
    texts += [" ".join(compare_task(*sample_pair(rng, "train"), rng)) for _ in range(100)]
    return texts


# ----------------------------------------------------------------------------- 2. eval
def greedy_answers(model, processor, pairs, tasks, max_new_tokens: int = 64):
    """[(wanted answer, greedy answer)] for (prompt, answer) tasks on image pairs."""
    out = []
    for s in range(0, len(pairs), 16):
        chunk, tchunk = pairs[s:s + 16], tasks[s:s + 16]
        batch = common.encode_prompts(processor, [messages(p) for p, _ in tchunk], [list(x) for x in chunk])
        gen = common.generate_n(model, processor, batch, n=1, temperature=0.0, max_new_tokens=max_new_tokens)
        out += [(want, texts[0]) for (_, want), texts in zip(tchunk, gen["texts"])]
    return out


@torch.no_grad()
def evaluate(model, processor, n_pairs: int, seed: int) -> dict:
    """Greedy descriptions of held-out pairs. Object accuracy: of the objects in each
    image (source and edited), the fraction named exactly (colour, shape, position) in the
    model's 'A:' / 'B:' line; change accuracy: the 'changed:' line exactly right."""
    model.eval()
    rng = np.random.default_rng(seed + 12345)
    pairs = [sample_pair(rng, "test") for _ in range(n_pairs)]
    obj_hit = obj_total = exact = change_ok = 0
    for s in range(0, n_pairs, 16):
        chunk = pairs[s:s + 16]
        batch = common.encode_prompts(processor, [messages()] * len(chunk), [list(p) for p in chunk])
        gen = common.generate_n(model, processor, batch, n=1, temperature=0.0, max_new_tokens=96)
        for (a, b), texts in zip(chunk, gen["texts"]):
            got, want = texts[0].strip(), target_text(a, b)
            exact += got == want
            lines = dict(l.split(": ", 1) for l in got.split("\n") if ": " in l)
            for key, img in (("A", a), ("B", b)):
                for o in world.perceive(img).objects:
                    obj_total += 1
                    phrase = f"{o.color} {o.shape} at {world.cell_names(3)[o.cell]}"
                    obj_hit += phrase in lines.get(key, "").split("; ") or \
                        phrase + "." in lines.get(key, "").split("; ")
            change_ok += lines.get("changed", "").rstrip(".") == describe_change(a, b)
    # task 2: each "place: A -> B" item exactly right
    item_hit = item_total = 0
    for want, got in greedy_answers(model, processor, pairs, [compare_task(a, b, rng) for a, b in pairs]):
        got = set(got.strip().rstrip(".").split("; "))
        for item in want.rstrip(".").split("; "):
            item_total += 1
            item_hit += item in got
    # task 3: each numbered answer's final yes/no right
    verdict_hit = verdict_total = 0
    verdicts = lambda t: re.findall(r"(\d+)\. [^.]*, (yes|no)\.", t)  # noqa: E731
    for want, got in greedy_answers(model, processor, pairs, [question_task(a, b, rng) for a, b in pairs]):
        got = dict(verdicts(got))
        for num, v in verdicts(want):
            verdict_total += 1
            verdict_hit += got.get(num) == v
    # task 3 by kind: about each object of image B, the true question and two hard negatives
    # (the right colour in another shape; another colour in the right shape), verdicts right
    probes, kinds = [], []
    for a, b in pairs:
        for o in world.perceive(b).objects:
            place = world.cell_names(world.DEFAULT.grid)[o.cell]
            for kind, asked in (("true", f"{o.color} {o.shape}"),
                                ("shape", f"{o.color} {rng.choice([x for x in world.SHAPES if x != o.shape])}"),
                                ("colour", f"{rng.choice([x for x in world.COLORS if x != o.color])} {o.shape}")):
                probes.append(((a, b), (QUESTION_PROMPT.format(questions=f"1. In image B, is there a {asked} at {place}?"),
                                        f"1. {place}: want {asked}, see {o.color} {o.shape}, "
                                        f"{'yes' if kind == 'true' else 'no'}.")))
                kinds.append(kind)
    by_kind = {"true": [], "shape": [], "colour": []}
    for kind, (want, got) in zip(kinds, greedy_answers(model, processor, [p for p, _ in probes], [t for _, t in probes])):
        by_kind[kind].append(dict(verdicts(got)).get("1") == dict(verdicts(want))["1"])
    model.train()
    return {"object_accuracy": obj_hit / max(obj_total, 1), "change_accuracy": change_ok / n_pairs,
            "exact_match": exact / n_pairs, "compare_item_accuracy": item_hit / max(item_total, 1),
            "question_accuracy": verdict_hit / max(verdict_total, 1),
            **{f"question_accuracy_{k}": float(np.mean(v)) if v else None for k, v in by_kind.items()},
            "pairs": n_pairs}


# ----------------------------------------------------------------------------- 3. train
def main(args: Args) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    t0 = time.time()
    if args.init_from:  # continue an earlier pretraining (same tokenizer and weights)
        model, processor = common.load_rrm(args.init_from)
    else:
        bases.build_rrm_base(args.out_dir, corpus_for_tokenizer(args.seed), image_size=world.DEFAULT.size,
                             seed=args.seed)
        model, processor = common.load_rrm(args.out_dir)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    budget, step, losses = args.minutes * 60, 0, []
    start = time.time()
    while time.time() - start < budget and (not args.max_steps or step < args.max_steps):
        # learning rate: linear warm-up, then cosine to 10% over the *time* budget
        frac = min((time.time() - start) / budget, 1.0)
        lr = args.lr * min(1.0, (step + 1) / args.warmup_steps) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        tasks = [sample_task(rng, "train", args.compare_share, args.question_share, args.shape_negatives)
                 for _ in range(args.batch_size)]
        prompts = common.encode_prompts(processor, [messages(p) for _, p, _ in tasks], [im for im, _, _ in tasks])
        ids, mask = common.tokenize_completions(processor, [t for _, _, t in tasks])
        logp = common.completion_logprobs(model, prompts, ids, mask)          # (B, T)
        loss = -(logp.sum() / mask.sum())                                     # token-mean NLL
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        step += 1
        if step % 50 == 0:
            print(f"step {step:5d}  loss {np.mean(losses[-50:]):.4f}  lr {lr:.2e}  "
                  f"{step * args.batch_size / (time.time() - start):.1f} pairs/s", flush=True)
    train_min = (time.time() - start) / 60
    metrics = evaluate(model, processor, args.eval_pairs, args.seed)
    model.save_pretrained(args.out_dir)
    processor.save_pretrained(args.out_dir)
    summary = {"steps": step, "pairs_seen": step * args.batch_size, "train_minutes": round(train_min, 2),
               "total_minutes": round((time.time() - t0) / 60, 2), "final_loss": float(np.mean(losses[-50:])),
               "threads": args.threads, "held_out": metrics, "args": vars(args)}
    common.write_json_atomic(os.path.join(args.out_dir, "pretrain_summary.json"), summary)
    print(json.dumps(summary, indent=1))
    return summary


def export_questions(out_dir: str, n: int, seed: int = 123, shape_share: float = 0.9) -> str:
    """Task 3 (yes/no questions) on n train-split pairs as generic chat rows for
    `sft_rrm.py --mix_data` -- {id, messages (image placeholders), images (PNG paths), answer}
    -- so an SFT run can replay what the base was pretrained on. Returns the JSONL path.

        python -m miniworld.pretrain_rrm --export_questions runs/mini/replay --export_n 400 \\
            --seed 123 --shape_negatives 0.9"""
    rng, rows = np.random.default_rng(seed), []
    for i in range(n):
        a, b = sample_pair(rng, "train")
        prompt, answer = question_task(a, b, rng, shape_share)
        paths = [os.path.join(out_dir, "images", f"q{i:05d}_{k}.png") for k in "ab"]
        for img, path in zip((a, b), paths):
            common.save_image_atomic(img, path)
        rows.append({"id": f"question-{i}", "messages": messages(prompt), "images": paths, "answer": answer})
    path = os.path.join(out_dir, "questions.jsonl")
    common.write_jsonl_atomic(path, rows)
    return path


if __name__ == "__main__":
    from transformers import HfArgumentParser
    cli = HfArgumentParser(Args).parse_args_into_dataclasses()[0]
    if cli.export_questions:
        print(export_questions(cli.export_questions, cli.export_n, cli.seed, cli.shape_negatives))
    else:
        main(cli)
