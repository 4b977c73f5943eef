"""scripts/judge_group_agreement.py -- does an RRM rank the edits *of one group* like the truth? (#7)

Flow-GRPO learns only from differences inside a group: G edits of one context, advantages
standardised per group. So what matters is not how well the RRM ranks human pairs (edits of
different editors, often far apart) but how well its reward orders the policy's own, similar
edits. flow_grpo.py logs that as train/adv_gt_corr (session 10: oracle 0.95, RRMs 0.49-0.61).
This script takes that number apart. For N `val` contexts it makes G edits each with the
policy (ODE, each from its own starting noise: rollouts' spread without the SDE part), asks
each RRM for its verdicts (greedy, common.rrm_score), and prints per RRM:

  agreement   pooled correlation of the group-standardised reward with the group-standardised
              true utility (edits of groups where both vary), for the reward rules
              holistic / deductions / capped (common.aggregate_score), each also with the
              follow gate (0 when the judge's own points fail every Follow), and deductions /
              weighted with the judge's no-op call (noop_call: 0 when its reasoning says
              nothing changed), and those two again on the verdicts its reasoning lines state
              instead of its <points> (aggregate_score verdicts="reasoning"), beside two
              references: deductions on the TRUE verdicts (perfect eyes, but blind to the
              no-op rule, the human's 0 for an edit that changed nothing), and the same with
              the gate;
  flat groups groups whose reward is constant (no signal) although their truth varies;
  no-ops      the error split in two: the judge's own verdicts priced by the world with the
              true no-op rule, and the true verdicts with the judge's own no-op call ("nothing
              changed" in its reasoning); how often it makes that call on no-ops and on real
              edits, and its score on no-ops;
  contested   principles whose true verdict differs between edits of one group -- the only
              ones that carry within-group signal -- and how often the RRM's verdict on them
              is right, per category and failure reason (judge_blind_spots.failure_reason),
              beside its accuracy on uncontested ones.

    python scripts/judge_group_agreement.py RUN RRM [RRM ...]
      env: N_CONTEXTS (40), G (16), POLICY (the committed Kontext), LORA (a Flow-GRPO folder), STEPS (10),
           K (1: one greedy answer per edit, as flow_grpo.py scores; K > 1: the reward is the mean of
           K answers sampled at TEMP, default 0.7; the verdict breakdown reads the first),
           COSTS (follow:F,keep:K,quality:Q as flow_grpo.py --costs: adds deductions_noop_call_costs)

  prices      what each kind of true failure costs in the reward, inside a group: the within-group
              least-squares fit of the reward (deductions + its no-op call) on the edits' true
              failure counts (Follow; Keep split by reason: recolour, missing, shape, no_others,
              other; Quality) and the no-op indicator, beside the same fit of the true utility.
              The group-normalised update sees only ratios: a kind the judge prices low against
              the truth's ratio is where a policy paid by it can go (session 21).
"""
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402
from judge_blind_spots import failure_reason  # noqa: E402
from miniworld import sim, world as W  # noqa: E402


def standardised_corr(rewards: np.ndarray, truth: np.ndarray) -> tuple[float, int, int]:
    """(pooled corr of per-group z-scores, groups used, groups with a constant reward among
    those whose truth varies). rewards, truth: (groups, G); NaN = no reward for that edit."""
    zr, zt, flat, used = [], [], 0, 0
    for r, t in zip(rewards, truth):
        ok = ~np.isnan(r)
        if ok.sum() < 2 or t[ok].std() == 0:
            continue
        if r[ok].std() == 0:
            flat += 1
            continue
        used += 1
        zr.append((r[ok] - r[ok].mean()) / r[ok].std())
        zt.append((t[ok] - t[ok].mean()) / t[ok].std())
    if not zr:
        return float("nan"), 0, flat
    return float(np.corrcoef(np.concatenate(zr), np.concatenate(zt))[0, 1]), used, flat


KINDS = ("follow", "keep colour", "keep missing", "keep shape", "keep no_others", "keep other", "quality", "no-op")


def failure_kinds(r: dict, verdicts: list, edited_scene, noop: bool) -> list[float]:
    """Counts of the edit's true failures by KINDS (the last: 1 for a no-op)."""
    out = dict.fromkeys(KINDS, 0.0)
    for p, v in zip(r["principles"], verdicts):
        if v:
            continue
        kind, f = W.parse_question(p["question"])
        if p["category"] != "keep":
            out[p["category"]] += 1
            continue
        why = failure_reason(kind, f, edited_scene)  # no_others has no cell: its kind comes back
        out["keep " + (why if why in ("colour", "missing", "shape", "no_others") else "other")] += 1
    out["no-op"] = float(noop)
    return list(out.values())


def implied_prices(reward: np.ndarray, feats: np.ndarray) -> np.ndarray:
    """Least-squares coefficients of the group-centred reward on the group-centred features.
    reward: (groups, G), NaN = unscored; feats: (groups, G, len(KINDS)). A kind that never
    varies inside a group gets NaN."""
    ok = ~np.isnan(reward)
    y, X = [], []
    for r, f, m in zip(reward, feats, ok):
        if m.sum() < 2:
            continue
        y.append(r[m] - r[m].mean())
        X.append(f[m] - f[m].mean(0))
    y, X = np.concatenate(y), np.concatenate(X)
    live = np.abs(X).sum(0) > 0
    coef = np.full(X.shape[1], np.nan)
    coef[live] = np.linalg.lstsq(X[:, live], y, rcond=None)[0]
    return coef


def main(run: str, rrms: list) -> dict:
    torch.manual_seed(0)
    n, G, steps = int(os.environ.get("N_CONTEXTS", 40)), int(os.environ.get("G", 16)), int(os.environ.get("STEPS", 10))
    rows = [r for r in C.read_jsonl(os.path.join(run, "data", "contexts.jsonl"))
            if r["split"] == "val" and r["principles"]][:n]
    srcs = [C.load_image(r["source"], r["id"]) for r in rows]

    # 1. G edits per context from the policy, each from its own starting noise
    pipe = C.load_edit_pipeline(os.environ.get("POLICY", "miniworld/checkpoints/kontext"))
    pipe.set_progress_bar_config(disable=True)
    if os.environ.get("LORA"):
        pipe.load_lora_weights(os.environ["LORA"])
    edits = [[None] * G for _ in rows]
    for k in range(G):
        for s in range(0, len(rows), 20):
            ims = C.pipeline_edit(pipe, srcs[s:s + 20], [r["instruction"] for r in rows[s:s + 20]],
                                  seed=[1000 * k + i for i in range(s, s + len(srcs[s:s + 20]))],
                                  steps=steps, max_sequence_length=24)
            for i, im in enumerate(ims):
                edits[s + i][k] = im
    del pipe

    # 2. the truth of every edit: verdicts, utility, and which principles are contested in a group
    gt = [[W.ground_truth(s, r["instruction"], r["principles"], e) for e in es] for r, s, es in zip(rows, srcs, edits)]
    util = np.array([[W.utility(s, r["instruction"], r["principles"], e) for e in es] for r, s, es in zip(rows, srcs, edits)])
    true_ded = np.array([[C.aggregate_score({"status": "ok", "score": 0.0, "points": v}, r["principles"], "deductions")
                          for v in vs] for r, vs in zip(rows, gt)])
    noop = np.array([[W.perceive(e) == W.perceive(s) for e in es] for s, es in zip(srcs, edits)])
    contested = [[len({v[j] for v in vs}) > 1 for j in range(len(r["principles"]))] for r, vs in zip(rows, gt)]
    n_cont = sum(map(sum, contested))
    print(f"{len(rows)} contexts x {G} edits: true utility {util.mean():.2f}, within-group std "
          f"{util.std(1).mean():.2f}; groups with a constant truth {int((util.std(1) == 0).sum())}; "
          f"contested principles {n_cont} of {sum(len(c) for c in contested)}; no-ops {int(noop.sum())} "
          f"(in {int(noop.any(1).sum())} groups)")
    ref, _, _ = standardised_corr(true_ded, util)
    true_gate = np.array([[C.fails_every_follow(v, r["principles"]) for v in vs] for r, vs in zip(rows, gt)])
    ref_gate, _, _ = standardised_corr(np.where(true_gate, 0.0, true_ded), util)
    print(f"  reference: deductions on the true verdicts (no no-op rule) agreement {ref:.3f}; "
          f"with the Follow gate (0 if every Follow fails) {ref_gate:.3f}; the gate fires on "
          f"{true_gate[noop].mean():.2f} of no-ops, {true_gate[~noop].mean():.3f} of real edits "
          f"(their true utility {util[true_gate & ~noop].mean() if (true_gate & ~noop).any() else float('nan'):.2f})")
    feats = np.array([[failure_kinds(r, v, W.perceive(e), bool(nf)) for v, e, nf in zip(vs, es, nfs)]
                      for r, vs, es, nfs in zip(rows, gt, edits, noop)])
    n_kind = feats.reshape(-1, len(KINDS)).sum(0)
    true_prices = implied_prices(util, feats)
    print("  prices (within-group fit of the reward on true failure counts), the truth: " + ", ".join(
        f"{k} {c:+.2f} (n {int(m)})" for k, c, m in zip(KINDS, true_prices, n_kind)))
    report = {"util_mean": float(util.mean()), "util_group_std": float(util.std(1).mean()),
              "true_prices": dict(zip(KINDS, true_prices.tolist())),
              "contested": n_cont, "true_deductions_agreement": ref,
              "true_deductions_follow_gate_agreement": ref_gate, "rrms": {}}

    # 3. each RRM: rewards under each rule, and its verdicts on contested vs uncontested principles
    flat = [(r, s, e) for r, s, es in zip(rows, srcs, edits) for e in es]
    for rrm in rrms:
        model, processor = C.load_rrm(rrm)
        model.eval()
        K = int(os.environ.get("K", 1))
        outs = C.rrm_score(model, processor, [(s, e, r["instruction"]) for r, s, e in flat],
                           [r["principles"] for r, _, _ in flat], n=K, batch_size=64,
                           temperature=0.0 if K == 1 else float(os.environ.get("TEMP", 0.7)))
        if K == 1:  # soft verdicts: its P(yes) at each <points> digit of its (greedy) answer
            soft = C.verdict_probabilities(model, processor, [(s, e, r["instruction"]) for r, s, e in flat],
                                           [r["principles"] for r, _, _ in flat], [o[0]["text"] for o in outs])
            outs = [[dict(o[0], soft_points=q)] for o, q in zip(outs, soft)]
        rep = {}
        rules = [(m, g, False, None, "points") for g in (False, True) for m in ("holistic", "deductions", "capped")] + \
            [(m, False, True, None, v) for m in ("deductions", "weighted") for v in ("points", "reasoning")
             + (("probs",) if K == 1 else ())]
        if os.environ.get("COSTS"):  # flow_grpo.py --costs: deductions + the call at other failure prices
            rules.append(("deductions", False, True, C.parse_costs(os.environ["COSTS"]), "points"))
        for mode, gate, call, costs, src in rules:
            per = [[x for x in (C.aggregate_score(a, r["principles"], mode, costs=costs, follow_gate=gate,
                                                  noop_call=call, verdicts=src) for a in o)
                    if x is not None] for (r, _, _), o in zip(flat, outs)]
            rew = np.array([np.mean(v) if v else np.nan for v in per]).reshape(len(rows), G)
            corr, used, nflat = standardised_corr(rew, util)
            # gated: 0 when its own points fail every Follow; noop_call: 0 when its reasoning says nothing changed
            name = mode + ("_follow_gate" if gate else "") + ("_noop_call" if call else "") + ("_costs" if costs else "") \
                + ("" if src == "points" else "_" + src)
            rep[name] = {"agreement": corr, "groups": used, "flat_groups": nflat,
                         "mean": float(np.nanmean(rew)), "unscored": int(np.isnan(rew).sum())}
            if call and mode == "deductions" and src == "points":
                pr = implied_prices(rew, feats)
                rep[name]["prices"] = dict(zip(KINDS, pr.tolist()))
                print(f"     prices of {name}: " + ", ".join(f"{k} {c:+.2f}" for k, c in zip(KINDS, pr)))
            print(f"  {os.path.basename(rrm.rstrip('/')):14s} {name:22s} agreement {corr:.3f} over {used} groups; "
                  f"constant reward in {nflat} groups whose truth varies; mean {np.nanmean(rew):.2f}; "
                  f"unscored {int(np.isnan(rew).sum())}")
        right = {}
        for gi, (r, s, es) in enumerate(zip(rows, srcs, edits)):
            for k, e in enumerate(es):
                pts = outs[gi * G + k][0].get("points")
                if pts is None or len(pts) != len(r["principles"]):
                    continue
                seen = W.perceive(e)
                for j, p in enumerate(r["principles"]):
                    g = gt[gi][k][j]
                    why = "pass" if g else failure_reason(*W.parse_question(p["question"]), seen)
                    key = ("contested " if contested[gi][j] else "uncontested ") + f"{p['category']} {why}"
                    cell = right.setdefault(key, [0, 0])
                    cell[0] += 1
                    cell[1] += int(pts[j] == g)
        # 4. split the RRM's error: its verdicts (with the true no-op rule) vs its no-op call
        # (the pool and the SFT targets write "nothing changed." -- with sim.CHANGE_LINE "changed: nothing." -- and score 0)
        pts_ok = [o[0].get("points") is not None and len(o[0]["points"]) == len(r["principles"])
                  for (r, _, _), o in zip(flat, outs)]
        said_noop = np.array([sim.says_noop(o[0].get("text", "")) for o in outs]).reshape(len(rows), G)
        judge_eyes = np.array([W.utility_from_verdicts(o[0]["points"], r["principles"], bool(nf)) if ok else np.nan
                               for (r, _, _), o, ok, nf in zip(flat, outs, pts_ok, noop.ravel())]).reshape(len(rows), G)
        true_eyes = np.array([W.utility_from_verdicts(v, r["principles"], bool(sn))
                              for r, vs, sns in zip(rows, gt, said_noop) for v, sn in zip(vs, sns)]).reshape(len(rows), G)
        rep["its_verdicts_true_noop"], _, _ = standardised_corr(judge_eyes, util)
        rep["true_verdicts_its_noop"], _, _ = standardised_corr(true_eyes, util)
        hol = np.array([np.nan if o[0]["score"] is None else o[0]["score"] for o in outs]).reshape(len(rows), G)
        rep["noop_call"] = {"said_on_noops": float(said_noop[noop].mean()) if noop.any() else float("nan"),
                            "said_on_others": float(said_noop[~noop].mean()),
                            "score_on_noops": float(np.nanmean(hol[noop])) if noop.any() else float("nan"),
                            "utility_of_false_calls": float(util[said_noop & ~noop].mean()) if (said_noop & ~noop).any() else float("nan"),
                            "utility_of_other_edits": float(util[~said_noop & ~noop].mean())}
        # 4b. the follow gate (aggregate_score's follow_gate): how often it fires, on no-ops and on real edits
        gate = np.array([bool(ok) and C.fails_every_follow(o[0]["points"], r["principles"])
                         for (r, _, _), o, ok in zip(flat, outs, pts_ok)]).reshape(len(rows), G)
        rep["gate_on_noops"] = float(gate[noop].mean()) if noop.any() else float("nan")
        rep["gate_on_others"] = float(gate[~noop].mean())
        print(f"     gate fires on {rep['gate_on_noops']:.2f} of no-ops, {rep['gate_on_others']:.3f} of real edits")
        print(f"     its verdicts + the true no-op rule: agreement {rep['its_verdicts_true_noop']:.3f}; "
              f"true verdicts + its no-op call: {rep['true_verdicts_its_noop']:.3f}")
        print(f"     says 'nothing changed' on {rep['noop_call']['said_on_noops']:.2f} of no-ops, "
              f"{rep['noop_call']['said_on_others']:.3f} of other edits; its score on no-ops "
              f"{rep['noop_call']['score_on_noops']:.2f}; true utility of the edits it wrongly calls no-ops "
              f"{rep['noop_call']['utility_of_false_calls']:.2f} (of the other real edits "
              f"{rep['noop_call']['utility_of_other_edits']:.2f})")
        rep["verdicts_right"] = {k: (v[0], v[1] / v[0]) for k, v in sorted(right.items())}
        for k, (cnt, acc) in rep["verdicts_right"].items():
            print(f"     {k:36s} n={cnt:5d}  verdict right {acc:.2f}")
        report["rrms"][rrm] = rep
    return report


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])
