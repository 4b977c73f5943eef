"""build_data.py -- Edit-R1's cold-start data pipeline (paper Sec. 3.2, METHOD.md "Cold-start data").

  1. decompose   each (source image, instruction) -> verifiable principles (Keep / Follow /
                 Quality yes-no questions) by a decomposer VLM           -> contexts.jsonl
  2. edit        several editing models produce candidates               -> candidates.jsonl
  3. think       a VLM pool writes K chain-of-thought verdicts per candidate, varying
                 member, prompt wording and temperature                  -> trajectories.jsonl
  4. verify      an inspector VLM labels every principle (gold 0/1); each trajectory's
                 verification accuracy = share of its points that match gold; the most
                 accurate one (ties: average_score, final score, lower index) is the SFT
                 target                                                  -> inspected.jsonl,
                 sft_think_verify.jsonl; and, for the paper's T vs T+V ablation, a trajectory
                 picked WITHOUT verification                             -> sft_think_only.jsonl
  5. prefer      human preference pairs (winner, loser) between candidates of one context,
                 "same" dropped, per split                               -> pairs_{split}.jsonl

Every VLM role goes through one call shape, common.make_backend(spec):
  mini:<name>           the mini world's simulated VLMs (default; CPU, seconds)
  hf:<path>             a local Qwen2.5-VL checkpoint
  openai:<model>@<url>  any OpenAI-compatible endpoint (vLLM, `transformers serve`, an API)
Editors: mini:<faithful|sloppy|lazy>, kontext:<path or id>, qwen_edit:<path or id>; a pipeline
editor may carry a LoRA, kontext:<path>@<lora folder> (e.g. a flow_grpo.py output: the
policy's own edits after RL, verified like any candidate).

What it deliberately does not do: invent anything. An unparseable decomposition, verdict or
inspection is counted (per role and backend, in stats.json) and the row is left out; a
failed backend call leaves its row unwritten so a rerun retries it. Outputs are appended
--chunk complete rows at a time (one write each) and a rerun skips finished rows, so an
interrupted run resumes where it stopped.

Run
  python build_data.py                                   # mini world -> runs/mini/data (~2 min CPU)
  python build_data.py --source imgedit:basic_edit.json --image_root ImgEdit/ \\
      --decomposer openai:seed-1.5-vl@https://api.example/v1 \\
      --editors kontext:black-forest-labs/FLUX.1-Kontext-dev,qwen_edit:Qwen/Qwen-Image-Edit --edit_steps 28 \\
      --pool openai:qwen2.5-vl-72b@http://localhost:8000/v1,openai:internvl3@http://localhost:8001/v1 \\
      --inspector openai:seed-1.5-vl@https://api.example/v1 --pairs_file human_pairs.jsonl
  (accelerate is not needed here: the heavy parts are servers or editing pipelines.)
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm
from transformers import HfArgumentParser

import common as C


@dataclass
class Args:
    # --- where
    run_dir: str = field(default="runs/mini", metadata={"help": "run folder; data goes to <run_dir>/data"})
    source: str = field(default="mini", metadata={"help": "mini | imgedit:<ImgEdit instruction JSON> | jsonl:<file with source,instruction[,id,split]>"})
    image_root: str = field(default="", metadata={"help": "folder that relative image paths of --source are under"})
    skip_missing: bool = field(default=False, metadata={"help": "skip (and count) rows whose image is missing or corrupt instead of stopping"})
    # --- mini world sizes (ignored for real sources)
    n_train: int = field(default=1500, metadata={"help": "mini: training contexts (x3 editors = SFT rows; with 240 the SFT model misreads what a question wants)"})
    n_val: int = field(default=50, metadata={"help": "mini: validation contexts"})
    n_test: int = field(default=100, metadata={"help": "mini: test contexts"})
    # --- who does what
    decomposer: str = field(default="mini:decomposer", metadata={"help": "backend that writes principles"})
    editors: str = field(default="mini:faithful,mini:sloppy,mini:lazy", metadata={"help": "comma list of editors"})
    pool: str = field(default="mini:lenient,mini:eager,mini:blind", metadata={"help": "comma list of pool VLM backends"})
    prompt_variants: str = field(default="compact,strict", metadata={"help": "comma list of verify prompt wordings (common.VERIFY_SYSTEMS)"})
    temperatures: str = field(default="0.3,1.0", metadata={"help": "comma list of pool sampling temperatures"})
    inspector: str = field(default="mini:inspector", metadata={"help": "backend that writes gold labels"})
    noop_check: bool = field(default=False, metadata={"help": "the inspector also says whether the edit changed anything, and the Think+Verify target of an edit it calls a no-op is a trajectory that scores it 0 (METHOD.md: a no-op scores 0), if any (an ablation beyond the paper; README build_data.py)"})
    tie_score: str = field(default="higher", metadata={"help": "Think+Verify target among equally verified trajectories: the higher final score (the paper's rule) or the lower (an ablation: in the mini world the paper's rule picks the pool's lenient scores, no-ops included; README build_data.py)"})
    rrm_variant: str = field(default="compact", metadata={"help": "prompt wording the RRM is trained with (SFT rows)"})
    max_tokens: int = field(default=1024, metadata={"help": "max tokens per VLM answer"})
    # --- preferences
    pairs_file: str = field(default="", metadata={"help": "real data: JSONL of human pairs {context_id, winner, loser}; mini: simulated"})
    label_noise: float = field(default=0.0, metadata={"help": "mini: probability that a human label is flipped"})
    same_margin: float = field(default=0.5, metadata={"help": "mini: utilities closer than this are 'same' (dropped)"})
    hard_filter: str = field(default="", metadata={"help": "optional backend that keeps only 'hard' instructions (answers yes/no)"})
    # --- edit pipelines (kontext/qwen_edit editors)
    edit_steps: int = field(default=10, metadata={"help": "denoising steps of pipeline editors (mini: 10, as flow_grpo.py samples; FLUX.1-Kontext: 28)"})
    edit_size: int = field(default=0, metadata={"help": "pipeline editors: output side in px (0 = source size)"})
    edit_batch: int = field(default=8, metadata={"help": "pipeline editors: images per call (sources of one size; at most each editor's share of a --chunk of jobs)"})
    max_sequence_length: int = field(default=0, metadata={"help": "pipeline editors: Kontext T5 tokens (0 = 24 for --source mini, as the tiny editors were trained and flow_grpo.py samples; 512 otherwise)"})
    chunk: int = field(default=32, metadata={"help": "rows per backend call / write"})
    seed: int = field(default=0, metadata={"help": "random seed"})


# =========================================================================================
# INFRA: inputs. Each source yields context rows {id, split, instruction, source (path)}.
# =========================================================================================
def mini_contexts(args, img_dir):
    """The mini world's contexts (the environment plays the dataset here)."""
    from miniworld import world
    rows = []
    for split, n in (("train", args.n_train), ("val", args.n_val), ("test", args.n_test)):
        for ctx in world.sample_contexts(split, n, seed=args.seed):
            path = os.path.join(img_dir, f"{ctx['id']}_source.png")
            if not os.path.exists(path):
                C.save_image_atomic(ctx["source_image"], path)
            rows.append({"id": ctx["id"], "split": split, "instruction": ctx["instruction"],
                         "category": ctx["category"], "source": path})
    return rows


def split_by_hash(key: str) -> str:
    """Deterministic 90/5/5 train/val/test split of real rows by id (stable across reruns)."""
    h = int(hashlib.md5(key.encode()).hexdigest(), 16) % 1000
    return "train" if h < 900 else "val" if h < 950 else "test"


def real_contexts(args):
    """ImgEdit's instruction JSON ({key: {id, prompt, edit_type}}) or a plain JSONL."""
    kind, _, path = args.source.partition(":")
    rows = []
    if kind == "imgedit":
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError) as e:  # ValueError: bad JSON or not UTF-8 text at all
            raise C.DataError(f"{path}: cannot read ImgEdit JSON ({e})") from None
        if not isinstance(data, dict):
            raise C.DataError(f"{path}: expected ImgEdit's {{key: {{id, prompt, edit_type}}}} object, "
                              f"got a JSON {type(data).__name__}")
        for key, item in data.items():
            if not isinstance(item, dict) or not {"id", "prompt"} <= set(item):
                raise C.DataError(f"{path} key {key!r}: expected {{id, prompt, edit_type}}; fix the file")
            rows.append({"id": str(key), "instruction": item["prompt"], "category": item.get("edit_type", ""),
                         "source": os.path.join(args.image_root, item["id"]), "split": item.get("split")})
    elif kind == "jsonl":
        for i, r in enumerate(C.read_jsonl(path, required=("source", "instruction")), 1):
            rows.append({"id": str(r.get("id", i)), "instruction": r["instruction"],
                         "category": r.get("category", ""), "split": r.get("split"),
                         "source": os.path.join(args.image_root, r["source"])})
    else:
        raise SystemExit(f"--source must be mini, imgedit:<file> or jsonl:<file>, got {args.source!r}")
    for r in rows:  # a stable split from the id when the data gives none
        r["split"] = r["split"] or split_by_hash(r["id"])
    return rows


def check_images(rows, args, counters):
    """Every source image must open. A missing/corrupt one stops the run with its row named,
    or with --skip_missing is counted and dropped."""
    kept = []
    for r in rows:
        try:
            C.load_image(r["source"], where=f"context {r['id']} of {args.source}")
            kept.append(r)
        except C.DataError as e:
            if not args.skip_missing:
                raise C.DataError(f"{e}. Pass --skip_missing to skip such rows.") from None
            counters["skipped_missing_image"] = counters.get("skipped_missing_image", 0) + 1
    if not kept:
        raise C.DataError(f"no usable rows in {args.source} (all {len(rows)} images missing or "
                          f"corrupt under --image_root {args.image_root!r})")
    return kept


def make_editor(spec: str, args):
    """edit(source_images, instructions, seeds) -> PIL images, for mini or diffusers editors
    (a batch; every edit has its own seed, so batching does not change any edit)."""
    kind, _, name = spec.partition(":")
    if kind == "mini":
        from miniworld import sim
        if name not in sim.EDITORS:
            raise SystemExit(f"unknown mini editor {name!r}; use one of {list(sim.EDITORS)}")
        return lambda images, instructions, seeds: [sim.edit(name, im, ins, np.random.default_rng(sd))
                                                    for im, ins, sd in zip(images, instructions, seeds)]
    if kind in ("kontext", "qwen_edit"):
        if args.edit_batch < 1:
            raise SystemExit(f"--edit_batch must be >= 1, got {args.edit_batch}")
        name, _, lora = name.partition("@")
        pipe = C.load_edit_pipeline(name)
        if lora:  # the policy after RL (flow_grpo.py saves its LoRA in the diffusers format)
            if not os.path.exists(os.path.join(lora, "pytorch_lora_weights.safetensors")):
                raise SystemExit(f"editor {spec!r}: no pytorch_lora_weights.safetensors in {lora!r} "
                                 f"(a flow_grpo.py output folder)")
            pipe.load_lora_weights(lora)
        pipe.set_progress_bar_config(disable=True)
        text_len = args.max_sequence_length or (24 if args.source == "mini" else 512)

        def edit(images, instructions, seeds):  # batches of --edit_batch images of one size
            out, groups = [None] * len(images), {}
            for i, im in enumerate(images):
                groups.setdefault(im.size, []).append(i)
            for idx in groups.values():
                for b in range(0, len(idx), args.edit_batch):
                    part = idx[b:b + args.edit_batch]
                    res = C.pipeline_edit(pipe, [images[i] for i in part], [instructions[i] for i in part],
                                          seed=[seeds[i] for i in part], steps=args.edit_steps,
                                          size=args.edit_size or None, max_sequence_length=text_len)
                    for i, r in zip(part, res):
                        out[i] = r
            return out
        return edit
    raise SystemExit(f"unknown editor {spec!r}: use mini:<name>, kontext:<path> or qwen_edit:<path>")


def bump(counters, key, k=1):
    counters[key] = counters.get(key, 0) + k


def seed_of(*parts) -> int:
    """A per-row seed from its id, so a resumed run draws the same edit for the same row."""
    return int(hashlib.md5("/".join(map(str, parts)).encode()).hexdigest()[:8], 16)


# =========================================================================================
# The five steps
# =========================================================================================
def step_decompose(rows, args, paths, counters):
    """ALGO 1: principles for each (source, instruction). Unparseable -> row left out, counted."""
    done, _ = C.open_resumable_jsonl(paths["contexts"], "id")
    chat = C.make_backend(args.decomposer, counters=counters, seed=args.seed)
    hard = C.make_backend(args.hard_filter, counters=counters, seed=args.seed) if args.hard_filter else None
    todo = [r for r in rows if r["id"] not in done]
    for s in tqdm(range(0, len(todo), args.chunk), desc="1 decompose", unit="chunk"):
        chunk = todo[s:s + args.chunk]
        images = [[C.load_image(r["source"], r["id"])] for r in chunk]
        answers = chat([(C.decompose_messages(r["instruction"]), im) for r, im in zip(chunk, images)],
                       n=1, temperature=0.0, max_tokens=args.max_tokens)
        keep = [True] * len(chunk)
        if hard is not None:  # the paper keeps instructions a strong VLM calls hard
            q = [([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text":
                  f"Is this edit hard (multi-step, fine detail, implicit or spatial)? Answer yes or "
                  f"no.\nInstruction: {r['instruction']}"}]}], im) for r, im in zip(chunk, images)]
            keep = [bool(a[0]) and a[0].strip().lower().startswith("yes") for a in hard(q, n=1)]
        out = []
        for r, ans, k in zip(chunk, answers, keep):
            if ans[0] is None:
                bump(counters, f"decompose/{args.decomposer}/backend_error")
                continue
            if not k:
                bump(counters, "decompose/not_hard")
                continue
            parsed = C.parse_principles(ans[0])
            if parsed["status"] != "ok":
                bump(counters, f"decompose/{args.decomposer}/parse_error")
                continue
            out.append({**r, "principles": parsed["principles"]})
        C.append_jsonl(paths["contexts"], out)
    wanted = {r["id"] for r in rows}  # a reused run folder may hold rows of another input
    return [c for c in C.read_jsonl(paths["contexts"], required=("id", "principles")) if c["id"] in wanted]


def step_edit(contexts, args, paths, img_dir, counters):
    """ALGO 2: every editor edits every context -> quadruples (edited, source, instruction, P)."""
    done, _ = C.open_resumable_jsonl(paths["candidates"], "id")
    editors = {spec: make_editor(spec, args) for spec in args.editors.split(",")}
    jobs = [(c, spec) for c in contexts for spec in editors if f"{c['id']}|{spec}" not in done]
    bar = tqdm(total=len(jobs), desc="2 edit", unit="edit")
    # args.chunk jobs at a time; each editor edits its share of a chunk in one batched call;
    # rows are written in job order (context, then editor), the order the pool reads them in
    for s in range(0, len(jobs), args.chunk):
        chunk, images = jobs[s:s + args.chunk], {}
        sources = {c["id"]: C.load_image(c["source"], c["id"]) for c, _ in chunk}  # once per context
        for spec, edit in editors.items():
            mine = [c for c, sp in chunk if sp == spec]
            if mine:
                out = edit([sources[c["id"]] for c in mine], [c["instruction"] for c in mine],
                           [seed_of(args.seed, f"{c['id']}|{spec}") for c in mine])
                images.update({f"{c['id']}|{spec}": im for c, im in zip(mine, out)})
        rows = []
        for c, spec in chunk:
            safe = spec.replace(":", "-").replace("/", "_")[-40:]  # readable, plus a hash: no collisions
            path = os.path.join(img_dir, f"{c['id']}_{safe}_{hashlib.md5(spec.encode()).hexdigest()[:6]}.png")
            C.save_image_atomic(images[f"{c['id']}|{spec}"], path)  # images first, then the rows
            rows.append({"id": f"{c['id']}|{spec}", "context_id": c["id"], "editor": spec, "image": path})
        C.append_jsonl(paths["candidates"], rows)
        bar.update(len(chunk))
    bar.close()
    return C.read_jsonl(paths["candidates"], required=("id", "context_id", "image"))


def step_think(cands, ctx_by_id, args, paths, counters):
    """ALGO 3: K = members x prompt variants x temperatures CoT verdicts per candidate."""
    done, _ = C.open_resumable_jsonl(paths["trajectories"], "id")
    pool = {spec: C.make_backend(spec, counters=counters, seed=args.seed) for spec in args.pool.split(",")}
    variants = args.prompt_variants.split(",")
    temps = [float(t) for t in args.temperatures.split(",")]
    todo = [c for c in cands if c["id"] not in done]
    for s in tqdm(range(0, len(todo), args.chunk), desc="3 think", unit="chunk"):
        chunk = todo[s:s + args.chunk]
        reqs = []
        for c in chunk:
            ctx = ctx_by_id[c["context_id"]]
            images = [C.load_image(ctx["source"], ctx["id"]), C.load_image(c["image"], c["id"])]
            reqs.append([(v, C.verify_messages(ctx["instruction"], ctx["principles"], v), images) for v in variants])
        trajs = [[] for _ in chunk]
        failed = [False] * len(chunk)
        for spec, chat in pool.items():
            for vi, v in enumerate(variants):
                for t in temps:
                    answers = chat([r[vi][1:] for r in reqs], n=1, temperature=t, max_tokens=args.max_tokens)
                    for i, ans in enumerate(answers):
                        if ans[0] is None:
                            failed[i] = True
                            bump(counters, f"think/{spec}/backend_error")
                            continue
                        p = C.parse_rrm_output(ans[0], len(ctx_by_id[chunk[i]["context_id"]]["principles"]))
                        if p["status"] != "ok" or p["points"] is None:
                            bump(counters, f"think/{spec}/parse_error")
                        trajs[i].append({"member": spec, "variant": v, "temperature": t, "text": ans[0],
                                         "status": p["status"], "score": p["score"], "points": p["points"]})
        # a candidate with a failed call is not written: a rerun asks again
        C.append_jsonl(paths["trajectories"], [{"id": c["id"], "trajectories": tr}
                                               for c, tr, f in zip(chunk, trajs, failed) if not f])
    return {r["id"]: r for r in C.read_jsonl(paths["trajectories"], required=("id", "trajectories"))}


def step_verify(cands, ctx_by_id, trajs, args, paths, counters):
    """ALGO 4: inspector gold labels; verification accuracy; best trajectory (common.py rules)."""
    done, _ = C.open_resumable_jsonl(paths["inspected"], "id")
    chat = C.make_backend(args.inspector, counters=counters, seed=args.seed + 1)
    todo = [c for c in cands if c["id"] in trajs and c["id"] not in done]
    for s in tqdm(range(0, len(todo), args.chunk), desc="4 verify", unit="chunk"):
        chunk = todo[s:s + args.chunk]
        reqs = []
        for c in chunk:
            ctx = ctx_by_id[c["context_id"]]
            texts = [t["text"] for t in trajs[c["id"]]["trajectories"]]
            images = [C.load_image(ctx["source"], ctx["id"]), C.load_image(c["image"], c["id"])]
            reqs.append((C.inspector_messages(ctx["instruction"], ctx["principles"], texts, args.noop_check), images))
        out = []
        for c, ans in zip(chunk, chat(reqs, n=1, temperature=0.0, max_tokens=args.max_tokens)):
            if ans[0] is None:
                bump(counters, f"verify/{args.inspector}/backend_error")
                continue
            n_p = len(ctx_by_id[c["context_id"]]["principles"])
            gold = C.parse_inspector(ans[0], n_p)
            if gold["status"] != "ok":
                bump(counters, f"verify/{args.inspector}/parse_error")
                continue
            parsed = [C.parse_rrm_output(t["text"], n_p) for t in trajs[c["id"]]["trajectories"]]
            accs = [C.verification_accuracy(p["points"], gold["gold"]) for p in parsed]
            if args.noop_check and gold["changed"] is None:
                bump(counters, f"verify/{args.inspector}/no_changed_field")
                continue
            out.append({"id": c["id"], "gold": gold["gold"], "reasons": gold["reasons"], "accuracies": accs,
                        "best": C.select_best_trajectory(parsed, gold["gold"]),
                        **({"changed": gold["changed"]} if args.noop_check else {})})
        C.append_jsonl(paths["inspected"], out)
    rows = {r["id"]: r for r in C.read_jsonl(paths["inspected"], required=("id", "gold", "best"))}
    if args.noop_check and any("changed" not in r for r in rows.values()):
        raise C.DataError(f"{paths['inspected']} was written without --noop_check (rows lack \"changed\"); "
                          f"delete it to inspect again with the no-op question")
    return rows


def step_sft_sets(cands, ctx_by_id, trajs, inspected, args, paths):
    """The two SFT sets. Think+Verify: the inspector's best trajectory. Think-only: one
    parseable pool trajectory drawn at random, with no verification (the paper's T)."""
    rng = random.Random(args.seed)
    tv, t_only = [], []
    for c in cands:
        if c["id"] not in trajs:
            continue
        ctx, tr = ctx_by_id[c["context_id"]], trajs[c["id"]]["trajectories"]
        base = {"id": c["id"], "split": ctx["split"], "source": ctx["source"], "edited": c["image"],
                "instruction": ctx["instruction"], "principles": ctx["principles"], "variant": args.rrm_variant}
        ok = [i for i, t in enumerate(tr) if t["status"] == "ok" and t["points"] is not None
              and len(t["points"]) == len(ctx["principles"])]
        if ok:
            i = rng.choice(ok)
            t_only.append({**base, "target": tr[i]["text"], "trajectory": i})
        # the inspector's record keeps the paper's choice ("best"); the target follows --tie_score
        # and --noop_check
        gold = inspected.get(c["id"], {}).get("gold")
        changed = inspected.get(c["id"], {}).get("changed") if args.noop_check else None
        best = None if gold is None else C.select_best_trajectory(tr, gold, args.tie_score, changed)
        if best is not None:
            tv.append({**base, "target": tr[best]["text"], "trajectory": best})
    for name, rows in (("sft_think_verify", tv), ("sft_think_only", t_only)):
        C.write_jsonl_atomic(paths[name], rows)  # derived files: rewritten whole, atomically
    return tv, t_only


def step_pairs(cands, ctx_by_id, args, paths, counters):
    """ALGO 5: human preference pairs between candidates of the same context; 'same' dropped.
    Mini world: the simulated rater (true utility, optional label noise). Real data: a
    JSONL of human labels {context_id, winner, loser} (image paths) is validated and split."""
    by_ctx = {}
    for c in cands:
        by_ctx.setdefault(c["context_id"], []).append(c)
    pairs = []
    if args.pairs_file:
        for i, r in enumerate(C.read_jsonl(args.pairs_file, required=("context_id", "winner", "loser")), 1):
            if r["context_id"] not in ctx_by_id:
                raise C.DataError(f"{args.pairs_file} line {i}: unknown context_id {r['context_id']!r}")
            for k in ("winner", "loser"):
                C.load_image(os.path.join(args.image_root, r[k]), f"{args.pairs_file} line {i}")
            pairs.append({"context_id": r["context_id"], "winner": os.path.join(args.image_root, r["winner"]),
                          "loser": os.path.join(args.image_root, r["loser"])})
    elif args.source == "mini":
        from miniworld import sim
        rng = np.random.default_rng(args.seed + 7)
        for cid, group in by_ctx.items():
            ctx = ctx_by_id[cid]
            src = C.load_image(ctx["source"])
            for i in range(len(group)):
                for j in range(i + 1, len(group)):
                    a, b = C.load_image(group[i]["image"]), C.load_image(group[j]["image"])
                    label = sim.prefer(src, ctx["instruction"], ctx["principles"], a, b, rng,
                                       noise=args.label_noise, same_margin=args.same_margin)
                    if label == "same":
                        bump(counters, "pairs/same_dropped")
                        continue
                    w, l = (group[i], group[j]) if label == "a" else (group[j], group[i])
                    pairs.append({"context_id": cid, "winner": w["image"], "loser": l["image"]})
    else:
        print("no --pairs_file given: preference pairs skipped (real data needs human labels)")
    out = {s: [] for s in ("train", "val", "test")}
    for k, p in enumerate(pairs):
        ctx = ctx_by_id[p["context_id"]]
        out[ctx["split"]].append({"id": f"pair-{k}", **p, "source": ctx["source"], "instruction": ctx["instruction"],
                                  "principles": ctx["principles"], "category": ctx.get("category", "")})
    for split, rows in out.items():
        C.write_jsonl_atomic(paths[f"pairs_{split}"], rows)
    return out


# =========================================================================================
# Report: counts always; accuracy against ground truth when the source has it (mini world)
# =========================================================================================
def mini_report(cands, ctx_by_id, trajs, inspected, tv, t_only, pairs) -> dict:
    """Pool / inspector / SFT-label accuracy per principle category against the world's
    exact ground truth, and how often each SFT set's scores rank the human pairs right."""
    from miniworld import world
    gt = {}
    for c in cands:
        ctx = ctx_by_id[c["context_id"]]
        gt[c["id"]] = world.ground_truth(C.load_image(ctx["source"]), ctx["instruction"], ctx["principles"],
                                         C.load_image(c["image"]))

    def acc(points_by_id):  # {candidate id: points} -> accuracy per category
        hit, tot = {}, {}
        for cid, pts in points_by_id:
            if pts is None or len(pts) != len(gt[cid]):
                continue
            for p, g, pr in zip(pts, gt[cid], ctx_by_id[cid.split("|")[0]]["principles"]):
                hit[pr["category"]] = hit.get(pr["category"], 0) + int(p == g)
                tot[pr["category"]] = tot.get(pr["category"], 0) + 1
        out = {k: round(hit[k] / tot[k], 4) for k in C.CATEGORIES if tot.get(k)}
        out["all"] = round(sum(hit.values()) / max(sum(tot.values()), 1), 4)
        return out

    by_member = {}
    for cid, r in trajs.items():
        for t in r["trajectories"]:
            by_member.setdefault(t["member"], []).append((cid, t["points"]))
    all_pool = [x for v in by_member.values() for x in v]

    def pair_acc(rows):  # do the SFT targets' final scores order the human pairs right?
        score = {r["edited"]: C.parse_rrm_output(r["target"])["score"] for r in rows}
        res = [score[p["winner"]] > score[p["loser"]] for split in pairs.values() for p in split
               if score.get(p["winner"]) is not None and score.get(p["loser"]) is not None]
        return round(sum(res) / max(len(res), 1), 4)

    return {"pool_accuracy": acc(all_pool),
            "pool_accuracy_by_member": {m: acc(v) for m, v in by_member.items()},
            "inspector_accuracy": acc([(cid, r["gold"]) for cid, r in inspected.items()]),
            "sft_label_accuracy": {"think_only": acc([(r["id"], C.parse_rrm_output(r["target"])["points"]) for r in t_only]),
                                   "think_verify": acc([(r["id"], C.parse_rrm_output(r["target"])["points"]) for r in tv])},
            "sft_label_pair_accuracy": {"think_only": pair_acc(t_only), "think_verify": pair_acc(tv)}}


def main(args: Args) -> dict:
    data_dir, img_dir = os.path.join(args.run_dir, "data"), os.path.join(args.run_dir, "data", "images")
    os.makedirs(img_dir, exist_ok=True)
    paths = {k: os.path.join(data_dir, f"{k}.jsonl") for k in (
        "contexts", "candidates", "trajectories", "inspected", "sft_think_verify", "sft_think_only",
        "pairs_train", "pairs_val", "pairs_test")}
    counters: dict = {}
    # 0. inputs
    rows = mini_contexts(args, img_dir) if args.source == "mini" else check_images(real_contexts(args), args, counters)
    # 1-5. the pipeline; each step reads what the previous one wrote
    contexts = step_decompose(rows, args, paths, counters)
    ctx_by_id = {c["id"]: c for c in contexts}
    cands = [c for c in step_edit(contexts, args, paths, img_dir, counters) if c["context_id"] in ctx_by_id]
    trajs = step_think(cands, ctx_by_id, args, paths, counters)
    inspected = step_verify(cands, ctx_by_id, trajs, args, paths, counters)
    tv, t_only = step_sft_sets(cands, ctx_by_id, trajs, inspected, args, paths)
    pairs = step_pairs(cands, ctx_by_id, args, paths, counters)
    stats = {"rows": {"inputs": len(rows), "contexts": len(contexts), "candidates": len(cands),
                      "trajectories": sum(len(r["trajectories"]) for r in trajs.values()),
                      "inspected": len(inspected), "sft_think_verify": len(tv), "sft_think_only": len(t_only),
                      **{f"pairs_{s}": len(v) for s, v in pairs.items()}},
             "counters": counters}
    if args.source == "mini":
        stats["ground_truth"] = mini_report(cands, ctx_by_id, trajs, inspected, tv, t_only, pairs)
    C.write_json_atomic(os.path.join(data_dir, "stats.json"), stats)
    print(json.dumps(stats, indent=1))
    return stats


if __name__ == "__main__":
    main(HfArgumentParser(Args).parse_args_into_dataclasses()[0])
