"""evaluate.py -- Evaluation of Edit-R1 (paper Sec. 4): how well the reasoning reward model (RRM)
ranks human preference pairs, how well an editing model edits, and one report to read.

  1. inputs   preference pairs: the run's held-out human pairs (build_data.py), a JSONL of human
              pairs (internal-benchmark style) and/or EditReward-Bench (a local parquet/arrow copy);
              editing contexts: the run's held-out contexts or GEdit-Bench-EN (a local copy)
  2. RRM      every checkpoint (base, SFT Think-only, SFT Think+Verify, GCPO, or any folder or
              served model) scores both edits of every pair; with K samples the scores are
              averaged ("reasoning expansion"). Accuracy = share of pairs whose preferred edit
              scores STRICTLY higher (EditScore's protocol: a tie is wrong, and so is a pair with
              an unparseable score -- counted and reported, never replaced by a random number)
  3. scalar   the same pairs scored by a VIEScore-style global scorer (one number, no principles):
              the paper's verifier-vs-scorer comparison
  4. editors  a diffusers editing pipeline, alone and with each Flow-GRPO LoRA, edits every
              context; a judge VLM gives GEdit's SC = min(success, over-editing), PQ =
              min(naturalness, artefacts), O = sqrt(SC * PQ) per sample; per category means and
              the unweighted mean over categories. Mini world: also the exact per-principle pass
              rates (follow / keep / quality) and the mean true utility
  5. report   <out_dir>/summary.json (+ per-sample JSONL), report.html (self-contained: tables
              beside the paper's numbers, image grids, training curves from TensorBoard), report.md

Protocol choices the benchmarks leave to us (flags): an EditReward-Bench row's `dimension` picks
one of EditScore's sub-scores; the RRM has one score, so the headline uses the `overall` rows
(--erb_dimension) and every dimension is reported; rows without principles (EditReward-Bench,
GEdit) get them from --decomposer, and a failed decomposition makes its pairs wrong (counted).
Not done here: training, or any score a model did not produce.

Run
  python evaluate.py            # mini world after the mini stages: < 3 min on 2 CPU cores -> runs/mini/eval
  python evaluate.py --run_dir runs/real --world none --pairs_split "" --variant full \\
      --rrms think_verify=runs/real/sft_rrm,gcpo=runs/real/gcpo_rrm --bf16 --batch_size 8 \\
      --max_new_tokens 1024 --editreward_bench data/EditReward-Bench --max_pairs 0 \\
      --decomposer openai:gpt-4.1@https://api.openai.com/v1 \\
      --scalar_scorer openai:gpt-4.1@https://api.openai.com/v1 --editor_base ""    # RRM, 1 GPU
      (or serve the RRM with vLLM and pass --rrms gcpo=openai:gcpo@http://localhost:8000/v1)
  python evaluate.py --run_dir runs/real --world none --pairs_split "" --rrms "" --scalar_scorer "" \\
      --editor_base black-forest-labs/FLUX.1-Kontext-dev --editor_loras runs/real/flow_grpo_gcpo \\
      --gedit_bench data/GEdit-Bench --max_contexts 0 --edit_steps 28 --edit_batch 1 --edit_seeds 1 --bf16 \\
      --judge openai:gpt-4.1@https://api.openai.com/v1                            # editor, 1 GPU
  (OPENAI_API_KEY is read from the environment. No accelerate: scoring is inference only.)

Legend: P = pairs, R = unique (source, edit, instruction) requests (R <= 2P), K = samples per request.
"""
from __future__ import annotations

import base64
import glob
import hashlib
import html
import io
import json
import os
import random
import tempfile
import textwrap
import time
from dataclasses import asdict, dataclass, field

import torch
from transformers import HfArgumentParser

import common as C


@dataclass
class Args:
    # --- where
    run_dir: str = field(default="runs/mini", metadata={"help": "run folder: reads <run_dir>/data and the stages' model folders"})
    out_dir: str = field(default="", metadata={"help": "report folder (default <run_dir>/eval)"})
    world: str = field(default="mini", metadata={"help": "mini: also score the run's pairs and edits against the mini world's exact ground truth; none: real data"})
    # --- RRM accuracy: what is scored
    rrms: str = field(default="auto", metadata={"help": "auto (base + <run_dir>/sft_rrm_think_only, sft_rrm, gcpo_rrm that exist) or a comma list of label=<folder | hub id | mini:<member> | hf:<path> | openai:<model>@<url>>; '' = none"})
    base_rrm: str = field(default="miniworld/checkpoints/rrm_base", metadata={"help": "the base RRM that --rrms auto includes"})
    scalar_scorer: str = field(default="mini:judge", metadata={"help": "backend for the VIEScore-style scalar baseline (common.scalar_messages); '' = skip"})
    pairs_split: str = field(default="test", metadata={"help": "score <run_dir>/data/pairs_<split>.jsonl ('' = skip)"})
    pairs_file: str = field(default="", metadata={"help": "JSONL of human pairs {source, winner, loser, instruction, principles[, category]}"})
    image_root: str = field(default="", metadata={"help": "folder that relative image paths of --pairs_file are under"})
    editreward_bench: str = field(default="", metadata={"help": "local EditReward-Bench copy (parquet file/folder, arrow, or save_to_disk folder)"})
    erb_dimension: str = field(default="overall", metadata={"help": "EditReward-Bench rows of this dimension make the headline (prompt_following, consistency, overall or all)"})
    decomposer: str = field(default="mini:decomposer", metadata={"help": "backend that writes principles for rows that have none"})
    max_pairs: int = field(default=0, metadata={"help": "pairs per benchmark (a seeded subset; 0 = all: the mini test split has ~245, and 128 left a standard error of ~0.04)"})
    # --- RRM generation
    variant: str = field(default="compact", metadata={"help": "verify prompt wording the RRM was trained with (mini: compact, real: full)"})
    k_samples: int = field(default=1, metadata={"help": "K samples per edit, scores averaged ('reasoning expansion'; needs --temperature > 0)"})
    temperature: float = field(default=0.0, metadata={"help": "sampling temperature (0 = greedy)"})
    max_new_tokens: int = field(default=256, metadata={"help": "RRM answer length"})
    batch_size: int = field(default=32, metadata={"help": "requests per generate / backend call"})
    vlm_max_tokens: int = field(default=1024, metadata={"help": "answer length of the decomposer and judge backends"})
    # --- editors
    editor_base: str = field(default="miniworld/checkpoints/kontext", metadata={"help": "diffusers editing pipeline (Kontext or Qwen-Image-Edit; folder or hub id); '' = no editing evaluation"})
    editor_loras: str = field(default="auto", metadata={"help": "auto (every <run_dir>/flow_grpo* folder with a LoRA) or a comma list of LoRA folders; a LoRA's summary.json names its base"})
    gedit_bench: str = field(default="", metadata={"help": "local GEdit-Bench copy; default: the run's contexts.jsonl"})
    gedit_language: str = field(default="en", metadata={"help": "GEdit-Bench rows of this instruction_language"})
    contexts_split: str = field(default="test", metadata={"help": "split of <run_dir>/data/contexts.jsonl to edit"})
    max_contexts: int = field(default=100, metadata={"help": "contexts to edit (the first ones; 0 = all)"})
    judge: str = field(default="mini:judge", metadata={"help": "GEdit-style judge backend (SC and PQ prompts)"})
    edit_steps: int = field(default=10, metadata={"help": "denoising steps (mini: 10, as flow_grpo.py; FLUX.1-Kontext: 28)"})
    edit_batch: int = field(default=8, metadata={"help": "contexts per pipeline call; the noise seed is per call, the same for every editor"})
    edit_seeds: int = field(default=8, metadata={"help": "edits per context, each from its own starting noise (GEdit-Bench: 1). The mini world's 100 test contexts with one noise draw each moved an editor's mean true utility by up to 0.45 between draws (session 8), more than Flow-GRPO's effect; 8 draws cost ~40 s per editor on CPU"})
    guidance_scale: float = field(default=2.5, metadata={"help": "Kontext guidance embedding"})
    true_cfg_scale: float = field(default=4.0, metadata={"help": "Qwen-Image-Edit true CFG scale"})
    max_sequence_length: int = field(default=0, metadata={"help": "Kontext T5 tokens (0 = 24 for the mini world, 512 otherwise)"})
    # --- device, report
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    bf16: bool = field(default=False, metadata={"help": "bf16 weights for in-process RRMs and editors (GPU)"})
    grid_rows: int = field(default=6, metadata={"help": "pairs / contexts shown in each image grid"})
    seed: int = field(default=0, metadata={"help": "seed of subsets, samplers, simulated backends and edit noise"})


# The paper's numbers, shown beside ours where a row corresponds (Qwen2.5-VL-7B RRMs, FLUX.1-Kontext).
PAPER = {
    "pairs": {"think_only": "68.9", "think_verify": "75.4", "gcpo": "82.2",
              "scalar": "68.3 (SFT on VIEScore-style prompts)"},
    "editreward_bench": {"think_verify": "73.3", "gcpo": "78.2",
                         "scalar": "65.9 / 72.7 (EditScore-7B, 1 / 4 samples)"},
    "gedit": {"base": "6.27 / 7.25 / 5.77 (FLUX.1-Kontext)", "rl": "6.86 / 7.20 / 6.24 (+RL-RRM)"},
}
AUTO_RRMS = (("think_only", "sft_rrm_think_only"), ("think_verify", "sft_rrm"), ("gcpo", "gcpo_rrm"))
ERB_COLUMNS = ("key", "instruction", "input_image", "output_images", "task_type", "dimension")
GEDIT_COLUMNS = ("task_type", "key", "instruction", "instruction_language", "input_image")


# =========================================================================================
# ALGO: the benchmarks' protocols (pure functions)
# =========================================================================================
def request_score(samples: list[dict], principles, mode: str = "holistic") -> float | None:
    """One edit's score: the mean of Phi over its K parseable samples; None if none parses.

    >>> ok = lambda s: C.parse_rrm_output(C.format_rrm_output("", [1], s))
    >>> request_score([ok(6), C.parse_rrm_output("no idea"), ok(8)], None)
    7.0
    """
    vals = [C.aggregate_score(s, principles, mode) for s in samples if s["status"] != "backend_error"]
    vals = [v for v in vals if v is not None]
    return sum(vals) / len(vals) if vals else None


def pair_accuracy(scores_w: list, scores_l: list, groups: list | None = None) -> dict:
    """EditScore's protocol: a pair is right only if the preferred edit scores STRICTLY higher
    (a tie or a missing score is wrong). accuracy = share of all pairs; task_mean = the
    unweighted mean of the per-group accuracies (EditReward-Bench's reported number).

    >>> r = pair_accuracy([7, 5, None, 2, 8], [5, 5, 3, 9, 1], ["a", "a", "b", "b", "b"])
    >>> r["accuracy"], round(r["task_mean"], 4), {g: round(v, 4) for g, v in r["by_group"].items()}
    (0.4, 0.4167, {'a': 0.5, 'b': 0.3333})
    """
    out = C.pairwise_accuracy(scores_w, scores_l)
    groups = groups or ["all"] * len(scores_w)
    by = {}
    for g in sorted(set(groups)):
        idx = [i for i, x in enumerate(groups) if x == g]
        by[g] = C.pairwise_accuracy([scores_w[i] for i in idx], [scores_l[i] for i in idx])["accuracy"]
    return {**out, "task_mean": sum(by.values()) / max(len(by), 1), "by_group": by}


def gedit_summary(records: list[dict]) -> dict:
    """GEdit-Bench numbers from per-sample {category, SC, PQ, O} (None = the judge's answer did
    not parse): per category the mean over samples that have the score; the final number is the
    unweighted mean over categories; `missing` counts samples without each score.

    >>> recs = [{"category": "a", **C.gedit_scores([8, 6], [9, 4])}, {"category": "a", **C.gedit_scores([2, 2], None)},
    ...         {"category": "b", **C.gedit_scores([10, 9], [9, 9])}]
    >>> s = gedit_summary(recs)   # a: SC (6+2)/2 = 4, PQ 4, O sqrt(24); b: SC 9, PQ 9, O 9
    >>> s["SC"], s["PQ"], round(s["O"], 3), s["missing"]
    (6.5, 6.5, 6.949, {'SC': 0, 'PQ': 1, 'O': 1})
    """
    out, by = {"missing": {}, "by_category": {}}, {}
    for r in records:
        by.setdefault(r["category"], []).append(r)
    for m in ("SC", "PQ", "O"):
        cat_means = {}
        for cat, rs in sorted(by.items()):
            vals = [r[m] for r in rs if r[m] is not None]
            cat_means[cat] = sum(vals) / len(vals) if vals else None
            out["by_category"].setdefault(cat, {})[m] = cat_means[cat]
        have = [v for v in cat_means.values() if v is not None]
        out[m] = sum(have) / len(have) if have else None
        out["missing"][m] = sum(r[m] is None for r in records)
    out["samples"] = len(records)
    return out


def verdict_str(points, principles) -> str:
    """Per-principle 0/1 grouped by category, for the image grids.

    >>> verdict_str([1, 0, 1], [{"category": "follow"}, {"category": "keep"}, {"category": "keep"}])
    'F1 K01'
    """
    if points is None or principles is None:
        return ""
    if len(points) != len(principles):
        return "points?"
    return " ".join(c[0].upper() + "".join(str(v) for v, p in zip(points, principles) if p["category"] == c)
                    for c in C.CATEGORIES if any(p["category"] == c for p in principles))


# =========================================================================================
# INFRA: inputs. A pair = {id, w, l, group, dimension} pointing at requests; a request
# (one edit to score) = {instruction, principles, src_key, load() -> (source, edited), where}.
# Images are loaded per batch, so a full benchmark never sits in memory.
# =========================================================================================
def to_pil(value, where: str, verify_only: bool = False):
    """A PIL RGB image from what a datasets column or a JSONL row holds (PIL, {bytes, path},
    bytes, path); a missing or undecodable image raises DataError naming the row.
    verify_only: check the file's structure without decoding it (the up-front pass)."""
    from PIL import Image
    try:
        if isinstance(value, Image.Image):
            return value.convert("RGB")
        if isinstance(value, dict) and value.get("bytes"):
            value = value["bytes"]
        elif isinstance(value, dict) and value.get("path"):
            value = value["path"]
        if isinstance(value, (bytes, bytearray)):
            with Image.open(io.BytesIO(value)) as im:
                return im.verify() if verify_only else im.convert("RGB")
        if isinstance(value, str):
            return C.load_image(value, where)
    except C.DataError:
        raise
    except Exception as e:  # PIL raises several types for broken bytes
        raise C.DataError(f"{where}: undecodable image ({type(e).__name__}: {e}); fix or drop the row") from None
    raise C.DataError(f"{where}: no image (got {type(value).__name__}); fix or drop the row")


def load_table(path: str, columns: tuple, cache_dir: str):
    """A local benchmark copy as a datasets.Dataset with image columns left undecoded: a
    parquet file, a folder of parquet files (any depth, e.g. a hub snapshot) or a save_to_disk
    (arrow) folder."""
    import datasets
    if os.path.isdir(path) and any(os.path.exists(os.path.join(path, f)) for f in
                                   ("dataset_info.json", "state.json", "dataset_dict.json")):
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            split = "train" if "train" in ds else (list(ds)[0] if len(ds) == 1 else None)
            if split is None:
                raise C.DataError(f"{path}: several splits {list(ds)} and none is 'train'; point at one split's folder")
            ds = ds[split]
    else:
        files = [path] if os.path.isfile(path) else sorted(glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True))
        if not files:
            raise C.DataError(f"{path}: no parquet files and no save_to_disk folder (or the path does not exist)")
        ds = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=cache_dir)
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise C.DataError(f"{path}: missing column(s) {missing}; found {ds.column_names}")

    def raw(f):  # decode=False: we decode ourselves, so a broken image names its row
        if isinstance(f, datasets.Image):
            return datasets.Image(decode=False)
        if isinstance(f, (datasets.List, datasets.LargeList)):
            return type(f)(raw(f.feature))
        return f
    return ds.cast(datasets.Features({k: raw(v) for k, v in ds.features.items()}))


def subset(n_rows: int, cap: int, seed: int) -> list[int]:
    """Row indices: all, or a seeded subset of `cap` in file order."""
    return list(range(n_rows)) if not cap or cap >= n_rows else sorted(random.Random(seed).sample(range(n_rows), cap))


def check_principles(ps, where: str):
    if ps is None or ps == []:
        return None  # the decomposer writes them
    if not isinstance(ps, list) or not all(isinstance(p, dict) and isinstance(p.get("question"), str)
                                           and C.normalize_category(p.get("category")) for p in ps):
        raise C.DataError(f"{where}: 'principles' must be a list of {{question, category}} objects; fix the row")
    return [{"question": p["question"], "category": C.normalize_category(p["category"])} for p in ps]


def jsonl_pairs(path: str, image_root: str, args: Args) -> dict:
    """Human pairs {source, winner, loser, instruction, principles[, category, id]} (the run's
    pairs_<split>.jsonl or the internal-benchmark style); every image is opened up front."""
    rows = C.read_jsonl(path, required=("source", "winner", "loser", "instruction"))
    pairs, reqs = [], {}
    for i in subset(len(rows), args.max_pairs, args.seed):
        r, where = rows[i], f"{path} row {i + 1} (id {rows[i].get('id', '-')})"
        ps = check_principles(r.get("principles"), where)
        src = os.path.join(image_root, r["source"])
        keys = []
        for k in ("winner", "loser"):
            ed = os.path.join(image_root, r[k])
            for p in (src, ed):
                C.load_image(p, f"{where}, {k}")
            key = f"{src}|{ed}|{r['instruction']}"
            reqs[key] = {"instruction": r["instruction"], "principles": ps, "src_key": f"{src}|{r['instruction']}",
                         "load": lambda s=src, e=ed, w=where: (C.load_image(s, w), C.load_image(e, w))}
            keys.append(key)
        pairs.append({"id": str(r.get("id", i + 1)), "w": keys[0], "l": keys[1],
                      "group": r.get("category") or "all", "dimension": None})
    return {"pairs": pairs, "reqs": reqs}


def editreward_pairs(path: str, args: Args, cache_dir: str) -> dict:
    """EditReward-Bench rows (key: 2 ids, instruction, input_image, output_images: 2, the
    preferred first, task_type, dimension). Each output key is scored once however many rows
    (dimensions) it appears in, as EditScore caches it; outputs are resized to the input's size,
    as EditScore does before scoring."""
    ds = load_table(path, ERB_COLUMNS, cache_dir)
    pairs, reqs = [], {}
    for i in subset(len(ds), args.max_pairs, args.seed):
        row = ds[i]
        where = f"{path} row {i} (key {row['key']})"
        keys, outs = row["key"], row["output_images"]
        if not isinstance(keys, list) or len(keys) != 2 or not isinstance(outs, list) or len(outs) != 2:
            raise C.DataError(f"{where}: 'key' and 'output_images' must each hold 2 entries (preferred first)")
        for j, im in enumerate([row["input_image"], *outs]):  # fail before any scoring, naming the row
            to_pil(im, f"{where} {'input_image' if j == 0 else f'output_images[{j - 1}]'}", verify_only=True)
        raw = row["input_image"]
        src_key = hashlib.md5(raw["bytes"] if isinstance(raw, dict) and raw.get("bytes") else str(raw).encode()).hexdigest()
        for j, k in enumerate(keys):
            reqs.setdefault(str(k), {"instruction": row["instruction"], "principles": None,
                                     "src_key": f"{src_key}|{row['instruction']}",
                                     "load": lambda i=i, j=j, w=where: erb_images(ds, i, j, w)})
        pairs.append({"id": f"{keys[0]}|{keys[1]}|{row['dimension']}", "w": str(keys[0]), "l": str(keys[1]),
                      "group": row["task_type"], "dimension": row["dimension"]})
    return {"pairs": pairs, "reqs": reqs}


def erb_images(ds, i: int, j: int, where: str) -> tuple:
    """(input image, output j resized to the input's size) of EditReward-Bench row i."""
    row = ds[i]
    src = to_pil(row["input_image"], f"{where} input_image")
    return src, to_pil(row["output_images"][j], f"{where} output_images[{j}]").resize(src.size)


def edit_contexts(args: Args, cache_dir: str) -> tuple[list, str]:
    """Contexts to edit: GEdit-Bench rows of one language, or the run's held-out contexts."""
    if args.gedit_bench:
        ds = load_table(args.gedit_bench, GEDIT_COLUMNS, cache_dir)
        langs = ds["instruction_language"]
        keep = [i for i, lang in enumerate(langs) if lang == args.gedit_language]
        if not keep:
            raise C.DataError(f"{args.gedit_bench}: no rows with instruction_language {args.gedit_language!r} (found {sorted(set(langs))})")
        out = []
        for i in keep[:args.max_contexts or None]:
            row = ds[i]
            where = f"{args.gedit_bench} row {i} (key {row['key']})"
            to_pil(row["input_image"], where, verify_only=True)
            out.append({"id": str(row["key"]), "category": row["task_type"], "instruction": row["instruction"],
                        "principles": None, "load": lambda i=i, w=where: to_pil(ds[i]["input_image"], w)})
        return out, f"GEdit-Bench ({args.gedit_language}, {len(out)} of {len(keep)} rows)"
    path = os.path.join(args.run_dir, "data", "contexts.jsonl")
    rows = [r for r in C.read_jsonl(path, required=("id", "split", "instruction", "source", "principles"))
            if r["split"] == args.contexts_split][:args.max_contexts or None]
    return ([{**r, "category": r.get("category") or "all", "load": lambda r=r: C.load_image(r["source"], r["id"])}
             for r in rows], f"{path} split {args.contexts_split} ({len(rows)} contexts)")


# =========================================================================================
# Scorers: one call shape, score(batch of (source, edited, instruction, principles)) -> K parsed
# =========================================================================================
def parsed(text, n_principles):
    if text is None:  # the backend failed: counted apart from the model's own parse failures
        return {"status": "backend_error", "score": None, "points": None, "average": None, "flags": [], "text": None}
    return dict(C.parse_rrm_output(text, n_principles), text=text)


def make_scorer(spec: str, args: Args, device, counters: dict, scalar: bool = False):
    """The RRM (or, scalar=True, the VIEScore-style scorer: [source, edited] + instruction ->
    <score>x</score>, no principles). A folder or hub id RRM is generated in-process (greedy or
    temperature sampling, K return sequences); mini:, hf:, openai: specs go through make_backend."""
    if scalar or spec.partition(":")[0] in ("mini", "hf", "openai"):
        chat = C.make_backend(spec if ":" in spec else f"hf:{spec}", counters=counters, seed=args.seed)

        def score(batch):
            msgs = [(C.scalar_messages(ins) if scalar else C.verify_messages(ins, ps, args.variant), [s, e])
                    for s, e, ins, ps in batch]
            texts = chat(msgs, n=args.k_samples, temperature=args.temperature, max_tokens=args.max_new_tokens)
            return [[parsed(t, None if scalar else len(b[3])) for t in ts] for ts, b in zip(texts, batch)]
        return score
    model, processor = C.load_rrm(spec, dtype=torch.bfloat16 if args.bf16 else None)
    model.to(device).eval()
    tok, sample, K = processor.tokenizer, args.temperature > 0, args.k_samples

    @torch.no_grad()
    def score(batch):
        # HF generate without logits: common.generate_n keeps (B*K, T, V) logits for RL, too
        # much memory at 7B scale; the greedy tokens are the same.
        prompts = C.encode_prompts(processor, [C.verify_messages(ins, ps, args.variant) for _, _, ins, ps in batch],
                                   [[s, e] for s, e, _, _ in batch]).to(model.device)
        out = model.generate(**prompts, do_sample=sample, temperature=args.temperature if sample else None,
                             top_p=1.0 if sample else None, top_k=0 if sample else None, num_return_sequences=K,
                             max_new_tokens=args.max_new_tokens, suppress_tokens=C.suppress_ids(model, processor),
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))
        C.reset_rope_cache(model)
        texts = tok.batch_decode(out[:, prompts["input_ids"].shape[1]:], skip_special_tokens=True)  # (B*K,)
        return [[parsed(t, len(b[3])) for t in texts[i * K:(i + 1) * K]] for i, b in enumerate(batch)]
    return score


def score_requests(score, reqs: dict, batch_size: int, needs_principles: bool = True) -> dict:
    """{request key: K parsed samples}; an RRM is not asked about a request without principles (-> [])."""
    keys = [k for k, r in reqs.items() if r["principles"] is not None or not needs_principles]
    out = {k: [] for k in reqs}
    for s in range(0, len(keys), batch_size):
        chunk = keys[s:s + batch_size]
        batch = [(*reqs[k]["load"](), reqs[k]["instruction"], reqs[k]["principles"] or []) for k in chunk]
        for k, samples in zip(chunk, score(batch)):
            out[k] = samples
    return out


def decompose(reqs: list[dict], args: Args, counters: dict) -> int:
    """Principles for requests that have none, one decomposer call per (source, instruction).
    A failure leaves principles None (its pairs count as wrong) and is counted."""
    todo = {}
    for r in reqs:
        if r["principles"] is None:
            todo.setdefault(r["src_key"], []).append(r)
    if not todo:
        return 0
    chat, done = C.make_backend(args.decomposer, counters=counters, seed=args.seed), {}
    items = list(todo.items())
    for s in range(0, len(items), args.batch_size):
        chunk = items[s:s + args.batch_size]
        answers = chat([(C.decompose_messages(rs[0]["instruction"]), [rs[0]["load"]()[0]]) for _, rs in chunk],
                       n=1, temperature=0.0, max_tokens=args.vlm_max_tokens)
        for (key, rs), ans in zip(chunk, answers):
            p = C.parse_principles(ans[0]) if ans[0] is not None else {"status": "error"}
            what = "decompose/" + ("ok" if p["status"] == "ok" else "backend_error" if ans[0] is None else "parse_error")
            counters[what] = counters.get(what, 0) + 1
            for r in rs:
                r["principles"] = p.get("principles") if p["status"] == "ok" else None
            done[key] = p["status"] == "ok"
    print(f"decomposed {sum(done.values())}/{len(done)} (source, instruction) with {args.decomposer}")
    return len(done) - sum(done.values())


def rrm_metrics(bench: dict, samples: dict, scalar: bool) -> dict:
    """Accuracy (holistic Phi and, for RRMs, the weighted, deductions and capped aggregates),
    ties, unparsed pairs, parse counts, and in the mini world the per-principle verification
    accuracy."""
    pairs, reqs = bench["pairs"], bench["reqs"]
    sc = {m: {k: request_score(v, reqs[k]["principles"], m) for k, v in samples.items()}
          for m in (("holistic",) if scalar else ("holistic", "weighted", "deductions", "capped"))}
    groups = [p["group"] for p in pairs]
    out = pair_accuracy([sc["holistic"][p["w"]] for p in pairs], [sc["holistic"][p["l"]] for p in pairs], groups)
    for m in (() if scalar else ("weighted", "deductions", "capped")):  # the same verdicts, other score rules
        out[f"accuracy_{m}"] = pair_accuracy([sc[m][p["w"]] for p in pairs], [sc[m][p["l"]] for p in pairs],
                                             groups)["accuracy"]
    dims = sorted({p["dimension"] for p in pairs if p["dimension"]})
    if dims:  # EditReward-Bench: every dimension, and the headline's (or all rows)
        out["by_dimension"] = {d: pair_accuracy(*[[sc["holistic"][p[s]] for p in pairs if p["dimension"] == d] for s in "wl"],
                                                [p["group"] for p in pairs if p["dimension"] == d]) for d in dims}
        head = out["by_dimension"].get(bench.get("dimension"))
        if head:
            out.update({k: head[k] for k in ("accuracy", "task_mean", "by_group", "ties", "unparsed_pairs", "pairs")})
    flat = [s for v in samples.values() for s in v]
    status = {}
    for s in flat:
        status[s["status"]] = status.get(s["status"], 0) + 1
    valid = [v for v in sc["holistic"].values() if v is not None]
    out.update(parse_rate=status.get("ok", 0) / max(len(flat), 1), samples=len(flat), status=status,
               no_principles=sum(r["principles"] is None for r in reqs.values()) if not scalar else 0,
               mean_score=sum(valid) / len(valid) if valid else None)
    if any("gt" in r for r in reqs.values()) and not scalar:
        hit, tot = {}, {}
        for k, r in reqs.items():
            for s in samples[k]:
                if r.get("gt") and s["points"] is not None and len(s["points"]) == len(r["gt"]):
                    for v, g, p in zip(s["points"], r["gt"], r["principles"]):
                        hit[p["category"]] = hit.get(p["category"], 0) + int(v == g)
                        tot[p["category"]] = tot.get(p["category"], 0) + 1
        out["verification_accuracy"] = {c: hit[c] / tot[c] for c in C.CATEGORIES if tot.get(c)}
    out["scores"] = {k: sc["holistic"][k] for k in samples}
    return out


# =========================================================================================
# Editors: a base pipeline and Flow-GRPO LoRAs on it
# =========================================================================================
def find_editors(args: Args, notes: list) -> list[dict]:
    """[{label, base, lora, rl}]: the base editor first, then each LoRA on its own base (from the
    LoRA's summary.json args.policy when flow_grpo.py wrote it)."""
    if not args.editor_base:
        return []
    if args.editor_loras == "auto":
        dirs = sorted(d for d in glob.glob(os.path.join(args.run_dir, "flow_grpo*"))
                      if glob.glob(os.path.join(d, "*lora*.safetensors")))
        if not dirs:
            notes.append(f"No Flow-GRPO LoRA under {args.run_dir} (flow_grpo_sft / flow_grpo_gcpo / flow_grpo): "
                         "the editing evaluation covers the base editor only.")
    else:
        dirs = []
        for d in filter(None, args.editor_loras.split(",")):
            (dirs.append(d) if os.path.isdir(d) else notes.append(f"LoRA folder {d} not found: skipped."))
    eds = [{"label": "base", "base": args.editor_base, "lora": None, "rl": False}]
    for d in dirs:
        summ = json.load(open(os.path.join(d, "summary.json"))) if os.path.exists(os.path.join(d, "summary.json")) else {}
        a = summ.get("args", {})
        eds.append({"label": os.path.basename(d.rstrip("/")), "base": a.get("policy", args.editor_base), "lora": d,
                    "rl": "gcpo" in os.path.basename(d) or "gcpo" in str(a.get("reward_model", ""))})
    return eds


def evaluate_editor(pipe, label: str, contexts: list, judge, args: Args, out_dir: str, world) -> tuple:
    """Edit every context (--edit_seeds times, each draw from its own starting noise), judge
    SC/PQ, and in the mini world check the ground truth. Records are draw-major, so the first
    len(contexts) are draw 0 in context order. Returns
    (per-sample records, the first grid_rows edits). Edits are saved under <out_dir>/edits/."""
    recs, shown = [], []
    for k, s in [(k, s) for k in range(args.edit_seeds) for s in range(0, len(contexts), args.edit_batch)]:
        chunk = contexts[s:s + args.edit_batch]
        srcs = [c["load"]() for c in chunk]  # draw k of every context starts from its own noise seed
        edits = C.pipeline_edit(pipe, srcs, [c["instruction"] for c in chunk], seed=args.seed + s + 100003 * k, steps=args.edit_steps,
                                guidance_scale=args.guidance_scale,
                                true_cfg_scale=args.true_cfg_scale, max_sequence_length=args.max_sequence_length)
        sc = judge([(C.judge_sc_messages(c["instruction"]), [src, ed]) for c, src, ed in zip(chunk, srcs, edits)],
                   n=1, temperature=0.0, max_tokens=args.vlm_max_tokens)
        pq = judge([(C.judge_pq_messages(), [ed]) for ed in edits], n=1, temperature=0.0, max_tokens=args.vlm_max_tokens)
        for c, src, ed, a, b in zip(chunk, srcs, edits, sc, pq):
            ja, jb = C.parse_judge(a[0]), C.parse_judge(b[0])
            path = os.path.join(out_dir, "edits", label, hashlib.md5(c["id"].encode()).hexdigest()[:10]
                                + (f"_{k}" if k else "") + ".png")
            C.save_image_atomic(ed, path)
            rec = {"id": c["id"], "draw": k, "editor": label, "category": c["category"], "instruction": c["instruction"],
                   **C.gedit_scores(ja["scores"], jb["scores"]), "sc_sub": ja["scores"], "pq_sub": jb["scores"],
                   "judge_error": [x["reason"] for x in (ja, jb) if x["status"] != "ok"], "image": path}
            if world is not None and c.get("principles"):
                rec.update(truth(world, src, c["instruction"], c["principles"], ed))
            recs.append(rec)
            if len(shown) < args.grid_rows:
                shown.append(ed)
    return recs, shown


def truth(world, src, instruction: str, principles: list, edited) -> dict:
    """The mini world's exact verdicts and utility of one edit."""
    try:
        return {"gt": world.ground_truth(src, instruction, principles, edited),
                "utility": world.utility(src, instruction, principles, edited)}
    except ValueError as e:  # a real instruction the world cannot read
        raise SystemExit(f"{e}: this is not mini-world data; pass --world none") from None


def truth_summary(recs: list[dict], contexts: dict) -> dict:
    """Mini world: pass rate of each principle category (pooled over principles) and mean utility."""
    out = {}
    for cat in C.CATEGORIES:
        vals = [g for r in recs for g, p in zip(r["gt"], contexts[r["id"]]["principles"]) if p["category"] == cat]
        if vals:
            out[f"pass_{cat}"] = sum(vals) / len(vals)
    out["utility"] = sum(r["utility"] for r in recs) / len(recs)
    per_ctx = {}  # the standard error over contexts of each context's mean over its draws
    for r in recs:
        per_ctx.setdefault(r["id"], []).append(r["utility"])
    means = [sum(v) / len(v) for v in per_ctx.values()]
    out["utility_se"] = (sum((m - out["utility"]) ** 2 for m in means) / max(len(means) - 1, 1) / len(means)) ** 0.5
    return out


# =========================================================================================
# Report: grids (PIL), curves (SVG), tables (HTML + Markdown from the same rows)
# =========================================================================================
def png_b64(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def grid(rows: list[list[tuple]], tile: int = 144, col_w: int = 250, line_h: int = 12) -> "Image":
    """rows of cells (image, text lines) -> one sheet; images fit a tile, text below them."""
    from PIL import Image, ImageDraw
    n_lines = max(len(lines) for row in rows for _, lines in row)
    cols = max(len(r) for r in rows)
    row_h = tile + 6 + n_lines * line_h + 10
    sheet = Image.new("RGB", (cols * col_w + 10, len(rows) * row_h + 10), "white")
    draw = ImageDraw.Draw(sheet)
    for i, row in enumerate(rows):
        for j, (img, lines) in enumerate(row):
            x, y = 10 + j * col_w, 10 + i * row_h
            f = tile / max(img.size)  # small mini-world images scale up crisply, large ones down smoothly
            im = img.convert("RGB").resize((max(1, round(img.size[0] * f)), max(1, round(img.size[1] * f))),
                                           Image.Resampling.NEAREST if f >= 1 else Image.Resampling.LANCZOS)
            sheet.paste(im, (x, y))
            for k, line in enumerate(lines):
                draw.text((x, y + tile + 4 + k * line_h), line[:40], fill="black")
    return sheet


def svg_curve(title: str, points: list, w: int = 300, h: int = 160) -> str:
    """A line chart of [(step, value)] as inline SVG (matplotlib is not a dependency)."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-9)
    L, R, T, B = 44, 8, 18, 20
    px = lambda x: L + (x - x0) / (x1 - x0) * (w - L - R)
    py = lambda y: T + (y1 - y) / (y1 - y0) * (h - T - B)
    line = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in points)
    return (f'<svg width="{w}" height="{h}" xmlns="http://www.w3.org/2000/svg" font-size="10" font-family="sans-serif">'
            f'<rect x="{L}" y="{T}" width="{w - L - R}" height="{h - T - B}" fill="#fafafa" stroke="#ccc"/>'
            f'<text x="{L}" y="12">{html.escape(title)}</text>'
            f'<text x="{L - 3}" y="{T + 8}" text-anchor="end">{y1:.3g}</text>'
            f'<text x="{L - 3}" y="{h - B}" text-anchor="end">{y0:.3g}</text>'
            f'<text x="{L}" y="{h - 6}">{x0:g}</text><text x="{w - R}" y="{h - 6}" text-anchor="end">step {x1:g}</text>'
            f'<polyline fill="none" stroke="#1f6feb" stroke-width="1.5" points="{line}"/>'
            + (f'<circle cx="{px(xs[0]):.1f}" cy="{py(ys[0]):.1f}" r="2.5" fill="#1f6feb"/>' if len(points) == 1 else "")
            + "</svg>")


def read_curves(run_dir: str, skip: str) -> dict:
    """{stage: {tag: [(step, value)]}} from every TensorBoard event file under the run's stage
    folders (accelerate writes <stage>/<tracker name>/events.out.tfevents.*)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    curves = {}
    for stage in sorted(os.listdir(run_dir)) if os.path.isdir(run_dir) else []:
        root = os.path.join(run_dir, stage)
        if stage == "data" or not os.path.isdir(root) or os.path.abspath(root) == os.path.abspath(skip):
            continue
        for d, _, files in os.walk(root):
            if "checkpoints" in os.path.relpath(d, root).split(os.sep) or not any("tfevents" in f for f in files):
                continue
            acc = EventAccumulator(d, size_guidance={"scalars": 0})
            acc.Reload()
            for tag in acc.Tags().get("scalars", []):
                if not tag.startswith("time/"):
                    curves.setdefault(stage, {}).setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return {s: {t: sorted(v) for t, v in tags.items()} for s, tags in curves.items()}


def fmt(v, pct: bool = False) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    return f"{100 * v:.1f}" if pct else f"{v:.2f}"


def pair_grid(bench: dict, shown: dict, n: int):
    """Rows of source | preferred | other; under each edit the ground truth (mini world) and
    every model's first sample: per-principle points and score."""
    rows = []
    for p in bench["pairs"][:n]:
        cells = []
        for side in ("w", "l"):
            r = bench["reqs"][p[side]]
            src, img = r["load"]()
            lines = ["preferred" if side == "w" else "other"]
            lines += [f"truth {verdict_str(r['gt'], r['principles'])} u={r['utility']:g}"] if "gt" in r else []
            for lab, sh in shown.items():
                v = sh.get(p[side])
                lines.append(f"{lab}: " + ("-" if v is None else f"unparsed ({v['status']})" if v["score"] is None
                                           else f"{verdict_str(v['points'], r['principles'])} {v['score']:g}".lstrip()))
            cells.append((img, lines))
        rows.append([(src, textwrap.wrap(r["instruction"], 40)[:3])] + cells)
    return grid(rows)


def editor_grid(contexts: list, editing: dict, edits: dict, n: int):
    """Rows of source | each editor's edit with its judge scores and ground-truth verdicts."""
    rows = []
    for i, c in enumerate(contexts[:n]):
        cells = [(c["load"](), textwrap.wrap(c["instruction"], 40)[:3])]
        for lab, e in editing.items():
            r = e["records"][i]
            cells.append((edits[lab][i], [lab, f"SC {fmt(r['SC'])} PQ {fmt(r['PQ'])} O {fmt(r['O'])}"]
                          + ([f"truth {verdict_str(r['gt'], c['principles'])} u={r['utility']:g}"] if "gt" in r else [])))
        rows.append(cells)
    return grid(rows)


def rrm_tables(b: str, bench: dict, res: dict, args: Args, counters: dict, mini: bool) -> list:
    """The accuracy table of one benchmark (beside the paper's numbers) and its per-group table."""
    erb = b == "editreward_bench"
    paper = PAPER["editreward_bench" if erb else "pairs"]
    head = (["model", "mean over task types %" if erb else "accuracy %", "all rows %" if erb else "mean over categories %",
             "weighted-Phi acc. %", "deductions-Phi acc. %", "capped-Phi acc. %", "ties %", "unparsed pairs %",
             "parse rate %", "mean score"]
            + (["verification acc. F / K / Q %"] if mini else []) + ["paper %"])
    rows = [[lab] + [fmt(m.get(k), True) for k in (("task_mean", "accuracy") if erb else ("accuracy", "task_mean"))
                     + ("accuracy_weighted", "accuracy_deductions", "accuracy_capped", "ties", "unparsed_pairs",
                        "parse_rate")] + [fmt(m["mean_score"])]
            + ([" / ".join(fmt(m.get("verification_accuracy", {}).get(c), True) for c in C.CATEGORIES)] if mini else [])
            + [paper.get(lab, "-")] for lab, m in res.items()]
    fails = counters.get("decompose/parse_error", 0) + counters.get("decompose/backend_error", 0)
    out = [(f"RRM accuracy: {bench['title']}", head, rows,
            f"{len(bench['pairs'])} pairs. A pair counts only if the preferred edit scores strictly higher; ties and "
            "unparseable scores are wrong. Paper: Qwen2.5-VL-7B on real data (compare directions, not levels)."
            + (f" Headline rows: dimension '{args.erb_dimension}'. Failed decompositions: {fails}." if erb else ""))]
    groups = sorted({g for m in res.values() for g in m["by_group"]})
    if len(groups) > 1:
        out.append((f"Accuracy % by {'task type' if erb else 'category'}: {bench['title']}", ["model"] + groups + ["mean"],
                    [[lab] + [fmt(m["by_group"].get(g), True) for g in groups] + [fmt(m["task_mean"], True)]
                     for lab, m in res.items()], "Unweighted mean over the groups in the last column."))
    return out


def editor_tables(editing: dict, source_name: str, judge: str) -> list:
    mini = any("truth" in e for e in editing.values())
    rows = [[lab, fmt(e["SC"]), fmt(e["PQ"]), fmt(e["O"]), f"{e['missing']['SC']} / {e['missing']['PQ']}"]
            + ([fmt(e["truth"].get(f"pass_{c}"), True) for c in C.CATEGORIES] + [fmt(e["truth"]["utility"])] if mini else [])
            + [PAPER["gedit"]["rl"] if e["rl"] else PAPER["gedit"]["base"] if e["lora"] is None else "-"]
            for lab, e in editing.items()]
    cats = sorted({c for e in editing.values() for c in e["by_category"]})
    return [(f"Editing: {source_name}", ["editor", "SC", "PQ", "O", "judge missing SC / PQ"]
             + (["true pass follow %", "keep %", "quality %", "true utility"] if mini else []) + ["paper SC / PQ / O"], rows,
             f"Judge {judge}: SC = min(success, over-editing), PQ = min(naturalness, artefacts), O = sqrt(SC x PQ) per "
             "sample; means per category, then the unweighted mean over categories. Missing judge answers are counted, "
             "never replaced."),
            ("Editing O by category", ["editor"] + cats + ["mean"],
             [[lab] + [fmt(e["by_category"].get(c, {}).get("O")) for c in cats] + [fmt(e["O"])] for lab, e in editing.items()],
             "Unweighted mean over categories in the last column.")]


def render(tables: list, images: list, curves: dict, notes: list, header: str) -> tuple[str, str]:
    """tables: (title, head, rows, note) -> (HTML page, Markdown)."""
    h = ["<!doctype html><meta charset='utf-8'><title>edit-r1 evaluation</title><style>"
         "body{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}"
         "table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ddd;padding:3px 8px;"
         "text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}"
         ".note{color:#555;font-size:90%}.curves svg{margin:4px}</style>",
         f"<h1>edit-r1 evaluation</h1><p class='note'>{html.escape(header)}</p>"]
    md = ["# edit-r1 evaluation", "", header, ""]
    if notes:
        h.append("<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
        md += [f"- {n}" for n in notes] + [""]
    for title, head, rows, note in tables:
        bar = lambda c, col: (f" style='background:linear-gradient(90deg,#dbeafe {float(c):.0f}%,#fff 0)'"
                              if head[col].endswith("%") and c.replace(".", "", 1).isdigit() else "")  # a % cell as a bar
        h.append(f"<h2>{html.escape(title)}</h2><table><tr>" + "".join(f"<th>{html.escape(x)}</th>" for x in head) + "</tr>"
                 + "".join("<tr>" + "".join(f"<td{bar(str(c), j)}>{html.escape(str(c))}</td>" for j, c in enumerate(r))
                           + "</tr>" for r in rows) + f"</table><p class='note'>{html.escape(note)}</p>")
        md += [f"## {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        md += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows] + ["", note, ""]
    for title, img in images:
        h.append(f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' src='data:image/png;base64,{png_b64(img)}'>")
    for stage, tags in curves.items():
        h.append(f"<h2>Training curves: {html.escape(stage)}</h2><div class='curves'>"
                 + "".join(svg_curve(t, pts) for t, pts in sorted(tags.items())[:24]) + "</div>")
    return "\n".join(h), "\n".join(md)


# =========================================================================================
def headline(run_dir: str, results: dict, editing: dict) -> str:
    """The pipeline's three claims in one Markdown table (issue: the reproduction table):
    RRM held-out pairwise accuracy (Think-only < Think+Verify < GCPO), the mean training
    reward each RRM gave the editor in Flow-GRPO (the stricter judge gives less), and the
    editors' ground-truth utility (mini world) on held-out contexts."""
    rows = ["| quantity | " + " | ".join(("think_only", "think_verify", "gcpo")) + " | paper |",
            "|---|---|---|---|---|"]
    acc = results.get("pairs", {})
    rows.append("| RRM pairwise accuracy (held-out pairs) | " + " | ".join(
        fmt(acc[k]["accuracy"], pct=True) if k in acc else "-" for k in ("think_only", "think_verify", "gcpo"))
        + " | 68.9 / 75.4 / 82.2 |")
    reward = {}
    for lab, name in (("think_verify", "flow_grpo_sft"), ("gcpo", "flow_grpo_gcpo")):
        path = os.path.join(run_dir, name, "summary.json")
        if os.path.exists(path):
            train = json.load(open(path)).get("history", {}).get("train", [])
            reward[lab] = sum(t["train/reward"] for t in train) / len(train) if train else None
    rows.append("| mean Flow-GRPO training reward given by the RRM | - | " + " | ".join(
        fmt(reward.get(k)) for k in ("think_verify", "gcpo")) + " | GCPO-RRM lower (stricter) |")
    util = {("base" if not e["lora"] else "gcpo" if "gcpo" in e["lora"] else "think_verify"): e["truth"]["utility"]
            for e in editing.values() if "truth" in e}
    if util:
        rows.append(f"| editor ground-truth utility (base {fmt(util.get('base'))}) | - | "
                    + " | ".join(fmt(util.get(k)) for k in ("think_verify", "gcpo"))
                    + " | GEdit O 5.77 -> 6.20 / 6.24 |")
    return "\n".join(rows) + "\n"


def main(args: Args) -> dict:
    t0 = time.time()
    out_dir = args.out_dir or os.path.join(args.run_dir, "eval")
    os.makedirs(out_dir, exist_ok=True)
    if args.k_samples > 1 and args.temperature <= 0:
        raise SystemExit("--k_samples > 1 needs --temperature > 0 (greedy samples are identical)")
    if args.erb_dimension not in ("prompt_following", "consistency", "overall", "all"):
        raise SystemExit("--erb_dimension must be prompt_following, consistency, overall or all")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if not args.max_sequence_length:  # mini instructions are <= 19 T5 tokens (flow_grpo.py uses 24)
        args.max_sequence_length = 24 if args.world == "mini" and not args.gedit_bench else 512
    world = None
    if args.world == "mini":
        from miniworld import world
    counters, notes = {}, []
    cache = tempfile.TemporaryDirectory()  # datasets' cache for the local benchmark copies

    # 1. inputs: the pair benchmarks (principles from the decomposer where rows have none)
    benches = {}
    if args.pairs_split:
        path = os.path.join(args.run_dir, "data", f"pairs_{args.pairs_split}.jsonl")
        if os.path.exists(path):
            benches["pairs"] = {"title": f"held-out human pairs ({path})", **jsonl_pairs(path, "", args)}
        else:
            notes.append(f"{path} not found: run build_data.py first (held-out pairs skipped).")
    if args.pairs_file:
        benches["human_pairs"] = {"title": f"human pairs ({args.pairs_file})", **jsonl_pairs(args.pairs_file, args.image_root, args)}
    if args.editreward_bench:
        benches["editreward_bench"] = {"title": f"EditReward-Bench ({args.editreward_bench})",
                                       "dimension": None if args.erb_dimension == "all" else args.erb_dimension,
                                       **editreward_pairs(args.editreward_bench, args, cache.name)}
    if "editreward_bench" in benches and benches["editreward_bench"]["dimension"] not in \
            {p["dimension"] for p in benches["editreward_bench"]["pairs"]}:
        notes.append(f"EditReward-Bench has no '{args.erb_dimension}' rows: its headline uses all rows.")
    if failed := decompose([r for b in benches.values() for r in b["reqs"].values()], args, counters):
        notes.append(f"{failed} decomposition(s) by {args.decomposer} failed: those edits have no principles, so an RRM "
                     "cannot score them and their pairs count as wrong (see counters).")
    if world is not None and "pairs" in benches:  # the mini world's exact answers, once per request
        for r in (r for r in benches["pairs"]["reqs"].values() if r["principles"]):
            src, ed = r["load"]()
            r.update(truth(world, src, r["instruction"], r["principles"], ed))

    # 2. RRM accuracy of every checkpoint, 3. the scalar baseline, on every benchmark
    if args.rrms == "auto":
        rrms = [("base", args.base_rrm)] + [(lab, os.path.join(args.run_dir, d)) for lab, d in AUTO_RRMS]
        for lab, path in list(rrms):
            if not os.path.exists(os.path.join(path, "config.json")):
                notes.append(f"RRM '{lab}' ({path}) not found: skipped.")
                rrms.remove((lab, path))
    else:
        rrms = [tuple(x.split("=", 1)) if "=" in x else (os.path.basename(x.rstrip("/")), x)
                for x in filter(None, args.rrms.split(","))]
    scorers = [(lab, spec, False) for lab, spec in rrms] + ([("scalar", args.scalar_scorer, True)] if args.scalar_scorer else [])
    results, shown = {b: {} for b in benches}, {b: {} for b in benches}
    for label, spec, scalar in scorers if benches else []:
        tic = time.time()
        score = make_scorer(spec, args, device, counters, scalar)
        for b, bench in benches.items():
            samples = score_requests(score, bench["reqs"], args.batch_size, needs_principles=not scalar)
            m = results[b][label] = {"spec": spec, "kind": "scalar" if scalar else "rrm", **rrm_metrics(bench, samples, scalar)}
            shown[b][label] = {k: samples[k][0] if samples[k] else None for p in bench["pairs"][:args.grid_rows] for k in (p["w"], p["l"])}
            print(f"[{label}] {b}: accuracy {m['accuracy']:.3f} (task mean {m['task_mean']:.3f}"
                  + (f", weighted Phi {m['accuracy_weighted']:.3f}, deductions Phi {m['accuracy_deductions']:.3f}, "
                     f"capped Phi {m['accuracy_capped']:.3f}"
                     if not scalar else "")
                  + f")  parse {m['parse_rate']:.2f}  ties {m['ties']:.2f}  unparsed pairs {m['unparsed_pairs']:.2f}  ({m['pairs']} pairs)")
        del score
        print(f"[{label}] {time.time() - tic:.1f}s")
        if not scalar and any(results[b][label]["parse_rate"] < 0.5 for b in benches):
            notes.append(f"RRM '{label}' gave a parseable score in only {min(results[b][label]['parse_rate'] for b in benches):.0%} "
                         "of its answers: an unparsed pair counts as wrong, so its accuracy measures its output format, not "
                         "its judgement (expected of a base that never saw the verification format; an SFT checkpoint this "
                         "low is undertrained).")

    # 4. editors: edit, judge (SC, PQ, O), ground truth in the mini world
    editing = {}
    editors = find_editors(args, notes)
    contexts, source_name = edit_contexts(args, cache.name) if editors else ([], "")
    judge = C.make_backend(args.judge, counters=counters, seed=args.seed) if editors else None
    grid_edits, pipes = {}, {}
    for ed in editors:
        if ed["base"] not in pipes:
            try:
                pipes[ed["base"]] = C.load_edit_pipeline(ed["base"], dtype=torch.bfloat16 if args.bf16 else None).to(device)
                pipes[ed["base"]].set_progress_bar_config(disable=True)
            except (OSError, ValueError) as e:
                notes.append(f"editor {ed['base']} could not be loaded ({type(e).__name__}: {str(e)[:120]}): skipped.")
                pipes[ed["base"]] = None
        pipe = pipes[ed["base"]]
        if pipe is None or not contexts:
            continue
        tic = time.time()
        if ed["lora"]:
            pipe.load_lora_weights(ed["lora"])
        recs, grid_edits[ed["label"]] = evaluate_editor(pipe, ed["label"], contexts, judge, args, out_dir, world)
        if ed["lora"]:
            pipe.unload_lora_weights()  # the next editor starts from the plain base again
        e = editing[ed["label"]] = {"base": ed["base"], "lora": ed["lora"], "rl": ed["rl"], **gedit_summary(recs), "records": recs}
        if recs and "gt" in recs[0]:
            e["truth"] = truth_summary(recs, {c["id"]: c for c in contexts})
        print(f"[editor {ed['label']}] SC {fmt(e['SC'])} PQ {fmt(e['PQ'])} O {fmt(e['O'])} (judge missing {e['missing']})"
              + (f"  true utility {e['truth']['utility']:.2f} (se {e['truth']['utility_se']:.2f}, "
                 f"{len(contexts)} contexts x {args.edit_seeds} draws)" if "truth" in e else "") + f"  ({time.time() - tic:.1f}s)")

    # 5. report: tables (HTML and Markdown from the same rows), grids, curves, JSON
    tables, images = [], []
    for b, bench in benches.items():
        if results[b]:
            tables += rrm_tables(b, bench, results[b], args, counters, world is not None and b == "pairs")
            images.append((f"Pairs of {bench['title']}: each model's first verdict (F/K/Q points) and score",
                           pair_grid(bench, shown[b], args.grid_rows)))
            images[-1][1].save(os.path.join(out_dir, f"grid_{b}.png"))
    if editing:
        tables += editor_tables(editing, source_name, args.judge)
        images.append(("Edits: source | each editor, with judge scores and ground-truth verdicts",
                       editor_grid(contexts, editing, grid_edits, args.grid_rows)))
        images[-1][1].save(os.path.join(out_dir, "grid_editors.png"))
    curves = read_curves(args.run_dir, out_dir)
    minutes = (time.time() - t0) / 60
    header = (f"run {args.run_dir}, {time.strftime('%Y-%m-%d %H:%M')}, {minutes:.1f} min; K = {args.k_samples} sample(s) at "
              f"temperature {args.temperature}, prompt '{args.variant}'.")
    if world is not None:
        notes.append("Mini world: a synthetic world with exact ground truth and tiny models; the paper's numbers are 7B models "
                     "on real benchmarks and are shown for direction, not level.")
    page, md = render(tables, images, curves, notes, header)
    summary = {"minutes": round(minutes, 2), "args": asdict(args), "notes": notes, "counters": counters,
               "rrm": {b: {lab: {k: v for k, v in m.items() if k != "scores"} for lab, m in r.items()} for b, r in results.items()},
               "editing": {"source": source_name, "editors": {lab: {k: v for k, v in e.items() if k != "records"}
                                                             for lab, e in editing.items()}},
               "curves": {s: sorted(t) for s, t in curves.items()}, "paper": PAPER}
    for b, r in results.items():  # per-pair scores, to rerun any statistic
        with open(os.path.join(out_dir, f"scores_{b}.jsonl"), "w") as f:
            for p in benches[b]["pairs"]:
                f.write(json.dumps({**{k: p[k] for k in ("id", "group", "dimension")},
                                    **{lab: [m["scores"][p["w"]], m["scores"][p["l"]]] for lab, m in r.items()}}) + "\n")
    if editing:
        with open(os.path.join(out_dir, "editing_samples.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for e in editing.values() for r in e["records"])
    for name, text in (("report.html", page), ("report.md", md)):
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            f.write(text)
    cache.cleanup()
    head = headline(args.run_dir, results, editing)
    with open(os.path.join(out_dir, "headline.md"), "w", encoding="utf-8") as f:
        f.write(head)
    # last, atomically: its presence means the evaluation finished (scripts/mini_pipeline.sh skips it)
    C.write_json_atomic(os.path.join(out_dir, "summary.json"), summary)
    print(head + f"report: {os.path.join(out_dir, 'report.html')} ({minutes:.1f} min)")
    return summary


if __name__ == "__main__":
    main(HfArgumentParser(Args).parse_args_into_dataclasses()[0])
