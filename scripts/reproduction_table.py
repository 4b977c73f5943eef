"""scripts/reproduction_table.py -- the README's reproduction table from finished mini runs.

    for s in 0 1 2; do scripts/mini_pipeline.sh runs/mini_seed$s $s; done      # ~22 min each on 2 cores
    python scripts/reproduction_table.py runs/mini_seed0 runs/mini_seed1 runs/mini_seed2

Reads only files the stages wrote (eval/summary.json, eval/editing_samples.jsonl,
flow_grpo_*/summary.json) and prints, per quantity, the mean and the standard deviation over
the runs (n - 1), each run's value, and the paper's number beside it (Markdown).
"""
import json
import os
import sys

import numpy as np

CATEGORIES = ("color_alter", "subject-add", "subject-remove", "subject-replace", "background_change", "motion_change")


def run_values(run: str) -> dict:
    ev = json.load(open(os.path.join(run, "eval", "summary.json")))
    out = {}
    for lab in ("think_only", "think_verify", "gcpo"):  # 1. RRM held-out pairwise accuracy (ties wrong)
        m = ev["rrm"].get("pairs", {}).get(lab)
        out[f"acc_{lab}"] = 100 * m["accuracy"] if m else None
        out[f"ties_{lab}"] = m["ties"] if m else None
    for lab, name in (("sft", "flow_grpo_sft"), ("gcpo", "flow_grpo_gcpo")):  # 2. reward the RRM gave in training
        path = os.path.join(run, name, "summary.json")
        train = json.load(open(path))["history"]["train"] if os.path.exists(path) else []
        out[f"reward_{lab}"] = float(np.mean([t["train/reward"] for t in train])) if train else None
    recs = [json.loads(line) for line in open(os.path.join(run, "eval", "editing_samples.jsonl"))]
    for ed in ("base", "flow_grpo_sft", "flow_grpo_gcpo"):  # 3. editors' true utility, overall and per category
        mine = [r for r in recs if r["editor"] == ed and r.get("utility") is not None]
        out[f"util_{ed}"] = float(np.mean([r["utility"] for r in mine])) if mine else None
        for c in CATEGORIES:
            cat = [r["utility"] for r in mine if r["category"] == c]
            out[f"util_{ed}_{c}"] = float(np.mean(cat)) if cat else None
    # 4. the change over the base, paired: every editor edits (context, draw) from the same
    # starting noise, so the difference per context (mean over its draws) cancels the noise
    # the editors share; its standard error over contexts says what one run can resolve.
    out["draws"] = len({r.get("draw", 0) for r in recs})
    for ed in ("flow_grpo_sft", "flow_grpo_gcpo"):
        out[f"delta_{ed}"], out[f"delta_se_{ed}"] = paired_change(recs, ed)
    return out


def paired_change(recs: list[dict], ed: str) -> tuple:
    """(mean, standard error over contexts) of editor ed's utility minus the base's on the
    same (context, draw), averaged per context first; (None, None) without shared edits."""
    base = {(r["id"], r.get("draw", 0)): r["utility"] for r in recs if r["editor"] == "base" and r.get("utility") is not None}
    per = {}
    for r in recs:
        if r["editor"] == ed and (r["id"], r.get("draw", 0)) in base:
            per.setdefault(r["id"], []).append(r["utility"] - base[(r["id"], r.get("draw", 0))])
    d = [float(np.mean(v)) for v in per.values()]
    return (float(np.mean(d)) if d else None,
            float(np.std(d, ddof=1) / np.sqrt(len(d))) if len(d) > 1 else None)


def paired(vals: list, ed: str) -> str:
    """Each run's paired change over the base with its standard error, then the mean."""
    v = [(x[f"delta_{ed}"], x[f"delta_se_{ed}"]) for x in vals if x.get(f"delta_{ed}") is not None]
    if not v:
        return "-"
    each = ", ".join(f"{d:+.2f} ± {se:.2f}" if se is not None else f"{d:+.2f}" for d, se in v)
    return f"{np.mean([d for d, _ in v]):+.2f} ({each})"


def cell(values: list) -> str:
    v = [x for x in values if x is not None]
    if not v:
        return "-"
    spread = f" ± {np.std(v, ddof=1):.2f}" if len(v) > 1 else ""
    return f"{np.mean(v):.2f}{spread} ({', '.join(f'{x:.2f}' for x in v)})"


def main(runs: list) -> str:
    vals = [run_values(r) for r in runs]
    col = lambda k: cell([v[k] for v in vals])  # noqa: E731
    rows = [f"Runs: {', '.join(runs)} -- mean ± std (each run)", "",
            "| quantity | ours (mini world) | paper |", "|---|---|---|",
            f"| RRM pairwise accuracy, Think-only SFT (%) | {col('acc_think_only')} | 68.9 |",
            f"| RRM pairwise accuracy, Think+Verify SFT (%) | {col('acc_think_verify')} | 75.4 |",
            f"| RRM pairwise accuracy, + GCPO (%) | {col('acc_gcpo')} | 82.2 |",
            f"| ties, Think-only / Think+Verify / GCPO | {col('ties_think_only')} / {col('ties_think_verify')} / "
            f"{col('ties_gcpo')} | - |",
            f"| mean Flow-GRPO training reward, SFT-RRM | {col('reward_sft')} | higher |",
            f"| mean Flow-GRPO training reward, GCPO-RRM | {col('reward_gcpo')} | lower (stricter) |",
            f"| editor true utility, base (warm-started) | {col('util_base')} | GEdit O 5.77 |",
            f"| editor true utility, Flow-GRPO with SFT-RRM | {col('util_flow_grpo_sft')} | 6.20 |",
            f"| editor true utility, Flow-GRPO with GCPO-RRM | {col('util_flow_grpo_gcpo')} | 6.24 |",
            f"| change over the base, SFT-RRM (paired; each run ± its se over contexts) | {paired(vals, 'flow_grpo_sft')} | +0.43 |",
            f"| change over the base, GCPO-RRM (paired) | {paired(vals, 'flow_grpo_gcpo')} | +0.47 |",
            f"| edits per test context (starting noises) | {', '.join(str(v['draws']) for v in vals)} | - |", "",
            "| category: true utility | base | Flow-GRPO, SFT-RRM | Flow-GRPO, GCPO-RRM |", "|---|---|---|---|"]
    for c in CATEGORIES:
        rows.append(f"| {c} | " + " | ".join(col(f"util_{ed}_{c}") for ed in ("base", "flow_grpo_sft", "flow_grpo_gcpo"))
                    + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    print(main(sys.argv[1:]))
