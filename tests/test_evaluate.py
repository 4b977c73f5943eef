"""evaluate.py: the accuracy protocol and GEdit's SC/PQ/O by hand, the benchmarks' exact schemas
(built with datasets, saved as parquet, images stored as bytes as in the real ones), bad rows named,
and whole tiny runs with their report (mini world; GEdit-Bench with a LoRA editor)."""
import json
import os

import datasets
import pytest
import torch
from PIL import Image

import common as C
import evaluate as E

torch.set_num_threads(1)
ERB_FEATURES = datasets.Features({
    "key": datasets.List(datasets.Value("string")), "instruction": datasets.Value("string"),
    "input_image": datasets.Image(), "output_images": datasets.List(datasets.Image()),
    "task_type": datasets.Value("string"), "dimension": datasets.Value("string")})
GEDIT_FEATURES = datasets.Features({
    "task_type": datasets.Value("string"), "key": datasets.Value("string"), "instruction": datasets.Value("string"),
    "instruction_language": datasets.Value("string"), "input_image": datasets.Image()})


def parquet(rows: list[dict], features, path) -> str:
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(path))
    return str(path)


def solid(r: int) -> Image.Image:
    return Image.new("RGB", (16, 16), (r, 0, 0))


def colour_rrm(calls: list):
    """A stand-in RRM whose score is written in the edit's red channel (score = R / 20; R = 255
    -> an answer without a score), going through the real parser."""
    def score(batch):
        out = []
        for _, ed, _, ps in batch:
            calls.append(ed.getpixel((0, 0))[0])
            r = ed.getpixel((0, 0))[0]
            text = "I am not sure." if r == 255 else C.format_rrm_output("", [1] * len(ps), r / 20)
            out.append([E.parsed(text, len(ps))])
        return out
    return score


# ------------------------------------------------------------------------------ protocols by hand
def test_pair_accuracy_by_hand():
    # color_alter: 7 > 5 right; 5 = 5 a tie, wrong            -> 1/2
    # subject-add: None vs 3 wrong; 2 < 9 wrong; 8 > 1 right   -> 1/3
    r = E.pair_accuracy([7, 5, None, 2, 8], [5, 5, 3, 9, 1], ["color_alter"] * 2 + ["subject-add"] * 3)
    assert r["accuracy"] == pytest.approx(2 / 5) and r["task_mean"] == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert r["by_group"] == pytest.approx({"color_alter": 0.5, "subject-add": 1 / 3})
    assert r["ties"] == pytest.approx(1 / 5) and r["unparsed_pairs"] == pytest.approx(1 / 5) and r["pairs"] == 5
    # unweighted over task types: one right pair in a task of 1 weighs as much as 99 wrong in another
    r = E.pair_accuracy([1] + [0] * 99, [0] + [1] * 99, ["a"] + ["b"] * 99)
    assert r["task_mean"] == 0.5 and r["accuracy"] == 0.01
    # all-tied scorer: 0, whatever the labels
    assert E.pair_accuracy([5, 5], [5, 5])["accuracy"] == 0


def test_request_score_averages_parseable_samples_only():
    ps = [{"question": "a", "category": "follow"}, {"question": "b", "category": "keep"}]
    s = [E.parsed(C.format_rrm_output("", [1, 0], 6), 2), E.parsed("no score here", 2),
         E.parsed("<score>11</score>", 2), E.parsed(C.format_rrm_output("", [1, 1], 8), 2), E.parsed(None, 2)]
    assert E.request_score(s, ps) == 7.0                                     # (6 + 8) / 2: never a made-up number
    assert E.request_score(s, ps, "weighted") == pytest.approx((10 * .5 / .8 + 10) / 2)   # 6.25 and 10
    assert E.request_score(s[1:3], ps) is None


def test_gedit_scores_by_hand():
    recs = [{"category": "color_alter", **C.gedit_scores([8, 6], [9, 4])},       # SC 6, PQ 4, O sqrt(24)
            {"category": "color_alter", **C.gedit_scores([3, 5], [7, 8])},       # SC 3, PQ 7, O sqrt(21)
            {"category": "subject-add", **C.gedit_scores([10, 9], None)}]        # PQ unparsed: no O
    s = E.gedit_summary(recs)
    assert s["by_category"]["color_alter"] == pytest.approx({"SC": 4.5, "PQ": 5.5, "O": (24 ** .5 + 21 ** .5) / 2})
    assert s["by_category"]["subject-add"] == {"SC": 9.0, "PQ": None, "O": None}
    assert s["SC"] == pytest.approx((4.5 + 9) / 2) and s["PQ"] == 5.5 and s["O"] == pytest.approx((24 ** .5 + 21 ** .5) / 2)
    assert s["missing"] == {"SC": 0, "PQ": 1, "O": 1} and s["samples"] == 3


# ------------------------------------------------------------------------------ EditReward-Bench schema
def erb_rows():
    """Hand-worked: color_alter 7>5 right, 5=5 tie; subject-add unparsed vs 3, 2<9, 8>1; and the
    pair a3/b3 again as a prompt_following row with the other edit preferred (9 > 2, right)."""
    spec = [("color_alter", "overall", 140, 100), ("color_alter", "overall", 100, 100),
            ("subject-add", "overall", 255, 60), ("subject-add", "overall", 40, 180), ("subject-add", "overall", 160, 20)]
    rows = [{"key": [f"a{i}", f"b{i}"], "instruction": "make it red", "input_image": solid(0),
             "output_images": [solid(w), solid(l)], "task_type": t, "dimension": d} for i, (t, d, w, l) in enumerate(spec)]
    rows.append({**rows[3], "key": ["b3", "a3"], "output_images": [solid(180), solid(40)], "dimension": "prompt_following"})
    return rows


def test_editreward_bench_protocol_by_hand(tmp_path):
    path = parquet(erb_rows(), ERB_FEATURES, tmp_path / "erb.parquet")
    args = E.Args(max_pairs=0)
    bench = {"dimension": "overall", **E.editreward_pairs(path, args, str(tmp_path / "cache"))}
    assert len(bench["pairs"]) == 6 and len(bench["reqs"]) == 10                 # a3/b3 are scored once
    for r in bench["reqs"].values():
        r["principles"] = [{"question": "Is it red?", "category": "follow"}]
    bench["reqs"]["b4"]["principles"] = None                                    # a failed decomposition
    calls = []
    m = E.rrm_metrics(bench, E.score_requests(colour_rrm(calls), bench["reqs"], 4), scalar=False)
    assert len(calls) == 9                                                      # never asked without principles
    # overall rows: color_alter 1/2, subject-add: unparsed, 2<9, 8 vs (no principles) -> 0/3
    assert m["by_group"] == pytest.approx({"color_alter": 0.5, "subject-add": 0.0}) and m["task_mean"] == 0.25
    assert m["pairs"] == 5 and m["ties"] == pytest.approx(1 / 5) and m["unparsed_pairs"] == pytest.approx(2 / 5)
    assert m["by_dimension"]["prompt_following"]["accuracy"] == 1.0             # preferred first, per row
    assert m["status"] == {"ok": 8, "no_score": 1} and m["no_principles"] == 1


def test_bad_benchmark_rows_are_named(tmp_path):
    args, cache = E.Args(max_pairs=0), str(tmp_path / "cache")
    rows = erb_rows()[:3]
    rows[1]["output_images"][1] = {"bytes": b"not a png at all", "path": None}
    with pytest.raises(C.DataError, match=r"row 1 \(key \['a1', 'b1'\]\) output_images\[1\]: undecodable"):
        E.editreward_pairs(parquet(rows, ERB_FEATURES, tmp_path / "bad.parquet"), args, cache)
    one = [{**erb_rows()[0], "output_images": [solid(1)]}]
    with pytest.raises(C.DataError, match="row 0 .* 2 entries"):
        E.editreward_pairs(parquet(one, ERB_FEATURES, tmp_path / "one.parquet"), args, cache)
    no_dim = datasets.Dataset.from_list([{k: v for k, v in erb_rows()[0].items() if k != "dimension"}],
                                        features=datasets.Features({k: v for k, v in ERB_FEATURES.items() if k != "dimension"}))
    no_dim.save_to_disk(str(tmp_path / "nodim"))                                 # the save_to_disk layout too
    with pytest.raises(C.DataError, match=r"missing column\(s\) \['dimension'\]"):
        E.editreward_pairs(str(tmp_path / "nodim"), args, cache)
    with pytest.raises(C.DataError, match="no parquet files and no save_to_disk folder"):
        E.editreward_pairs(str(tmp_path / "nothing_here"), args, cache)
    cn = [{"task_type": "color_alter", "key": "k0", "instruction": "改成红色", "instruction_language": "cn", "input_image": solid(0)}]
    with pytest.raises(C.DataError, match="no rows with instruction_language 'en'"):
        E.edit_contexts(E.Args(gedit_bench=parquet(cn, GEDIT_FEATURES, tmp_path / "g.parquet")), cache)
    # a JSONL pair whose image is missing, and one with malformed principles
    solid(9).save(tmp_path / "s.png")
    good = {"source": "s.png", "winner": "s.png", "loser": "s.png", "instruction": "x",
            "principles": [{"question": "q?", "category": "Feature Preservation"}]}
    for bad, msg in (({**good, "loser": "gone.png"}, r"row 2 \(id p2\), loser"),
                     ({**good, "principles": [{"question": "q?", "category": "vibes"}]}, r"row 2 \(id p2\): 'principles'")):
        with open(tmp_path / "pairs.jsonl", "w") as f:
            f.write(json.dumps({**good, "id": "p1"}) + "\n" + json.dumps({**bad, "id": "p2"}) + "\n")
        with pytest.raises(C.DataError, match=msg):
            E.jsonl_pairs(str(tmp_path / "pairs.jsonl"), str(tmp_path), args)
    with pytest.raises(SystemExit, match="temperature"):
        E.main(E.Args(run_dir=str(tmp_path), k_samples=4))


# ------------------------------------------------------------------------------ whole runs
@pytest.fixture(scope="module")
def world_run(tiny_run, tmp_path_factory):
    """A run folder over the tiny run's data, a tiny Kontext, a Flow-GRPO LoRA on it (non-zero, in
    flow_grpo.py's format), TensorBoard logs of a stage, and both benchmarks built from mini-world
    scenes (so the mini decomposer and judge can read them)."""
    import miniworld
    from miniworld import bases
    from torch.utils.tensorboard import SummaryWriter
    from peft.utils import get_peft_model_state_dict
    from peft import LoraConfig
    root = tmp_path_factory.mktemp("eval")
    run = root / "run"
    os.makedirs(run)
    os.symlink(os.path.join(tiny_run["run"], "data"), run / "data")
    kontext = str(bases.build_kontext(root / "kontext", miniworld.text_corpus(20), 96))
    pipe = C.load_edit_pipeline(kontext)
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():                                                       # B != 0: the LoRA changes the edits
        for n, p in pipe.transformer.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(3))
    type(pipe).save_lora_weights(str(run / "flow_grpo_gcpo"),                     # the diffusers LoRA format
                                 transformer_lora_layers=get_peft_model_state_dict(pipe.transformer),
                                 transformer_lora_adapter_metadata=pipe.transformer.peft_config["default"].to_dict())
    json.dump({"args": {"policy": kontext, "reward_model": "runs/mini/gcpo_rrm"}}, open(run / "flow_grpo_gcpo" / "summary.json", "w"))
    w = SummaryWriter(str(run / "sft_rrm" / "sft_rrm"))
    for step in range(1, 6):
        w.add_scalar("train/loss", 3.0 / step, step)
        w.add_scalar("time/step_s", 1.0, step)
    w.close()
    json.dump({"eval": {"accuracy": 0.5, "pairs": 8}, "minutes": 1.0}, open(run / "sft_rrm" / "summary.json", "w"))
    ctxs = miniworld.sample_contexts("test", 3, seed=5)
    erb = [{"key": [f"{c['id']}-t", f"{c['id']}-s"], "instruction": c["instruction"], "input_image": c["source_image"],
            "output_images": [c["target_image"], c["source_image"]], "task_type": c["category"], "dimension": d}
           for c in ctxs for d in ("overall", "consistency")]
    erb[-1] = {**erb[-1], "key": ["w-t", "w-s"], "instruction": "make it look like a watercolour"}  # not a mini-world one
    gedit = [{"task_type": c["category"], "key": c["id"], "instruction": c["instruction"], "instruction_language": "en",
              "input_image": c["source_image"]} for c in ctxs]
    gedit.append({**gedit[0], "key": "cn-0", "instruction_language": "cn"})
    return {"run": str(run), "base": tiny_run["base"], "kontext": kontext,
            "erb": parquet(erb, ERB_FEATURES, root / "erb.parquet"), "gedit": parquet(gedit, GEDIT_FEATURES, root / "gedit.parquet")}


def test_mini_run_writes_the_report(world_run, tmp_path):
    out = str(tmp_path / "eval")
    s = E.main(E.Args(run_dir=world_run["run"], out_dir=out, rrms=f"base={world_run['base']},lenient=mini:lenient",
                      editor_base=world_run["kontext"], editreward_bench=world_run["erb"], max_new_tokens=8, grid_rows=2,
                      edit_seeds=2))
    for f in ("summary.json", "report.html", "report.md", "grid_pairs.png", "grid_editreward_bench.png", "grid_editors.png",
              "scores_pairs.jsonl", "scores_editreward_bench.jsonl", "editing_samples.jsonl"):
        assert os.path.getsize(os.path.join(out, f)) > 0, f
    assert s == json.load(open(os.path.join(out, "summary.json")))
    assert {"minutes", "args", "notes", "counters", "rrm", "editing", "curves", "paper"} <= set(s)
    assert set(s["rrm"]) == {"pairs", "editreward_bench"} and set(s["rrm"]["pairs"]) == {"base", "lenient", "scalar"}
    base, sim = s["rrm"]["pairs"]["base"], s["rrm"]["pairs"]["lenient"]
    assert base["parse_rate"] < 0.5 and any("'base' gave a parseable score" in n for n in s["notes"])
    assert base["accuracy"] == 0 and base["unparsed_pairs"] > 0                  # unparsed is wrong, not random
    assert sim["parse_rate"] == 1 and min(sim["verification_accuracy"].values()) > 0.6   # a lenient but seeing verifier
    erb = s["rrm"]["editreward_bench"]["lenient"]
    assert s["counters"]["decompose/parse_error"] == 1 and erb["no_principles"] == 2 and erb["pairs"] == 3
    assert set(erb["by_dimension"]) == {"overall", "consistency"}
    eds = s["editing"]["editors"]
    assert set(eds) == {"base", "flow_grpo_gcpo"} and eds["flow_grpo_gcpo"]["rl"] and "utility" in eds["base"]["truth"]
    assert {"SC", "PQ", "O", "by_category", "missing"} <= set(eds["base"])
    samples = [json.loads(x) for x in open(os.path.join(out, "editing_samples.jsonl"))]
    by = {(r["editor"], r["id"]): open(r["image"], "rb").read() for r in samples}
    assert any(by[("base", i)] != by[("flow_grpo_gcpo", i)] for _, i in by)      # the LoRA was applied
    # --edit_seeds 2: every context edited twice from different noise, both draws kept and counted
    base_recs = [r for r in samples if r["editor"] == "base"]
    ids = [r["id"] for r in base_recs]
    assert [r["draw"] for r in base_recs] == [0] * (len(ids) // 2) + [1] * (len(ids) // 2) and ids[:len(ids) // 2] == ids[len(ids) // 2:]
    assert eds["base"]["samples"] == len(ids) and len(set(r["image"] for r in base_recs)) == len(ids)
    assert any(open(a["image"], "rb").read() != open(b["image"], "rb").read()
               for a, b in zip(base_recs[:len(ids) // 2], base_recs[len(ids) // 2:]))
    t = eds["base"]["truth"]
    assert t["utility"] == pytest.approx(sum(r["utility"] for r in base_recs) / len(ids)) and t["utility_se"] >= 0
    assert s["curves"] == {"sft_rrm": ["train/loss"]}
    page = open(os.path.join(out, "report.html")).read()
    assert page.count("<svg") == 1 and page.count("data:image/png;base64,") == 3 and "82.2" not in page
    assert "6.86 / 7.20 / 6.24" in page and "75.4" not in page and "| lenient |" in open(os.path.join(out, "report.md")).read()


def test_gedit_bench_run_with_the_lora_editor(world_run, tmp_path):
    s = E.main(E.Args(run_dir=world_run["run"], out_dir=str(tmp_path / "eval"), world="none", rrms="", scalar_scorer="",
                      pairs_split="", editor_base=world_run["kontext"], gedit_bench=world_run["gedit"], max_contexts=2,
                      edit_seeds=1))
    assert "GEdit-Bench (en, 2 of 3 rows)" in s["editing"]["source"] and s["args"]["max_sequence_length"] == 512
    for e in s["editing"]["editors"].values():
        assert e["samples"] == 2 and "truth" not in e and e["SC"] is not None


def test_doctests():  # pytest.ini collects doctests from common.py only
    import doctest
    assert doctest.testmod(E).failed == 0
