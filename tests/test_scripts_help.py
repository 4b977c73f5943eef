"""Every stage script parses its arguments and prints --help (one subprocess for all five)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["build_data.py", "sft_rrm.py", "gcpo.py", "flow_grpo.py", "evaluate.py"]


def test_every_script_has_help():
    code = ("import runpy, sys\n"
            "for s in %r:\n"
            "    sys.argv = [s, '--help']\n"
            "    try:\n"
            "        runpy.run_path(s, run_name='__main__')\n"
            "    except SystemExit as e:\n"
            "        assert e.code in (0, None), (s, e.code)\n" % SCRIPTS)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    for s in SCRIPTS:
        assert f"usage: {s}" in out.stdout


def test_reproduction_table_pairs_editors_by_context_and_draw(tmp_path):
    """scripts/reproduction_table.py: the change over the base is paired by (context, draw) and
    averaged per context before its standard error (hand computation on 2 contexts x 2 draws)."""
    import json
    import math
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import reproduction_table as RT
    os.makedirs(tmp_path / "eval")
    json.dump({"rrm": {"pairs": {}}}, open(tmp_path / "eval" / "summary.json", "w"))
    u = {"base": {("a", 0): 4, ("a", 1): 6, ("b", 0): 2, ("b", 1): 8},
         "flow_grpo_gcpo": {("a", 0): 5, ("a", 1): 9, ("b", 0): 2, ("b", 1): 6}}
    with open(tmp_path / "eval" / "editing_samples.jsonl", "w") as f:
        for ed, by in u.items():
            for (i, k), v in by.items():
                f.write(json.dumps({"editor": ed, "id": i, "draw": k, "category": "subject-add", "utility": v}) + "\n")
    v = RT.run_values(str(tmp_path))
    # per context: a (1 + 3) / 2 = 2, b (0 - 2) / 2 = -1; mean 0.5; se = std([2, -1], ddof 1) / sqrt 2 = 1.5
    assert v["draws"] == 2 and v["util_base"] == 5 and v["util_flow_grpo_gcpo"] == 5.5
    assert v["delta_flow_grpo_gcpo"] == 0.5 and math.isclose(v["delta_se_flow_grpo_gcpo"], 1.5)
    assert v["delta_flow_grpo_sft"] is None and RT.paired([v], "flow_grpo_gcpo") == "+0.50 (+0.50 ± 1.50)"


def test_group_agreement_standardises_within_groups():
    """scripts/judge_group_agreement.py: agreement is the pooled correlation of per-group
    z-scores, so a reward that orders every group like the truth scores 1 whatever each group's
    offset and scale; a constant reward in a group whose truth varies counts as flat; groups
    with a constant truth or fewer than 2 scored edits are left out; NaN rewards are dropped."""
    import numpy as np
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import judge_group_agreement as JG
    truth = np.array([[0., 5, 10], [2, 4, 6], [3, 3, 3], [1, 2, 9]])
    same_order = np.array([[1., 2, 3], [50, 60, 70], [1, 2, 3], [7, 7, 7]])
    corr, used, flat = JG.standardised_corr(same_order, truth)
    assert np.isclose(corr, 1.0) and (used, flat) == (2, 1)          # last group flat, third left out
    corr, used, flat = JG.standardised_corr(-same_order, truth)
    assert np.isclose(corr, -1.0) and (used, flat) == (2, 1)
    # one group with the middle edit unscored: z-scores over the two left, (-1, 1) in both
    corr, used, _ = JG.standardised_corr(np.array([[1., np.nan, 3]]), np.array([[0., 5, 10]]))
    assert np.isclose(corr, 1.0) and used == 1
    # hand computation: z(r) = (-1.22, 0, 1.22) in both groups but truth (0, 1, 8) is skewed
    r, t = np.array([[1., 2, 3]]), np.array([[0., 1, 8]])
    zt = (t[0] - t[0].mean()) / t[0].std()
    zr = (r[0] - r[0].mean()) / r[0].std()
    assert np.isclose(JG.standardised_corr(r, t)[0], float(np.mean(zr * zt)))


def test_editor_changes_pairs_and_counts_noops(tmp_path):
    """scripts/editor_changes.py: on two world contexts, an editor that copies the source
    (every edit a no-op, utility 0) against one that draws the exact target (utility 10):
    no-op shares 1 and 0, the paired change +10 with standard error 0, pass rates from gt."""
    import json
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import editor_changes as EC
    from miniworld import world
    run = tmp_path / "run"
    os.makedirs(run / "data")
    recs = []
    with open(run / "data" / "contexts.jsonl", "w") as f:
        for c in world.sample_contexts("test", 2, seed=3):
            src, tgt = str(tmp_path / f"{c['id']}_src.png"), str(tmp_path / f"{c['id']}_tgt.png")
            c["source_image"].save(src)
            c["target_image"].save(tgt)
            f.write(json.dumps({"id": c["id"], "source": src, "principles": c["principles"]}) + "\n")
            for ed, img in (("base", src), ("exact", tgt)):
                for k in range(2):
                    recs.append({"editor": ed, "id": c["id"], "draw": k, "image": img,
                                 "gt": world.ground_truth(c["source_image"], c["instruction"], c["principles"],
                                                          c[f"{'source' if ed == 'base' else 'target'}_image"]),
                                 "utility": world.utility(c["source_image"], c["instruction"], c["principles"],
                                                          c[f"{'source' if ed == 'base' else 'target'}_image"])})
    os.makedirs(run / "eval")
    with open(run / "eval" / "editing_samples.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)
    os.makedirs(run / "exact")                                   # a Flow-GRPO folder's training history
    (run / "exact" / "summary.json").write_text(json.dumps({"history": {"train": [
        {"step": 1, "train/adv_gt_corr": 0.5}, {"step": 2, "train/adv_gt_corr": 0.7}, {"step": 3}]}}))
    base, exact = EC.editor_rows(str(run / "eval"))
    assert base["agreement"] is None and abs(exact["agreement"] - 0.6) < 1e-12
    assert (base["editor"], base["edits"], base["utility"], base["noop"], base["delta"]) == ("base", 4, 0.0, 1.0, None)
    assert base["follow"] == 0.0 and base["keep"] == 1.0
    assert (exact["utility"], exact["noop"], exact["delta"], exact["delta_se"]) == (10.0, 0.0, 10.0, 0.0)
    assert exact["follow"] == exact["keep"] == 1.0


def test_base_perception_on_drawings_and_renders():
    """scripts/base_perception_drawings.py: the committed base describes the world's renders
    well (it was pretrained on them) and reports the same measures for the editor's drawings."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import base_perception_drawings as BP
    from miniworld import pretrain_rrm as PR
    sample_pair = PR.sample_pair
    rep = BP.main(n=20)
    assert PR.sample_pair is sample_pair                       # the patch is undone
    assert set(rep) == {"renders", "drawings"} and rep["drawings"]["pairs"] == 20
    assert rep["renders"]["object_accuracy"] > 0.8 and rep["renders"]["question_accuracy"] > 0.8
    assert 0.0 <= rep["drawings"]["object_accuracy"] <= 1.0
