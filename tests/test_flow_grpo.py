"""flow_grpo.py: the SDE math against torch.distributions, the sampler against the diffusers
pipelines, the first ratio, the KL, LoRA save/load, and whole runs (Kontext and Qwen-Image-Edit,
1 vs 2 processes, resume). Tiny random pipelines; the mini world's simulated verifier
(mini:lenient, seeded per edit) gives a reward with signal, the random RRM base one without."""
import contextlib
import json
import os

import numpy as np
import pytest
import torch
from torch.distributions import Normal, kl_divergence

import common as C
import flow_grpo as F
from stage_fixtures import run_script

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def bases(tiny_run, tmp_path_factory):
    import miniworld
    from miniworld import bases as B
    root = tmp_path_factory.mktemp("fg_bases")
    corpus = miniworld.text_corpus(40)
    return {"kontext": str(B.build_kontext(root / "kontext", corpus, 96)),
            "qwen": str(B.build_qwen_edit(root / "qwen", corpus, 96)), **tiny_run}


def load(path):
    pipe = C.load_edit_pipeline(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def contexts(run, n=2):
    rows = [r for r in C.read_jsonl(os.path.join(run, "data", "contexts.jsonl")) if r["split"] == "train"][:n]
    return rows, [C.load_image(r["source"]) for r in rows], [r["instruction"] for r in rows]


def targs(**kw):
    return F.Args(**{"num_steps": 3, "true_cfg_scale": 2.0, **kw})


# ------------------------------------------------------------------------ pure math
def test_sampled_transition_logprob_equals_torch_normal():
    torch.manual_seed(0)
    x, v = torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    sigmas = torch.tensor([1.0, 0.8, 0.5, 0.0])
    std_t = F.noise_stds(sigmas, [0, 1, 2], 0.7)
    # std_t = a sqrt(sigma / (1 - sigma)); at sigma = 1 the denominator uses sigmas[1] = 0.8
    assert torch.allclose(std_t, torch.tensor([0.7 * (1 / 0.2) ** 0.5, 0.7 * 4 ** 0.5, 0.7]))
    mean, s = F.sde_step(x, v, sigmas[1], sigmas[2], std_t[1])
    by_hand = x + (-0.3) * (v + 1.4 ** 2 / 1.6 * (x + 0.2 * v))
    assert torch.allclose(mean, by_hand, atol=1e-6) and abs(float(s) - 1.4 * 0.3 ** 0.5) < 1e-6
    x_next = mean + s * torch.randn_like(mean)
    ref = Normal(mean, s).log_prob(x_next)                                   # (3, 5, 4)
    assert torch.allclose(F.gaussian_logprob(x_next, mean, s, "mean"), ref.flatten(1).mean(1), atol=1e-5)
    assert torch.allclose(F.gaussian_logprob(x_next, mean, s, "sum"), ref.flatten(1).sum(1), atol=1e-4)
    # noise 0: exactly the pipeline's Euler step
    m0, s0 = F.sde_step(x, v, sigmas[1], sigmas[2], torch.tensor(0.0))
    assert torch.equal(m0, x + (sigmas[2] - sigmas[1]) * v) and s0 == 0


def test_exact_kl_closed_form_includes_dt():
    torch.manual_seed(1)
    m1, m2 = torch.randn(2, 6, 4), torch.randn(2, 6, 4)
    std_t, dt = 0.9, 0.1
    s = torch.tensor(std_t * dt ** 0.5)                                       # the transition's std
    ref = kl_divergence(Normal(m1, s), Normal(m2, s)).flatten(1)
    assert torch.allclose(F.gaussian_kl(m1, m2, s, "sum"), ref.sum(1), rtol=1e-5)
    assert torch.allclose(F.gaussian_kl(m1, m2, s, "mean"), ref.mean(1), rtol=1e-5)
    # the public implementation's ||dmu||^2 / (2 std_t^2) is dt times too small
    assert torch.allclose(F.gaussian_kl(m1, m2, s), ((m1 - m2) ** 2).flatten(1).mean(1) / (2 * std_t ** 2) / dt)
    assert torch.all(F.gaussian_kl(m1, m1, s) == 0)


def test_group_advantages_skip_zero_variance_and_exclude():
    args = F.Args(adv_clip=5.0)
    r = np.array([1.0, 3.0, 5.0, 5.0, 2.0, 0.0])
    adv, live = F.group_advantages(r, np.ones(6, bool), 2, args)
    assert live.tolist() == [True, False, True]
    assert np.allclose(adv, [-1, 1, 0, 0, 1, -1], atol=1e-3)
    valid = np.array([True, True, False, True, True, True])
    args.unparseable = "exclude"
    adv, live = F.group_advantages(np.array([1.0, 3.0, 0.0, 7.0, 7.0, 7.0]), valid, 3, args)
    assert adv[2] == 0 and np.allclose(adv[:3], [-1, 1, 0], atol=1e-3) and live.tolist() == [True, False]
    args.unparseable = "zero"  # the unparseable one counts as 0, the lowest reward
    adv, _ = F.group_advantages(np.array([1.0, 3.0, 0.0]), valid[:3], 3, args)
    assert adv[2] < adv[0] < adv[1]


# ------------------------------------------------------------------------ sampler vs pipelines
@pytest.mark.parametrize("kind", ["kontext", "qwen"])
def test_noise_zero_reproduces_the_pipeline(bases, kind):
    pipe, args = load(bases[kind]), targs()
    rows, srcs, instrs = contexts(bases["run"])
    ctx = F.encode_contexts(pipe, srcs, instrs, args, "cpu")
    sched, seeds = F.schedule(pipe, 3, 36), [11, 12]
    ours, _ = F.denoise(pipe.transformer, pipe, ctx, torch.arange(2), seeds, sched, [], 0.0, args, contextlib.nullcontext)
    x1 = torch.stack([torch.randn((1, 36, 64), generator=torch.Generator().manual_seed(s))[0] for s in seeds])
    common = dict(image=srcs, height=96, width=96, num_inference_steps=3, latents=x1.clone())
    if kind == "kontext":
        call = lambda **kw: pipe(prompt=instrs, max_area=96 * 96, _auto_resize=False, guidance_scale=2.5,
                                 max_sequence_length=24, **common, **kw).images
    else:
        def call(**kw):
            with C.qwen_edit_at_area(96 * 96):
                pe, m = C.qwen_edit_prompt_embeds(pipe, instrs, srcs)
                npe, nm = C.qwen_edit_prompt_embeds(pipe, [" "] * 2, srcs)
                return pipe(prompt_embeds=pe, prompt_embeds_mask=m, negative_prompt_embeds=npe,
                            negative_prompt_embeds_mask=nm, true_cfg_scale=2.0, **common, **kw).images
    theirs = call(output_type="latent")
    assert (ours - theirs).abs().max() < 1e-5
    a = np.stack([np.asarray(i, np.int16) for i in F.decode(pipe, ours, 96)])
    b = np.stack([np.asarray(i, np.int16) for i in call()])
    assert np.abs(a - b).max() <= 1


@pytest.mark.parametrize("kind", ["kontext", "qwen"])
def test_first_ratio_is_one_with_a_different_batch_layout(bases, kind):
    pipe, args = load(bases[kind]), targs()
    rows, srcs, instrs = contexts(bases["run"])
    ctx = F.encode_contexts(pipe, srcs, instrs, args, "cpu")
    sched, trained = F.schedule(pipe, 3, 36), [0, 1]
    idx = torch.tensor([0, 0, 1, 1])                                           # G = 2 per context
    _, traj = F.denoise(pipe.transformer, pipe, ctx, idx, [1, 2, 3, 4], sched, trained, 0.7, args,
                        contextlib.nullcontext)                                 # sampling: 4 samples per step
    std_k = F.noise_stds(sched[0], trained, 0.7)
    pairs = [(i, j) for i in range(4) for j in range(2)]
    pairs = [pairs[p] for p in np.random.default_rng(0).permutation(len(pairs))]
    for chunk in (pairs[:3], pairs[3:]):                                       # training: 3 + 5 mixed steps
        si, sj = torch.tensor([i for i, _ in chunk]), torch.tensor([j for _, j in chunk])
        with torch.no_grad():
            mean, s = F.transition_mean(pipe.transformer, pipe, ctx, idx[si], traj["x"][si, sj],
                                        torch.tensor([trained[j] for j in sj.tolist()]), sched, std_k[sj], args)
        logp = F.gaussian_logprob(traj["x_next"][si, sj], mean, s, "mean")
        _, ratio = F.clipped_objective(logp, traj["logp"][si, sj], torch.ones(len(chunk)), 1e-4)
        assert (ratio - 1).abs().max() < 1e-5
        sum_lp = F.gaussian_logprob(traj["x_next"][si, sj], mean, s, "sum")
        assert torch.allclose(sum_lp, logp * 36 * 64, rtol=1e-5)


def test_group_init_noise_shares_x_T_only(bases):
    # --init_noise group: a group's G samples start from one x_T; each transition still draws
    # its sample's own noise (the same draw as without a shared start)
    pipe, args = load(bases["kontext"]), targs()
    rows, srcs, instrs = contexts(bases["run"])
    ctx = F.encode_contexts(pipe, srcs, instrs, args, "cpu")
    sched, idx = F.schedule(pipe, 3, 36), torch.tensor([0, 0, 1, 1])
    std0 = F.noise_stds(sched[0], [0, 1], 0.7)[0]

    def first_noise(init):                                                     # x_T and eps of step 0
        traj = F.denoise(pipe.transformer, pipe, ctx, idx, [1, 2, 3, 4], sched, [0, 1], 0.7, args,
                         contextlib.nullcontext, init_seeds=init)[1]
        x = traj["x"][:, 0]
        with torch.no_grad():
            mean, s = F.sde_step(x, F.velocity(pipe.transformer, pipe, x, sched[1][[0] * 4] / 1000, ctx, idx, args),
                                 sched[0][0], sched[0][1], std0)
        return x, (traj["x_next"][:, 0] - mean) / s
    (x_T, eps), (x_own, eps_own) = first_noise([7, 7, 8, 8]), first_noise(None)
    assert torch.equal(x_T[0], x_T[1]) and torch.equal(x_T[2], x_T[3]) and not torch.equal(x_T[0], x_T[2])
    assert not torch.equal(x_own[0], x_own[1])
    assert torch.allclose(eps, eps_own, atol=1e-4) and not torch.allclose(eps[0], eps[1])


def test_update_raises_the_advantage_weighted_logprob(bases):
    # the sign of the whole chain (SDE mean -> Gaussian log-prob -> clipped objective -> step):
    # one small step on Eq. E raises sum_i A_i log p(transitions of sample i)
    pipe, args = load(bases["kontext"]), targs()
    add_lora(pipe, r=4, alpha=8)
    rows, srcs, instrs = contexts(bases["run"])
    ctx = F.encode_contexts(pipe, srcs, instrs, args, "cpu")
    sched, trained, idx = F.schedule(pipe, 3, 36), [0, 1], torch.tensor([0, 0, 1, 1])
    _, traj = F.denoise(pipe.transformer, pipe, ctx, idx, [1, 2, 3, 4], sched, trained, 0.7, args,
                        contextlib.nullcontext)
    std_k = F.noise_stds(sched[0], trained, 0.7)

    def logp():                                                                # (4 samples, 2 steps)
        return torch.stack([F.gaussian_logprob(traj["x_next"][:, j], *F.transition_mean(
            pipe.transformer, pipe, ctx, idx, traj["x"][:, j], torch.full((4,), trained[j]), sched,
            std_k[[j] * 4], args), "mean") for j in range(2)], 1)
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0])                                 # one winner, one loser per context
    lora = [p for n, p in pipe.transformer.named_parameters() if "lora" in n]
    lp = logp()
    pg, ratio = F.clipped_objective(lp, traj["logp"], adv[:, None], 1e-4)
    assert (ratio - 1).abs().max() < 1e-5
    pg.mean().backward()
    torch.optim.SGD(lora, lr=1e-3).step()
    with torch.no_grad():
        gain = (logp() - lp.detach()).sum(1)                                   # (4,)
    assert float((adv * gain).sum()) > 0, gain
    assert float(gain[adv > 0].mean()) > float(gain[adv < 0].mean()), gain


def add_lora(pipe, r=4, alpha=8, seed=0):
    from peft import LoraConfig
    pipe.transformer.add_adapter(LoraConfig(r=r, lora_alpha=alpha, init_lora_weights="gaussian",
                                            target_modules=F.LORA_TARGETS))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pipe.transformer.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_kl_zero_at_init_and_closed_form_after_a_change(bases):
    pipe, args = load(bases["kontext"]), targs()
    rows, srcs, instrs = contexts(bases["run"])
    ctx = F.encode_contexts(pipe, srcs, instrs, args, "cpu")
    sched, tr = F.schedule(pipe, 3, 36), pipe.transformer
    x, step_idx, std_t = torch.randn(2, 36, 64), torch.tensor([0, 1]), F.noise_stds(sched[0], [0, 1], 0.7)
    mean_base, s = F.transition_mean(tr, pipe, ctx, torch.arange(2), x, step_idx, sched, std_t, args)
    add_lora(pipe, seed=1)
    with torch.no_grad():
        for n, p in tr.named_parameters():
            if "lora_B" in n:
                p.zero_()                                                       # the policy at init
    mean, _ = F.transition_mean(tr, pipe, ctx, torch.arange(2), x, step_idx, sched, std_t, args)
    with F.reference_policy(tr):
        mean_ref, _ = F.transition_mean(tr, pipe, ctx, torch.arange(2), x, step_idx, sched, std_t, args)
    assert torch.equal(mean_ref, mean_base) and F.gaussian_kl(mean, mean_ref, s).abs().max() == 0
    add_lora_b = [p for n, p in tr.named_parameters() if "lora_B" in n]
    with torch.no_grad():
        for p in add_lora_b:
            p.normal_(0, 0.05)
    mean, _ = F.transition_mean(tr, pipe, ctx, torch.arange(2), x, step_idx, sched, std_t, args)
    with F.reference_policy(tr):
        mean_ref, _ = F.transition_mean(tr, pipe, ctx, torch.arange(2), x, step_idx, sched, std_t, args)
    assert all(p.requires_grad for p in add_lora_b)                            # re-enabled after the reference
    kl = F.gaussian_kl(mean, mean_ref, s, "sum")
    ref = kl_divergence(Normal(mean, s), Normal(mean_ref, s)).flatten(1).sum(1)
    assert kl.min() > 0 and torch.allclose(kl, ref, rtol=1e-4)


def test_lora_save_load_into_the_pipeline_reproduces_outputs(bases, tmp_path):
    pipe, args = load(bases["kontext"]), targs()
    rows, srcs, instrs = contexts(bases["run"])
    add_lora(pipe, r=4, alpha=12)                                              # alpha != r: the metadata matters
    ctx = F.encode_contexts(pipe, srcs, instrs, args, "cpu")
    sched = F.schedule(pipe, 3, 36)
    ours, _ = F.denoise(pipe.transformer, pipe, ctx, torch.arange(2), [5, 6], sched, [], 0.0, args, contextlib.nullcontext)
    F.save_lora(type(pipe), pipe.transformer, str(tmp_path))
    fresh = load(bases["kontext"])
    fresh.load_lora_weights(str(tmp_path))
    x1 = torch.stack([torch.randn((1, 36, 64), generator=torch.Generator().manual_seed(s))[0] for s in (5, 6)])
    theirs = fresh(image=srcs, prompt=instrs, max_area=96 * 96, _auto_resize=False, guidance_scale=2.5,
                   max_sequence_length=24, height=96, width=96, num_inference_steps=3, latents=x1,
                   output_type="latent").images
    assert (ours - theirs).abs().max() < 1e-5
    base = load(bases["kontext"])                                              # and the LoRA did change it
    ctx0 = F.encode_contexts(base, srcs, instrs, args, "cpu")
    plain, _ = F.denoise(base.transformer, base, ctx0, torch.arange(2), [5, 6], sched, [], 0.0, args, contextlib.nullcontext)
    assert (plain - ours).abs().max() > 1e-3
    # resume's loader puts the same weights back into a fresh adapter
    again = load(bases["kontext"])
    add_lora(again, r=4, alpha=12, seed=9)
    F.load_lora(type(again), again.transformer, str(tmp_path))
    sd1, sd2 = pipe.transformer.state_dict(), again.transformer.state_dict()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1 if "lora" in k)


def test_truth_reward_is_the_worlds_utility(bases):
    # the oracle ablation's reward is the exact utility; its points are the exact verdicts
    from miniworld import world
    rows, srcs, _ = contexts(bases["run"])
    judge = F.make_judge(targs(reward_backend="mini:truth"), "cpu", {})
    recs = judge(rows, srcs, [0, 1])                                         # no-op edits: utility 0
    assert [r["reward"] for r in recs] == [r["gt_utility"] for r in recs] == [0.0, 0.0]
    target = world.render(world.apply_edit(world.perceive(srcs[0]), world.parse_instruction(
        rows[0]["instruction"], world.perceive(srcs[0]))))
    rec = judge(rows[:1], [target], [0])[0]
    assert rec["reward"] == rec["gt_utility"] == 10.0 and rec["rrm_follow"] == rec["gt_follow"]


def test_oracle_ablations_corrupt_only_what_they_name(bases):
    # deductions + the world's no-op call on the oracle's verdicts IS the utility; the Keep-blind
    # oracle passes failed Keep principles and nothing else; the noise is seeded per edit
    from miniworld import world as W
    rows, srcs, _ = contexts(bases["run"], n=40)
    for row, src in zip(rows, srcs):                                          # a target minus one kept object
        spec = W.parse_instruction(row["instruction"], W.perceive(src))
        target = W.apply_edit(W.perceive(src), spec)
        kept = [o for o in target.objects if o.cell not in W.involved_cells(spec)]
        if kept:
            break
    assert kept, "no context with a kept object in the fixture run"
    bad = W.render(W.make_scene(target.background, [o for o in target.objects if o != kept[0]]))
    edits, rws = [bad, src, W.render(target)], [row] * 3                      # Keep failure, no-op, right
    exact = F.make_judge(targs(reward_backend="mini:truth", reward_mode="deductions", noop_call=True), "cpu", {})
    recs = exact(rws, edits, [0, 1, 2])
    assert [r["reward"] for r in recs] == [r["gt_utility"] for r in recs]
    assert 0 in recs[0]["gt_keep"] and recs[1]["reward"] == 0.0 and recs[2]["reward"] == 10.0
    blind = F.make_judge(targs(reward_backend="mini:truth", reward_mode="deductions", noop_call=True,
                               oracle_blind="keep:1"), "cpu", {})
    b = blind(rws, edits, [0, 1, 2])
    assert all(v == 1 for v in b[0]["rrm_keep"]) and b[0]["rrm_follow"] == b[0]["gt_follow"]
    assert b[0]["reward"] > b[0]["gt_utility"] and [r["reward"] for r in b[1:]] == [0.0, 10.0]
    noisy = F.make_judge(targs(reward_backend="mini:truth", reward_noise=2.0), "cpu", {})
    n1, n2 = noisy(rws, edits, [0, 1, 2]), noisy(rws, edits, [0, 1, 5])
    assert [r["reward"] for r in n1] == [r["reward"] for r in noisy(rws, edits, [0, 1, 2])]  # reproducible
    assert n1[2]["reward"] != n2[2]["reward"] and all(r["reward"] != r["gt_utility"] for r in n1)
    follow_blind = F.make_judge(targs(reward_backend="mini:truth", reward_mode="deductions", noop_call=True,
                                      oracle_blind="follow:1"), "cpu", {})(rws, edits, [0, 1, 2])
    assert follow_blind[0]["rrm_keep"] == recs[0]["gt_keep"] and 0 in recs[1]["gt_follow"]
    assert all(v == 1 for v in follow_blind[1]["rrm_follow"]) and follow_blind[1]["reward"] == 0.0  # still a no-op
    # --costs reprices the failures the judge does report: here a failed Keep costs 1 point, not 5
    priced = F.make_judge(targs(reward_backend="mini:truth", reward_mode="deductions", noop_call=True,
                                costs="follow:4,keep:1,quality:2"), "cpu", {})(rws, edits, [0, 1, 2])
    assert priced[0]["reward"] == 10.0 - recs[0]["gt_keep"].count(0) > recs[0]["reward"]
    assert [r["reward"] for r in priced[1:]] == [0.0, 10.0]
    for kw, msg in ((dict(reward_backend="mini:lenient", oracle_blind="keep:0.5"), "mini:truth"),
                    (dict(costs="keep:10"), "all three"),
                    (dict(reward_backend="mini:truth", oracle_blind="keep:x"), "CATEGORY:P"),
                    (dict(reward_backend="mini:truth", oracle_blind="kept=0.5"), "CATEGORY:P")):
        with pytest.raises(SystemExit, match=msg):
            F.main(F.Args(run_dir=bases["run"], policy=bases["kontext"], report_to="none", **kw))


def test_probs_verdicts_price_the_rrms_own_odds(bases, monkeypatch):
    # --verdicts probs: the in-process RRM's answer is read again, teacher-forced, and each
    # verdict digit becomes its P(yes); the reward is the expected deductions under them.
    # The random tiny RRM writes no points, so its answer is replaced by a well-formed one.
    rows, srcs, _ = contexts(bases["run"])
    answer = C.format_rrm_output("q1: yes.", [1] * len(rows[0]["principles"]), 9.0)
    fake = lambda model, processor, reqs, prins, **kw: [[dict(C.parse_rrm_output(answer, len(p)), text=answer)]
                                                       for p in prins]
    monkeypatch.setattr(F.C, "rrm_score", fake)
    a = targs(reward_backend="inprocess", reward_model=bases["base"], reward_mode="deductions", verdicts="probs",
              costs="follow:1,keep:1,quality:1")                           # small prices: no clip at 0
    rec = F.make_judge(a, "cpu", {})(rows[:1], srcs[:1], [0])[0]
    model, processor = C.load_rrm(bases["base"])
    soft = C.verdict_probabilities(model, processor, [(srcs[0], srcs[0], rows[0]["instruction"])],
                                   [rows[0]["principles"]], [answer])[0]
    want = C.aggregate_score({"points": soft}, rows[0]["principles"], "deductions", costs=C.parse_costs(a.costs))
    assert abs(rec["reward"] - want) < 1e-6 and 0 < rec["reward"] < 10
    assert sorted(sum((rec[k] for k in rec if k.startswith("rrm_")), [])) == sorted(soft)
    with pytest.raises(SystemExit, match="inprocess"):
        F.main(F.Args(run_dir=bases["run"], policy=bases["kontext"], report_to="none",
                      reward_backend="mini:lenient", verdicts="probs"))


# ------------------------------------------------------------------------ whole runs
def run_args(bases, out, **kw):
    a = ["--policy", bases["kontext"], "--run_dir", bases["run"], "--output_name", out, "--reward_backend",
         "mini:lenient", "--steps", "2", "--contexts_per_step", "2", "--group_size", "2", "--num_steps", "3",
         "--eval_contexts", "1", "--eval_seeds", "2", "--report_to", "none", "--lr", "1e-2", "--micro_batch", "3",
         "--minibatches", "2"]                                                  # the 2nd optimizer step is off-policy
    for k, v in kw.items():
        a += [f"--{k}", str(v)]
    return a


def lora_of(bases, out):
    from safetensors.torch import load_file
    return load_file(os.path.join(bases["run"], out, "pytorch_lora_weights.safetensors"))


def in_process(argv):
    from transformers import HfArgumentParser
    return F.main(HfArgumentParser(F.Args).parse_args_into_dataclasses(argv)[0])


def test_qwen_edit_run_with_the_in_process_rrm(bases):
    # the random RRM's answers do not parse: rewards are counted as unparseable, groups skipped
    out = in_process(run_args(bases, "fg_qwen", policy=bases["qwen"], reward_backend="inprocess",
                              reward_model=bases["base"], rrm_max_new_tokens=8, steps=1, beta=0.0))
    t = out["history"]["train"][0]
    assert t["train/unparseable"] == 1.0 and t["train/zero_var_groups"] == 1.0
    assert "gt_utility" in out["final"]
    assert os.path.exists(os.path.join(bases["run"], "fg_qwen", "pytorch_lora_weights.safetensors"))


def test_nonfinite_gradient_skips_the_update(bases, monkeypatch):
    # cuDNN's bf16 attention backward gave NaN LoRA gradients on an H200 (README, GPU check):
    # one such step must not reach the LoRA. A NaN objective stands in for the kernel here.
    real = F.clipped_objective
    monkeypatch.setattr(F, "clipped_objective", lambda *a, **k: (lambda pg, r: (pg * float("nan"), r))(*real(*a, **k)))
    out = in_process(run_args(bases, "fg_nan", steps=1))
    t = out["history"]["train"][0]
    assert t["train/zero_var_groups"] < 1                     # there was something to learn ...
    assert out["counters"]["nonfinite_grad_skipped"] == 2     # ... and both minibatch updates were refused
    lora = lora_of(bases, "fg_nan")
    assert all(torch.isfinite(v).all() for v in lora.values())
    assert all(float(v.abs().max()) == 0.0 for k, v in lora.items() if "lora_B" in k)   # B still 0: untouched
    with pytest.raises(SystemExit, match="5 updates in a row"):    # a broken kernel stops the run
        in_process(run_args(bases, "fg_nan5", steps=4))


@pytest.mark.slow
def test_one_vs_two_processes_and_resume(bases):
    # The rewards come from the simulated verifier, seeded per edit, so they depend on the
    # images alone. Step 1 samples from identical weights in both layouts, so its rewards and
    # advantages are identical; its two minibatches (the 2nd off-policy) give the update.
    # Step 2 samples from weights that differ by the order of float sums (DDP's all-reduce),
    # which could flip a thresholded verdict, so 1-vs-2 is compared on one step, and resume
    # (same layout, bit-identical weights) on two.
    p1 = run_args(bases, "fg_p1", steps=1)
    run_script(["flow_grpo.py"] + p1)
    run_script(["flow_grpo.py"] + run_args(bases, "fg_p2", steps=1), two_procs=True)
    one = json.load(open(os.path.join(bases["run"], "fg_p1", "summary.json")))["history"]["train"]
    two = json.load(open(os.path.join(bases["run"], "fg_p2", "summary.json")))["history"]["train"]
    assert one[0]["train/zero_var_groups"] < 1.0, one                     # the step carried signal
    for k in ("train/reward", "train/gt_utility"):
        if k in one[0]:
            assert np.isclose(one[0][k], two[0][k], atol=1e-6), (k, one, two)
    l1, l2 = lora_of(bases, "fg_p1"), lora_of(bases, "fg_p2")
    init = {k: torch.zeros_like(v) if "lora_B" in k else v for k, v in l1.items()}   # B starts at 0
    moved = max(float((l1[k] - init[k]).abs().max()) for k in l1 if "lora_B" in k)
    assert moved > 1e-4, moved
    assert max(float((l1[k] - l2[k]).abs().max()) for k in l1) < 0.05 * moved
    # resume: 2 steps straight vs 1 step + checkpoint, then resume to 2
    run_script(["flow_grpo.py"] + run_args(bases, "fg_straight", steps=2))
    run_script(["flow_grpo.py"] + run_args(bases, "fg_resume", steps=1, checkpoint_every=1))
    run_script(["flow_grpo.py"] + run_args(bases, "fg_resume", steps=2, checkpoint_every=1,
                                            resume_from_checkpoint="latest"))
    straight = json.load(open(os.path.join(bases["run"], "fg_straight", "summary.json")))["history"]["train"]
    resumed = json.load(open(os.path.join(bases["run"], "fg_resume", "summary.json")))["history"]["train"]
    assert np.isclose(resumed[-1]["train/reward"], straight[-1]["train/reward"], atol=1e-6), (straight, resumed)
    ls, lr_ = lora_of(bases, "fg_straight"), lora_of(bases, "fg_resume")
    assert max(float((ls[k] - lr_[k]).abs().max()) for k in ls) < 1e-6
