"""scripts/editor_changes.py -- every editor of an evaluate.py report against the base, paired.

    python scripts/editor_changes.py RUN/EVAL_DIR [RUN/EVAL_DIR ...]

Reads EVAL_DIR/editing_samples.jsonl (evaluate.py with --edit_seeds > 1: every editor edits
each (context, draw) from the same starting noise) and the run's data/contexts.jsonl (the run
folder is EVAL_DIR's parent), and prints per editor: mean true utility, the change over the
base paired per (context, draw) with its standard error over contexts
(reproduction_table.paired_change), the truth's Follow and Keep pass rates, and the share of
no-ops (the perceived edit equals the perceived source: the world's human gives it 0), and,
where RUN/<editor>/summary.json exists, the mean within-group agreement of its training
reward with the truth (flow_grpo.py's train/adv_gt_corr).
"""
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402
from miniworld import world as W  # noqa: E402
from reproduction_table import paired_change  # noqa: E402


def train_agreement(summary_path: str) -> float | None:
    """Mean over steps of flow_grpo.py's train/adv_gt_corr (how well the reward's advantages
    ordered each group like the truth) from a Flow-GRPO folder's summary.json; None without one."""
    if not os.path.exists(summary_path):
        return None
    vals = [h["train/adv_gt_corr"] for h in json.load(open(summary_path))["history"]["train"] if "train/adv_gt_corr" in h]
    return float(np.mean(vals)) if vals else None


def editor_rows(eval_dir: str) -> list[dict]:
    run = os.path.dirname(os.path.normpath(eval_dir))
    contexts = {r["id"]: r for r in C.read_jsonl(os.path.join(run, "data", "contexts.jsonl"))}
    recs = [json.loads(line) for line in open(os.path.join(eval_dir, "editing_samples.jsonl"))]
    sources = {}
    rows = []
    for ed in dict.fromkeys(r["editor"] for r in recs):  # editors in the report's order, base first
        mine = [r for r in recs if r["editor"] == ed and r.get("utility") is not None]
        passes = {c: [g for r in mine for g, p in zip(r["gt"], contexts[r["id"]]["principles"]) if p["category"] == c]
                  for c in ("follow", "keep")}
        noops = []
        for r in mine:
            if r["id"] not in sources:
                sources[r["id"]] = W.perceive(C.load_image(contexts[r["id"]]["source"], r["id"]))
            noops.append(W.perceive(C.load_image(r["image"], r["id"])) == sources[r["id"]])
        delta, se = paired_change(recs, ed) if ed != "base" else (None, None)
        rows.append({"editor": ed, "edits": len(mine), "utility": float(np.mean([r["utility"] for r in mine])),
                     "delta": delta, "delta_se": se, "follow": float(np.mean(passes["follow"])),
                     "keep": float(np.mean(passes["keep"])), "noop": float(np.mean(noops)),
                     "agreement": train_agreement(os.path.join(run, ed, "summary.json"))})
    return rows


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    print("| eval | editor | edits | true utility | change over base (paired) | Follow pass | Keep pass | no-ops "
          "| agreement in training |")
    print("|---|---|---|---|---|---|---|---|---|")
    for d in sys.argv[1:]:
        for r in editor_rows(d):
            ch = "-" if r["delta"] is None else f"{r['delta']:+.2f} ± {r['delta_se']:.2f}"
            ag = "-" if r["agreement"] is None else f"{r['agreement']:.3f}"
            print(f"| {d} | {r['editor']} | {r['edits']} | {r['utility']:.2f} | {ch} | {r['follow']:.3f} | "
                  f"{r['keep']:.3f} | {r['noop']:.3f} | {ag} |")
