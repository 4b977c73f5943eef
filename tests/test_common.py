"""Checks of common.py's reward math and parsers against independent answers:
hand-worked examples, naive loops, invariances, and property-based fuzzing."""
import itertools
import json
import math
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import common as C

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------- GCPO
def test_gcpo_hand_worked_3x3():
    # Winner scores tau^w = [8, 5, 3], loser scores tau^l = [6, 5, 2]  (N = 3).
    # r^w_1: 8 > 6, 8 > 5, 8 > 2          -> 3/3
    # r^w_2: 5 > 6 no, 5 > 5 no (tie), 5 > 2 -> 1/3
    # r^w_3: 3 > 6 no, 3 > 5 no, 3 > 2     -> 1/3          mean r^w = 5/9
    # r^l_1: 6 < 8 yes, 6 < 5 no, 6 < 3 no -> 1/3
    # r^l_2: 5 < 8 yes, 5 < 5 no (tie), 5 < 3 no -> 1/3
    # r^l_3: 2 < 8, 2 < 5, 2 < 3            -> 3/3         mean r^l = 5/9
    # A^w = r^w - 5/9 = [4/9, -2/9, -2/9];  A^l = [-2/9, -2/9, 4/9]
    aw, al, rw, rl = C.gcpo_advantages([8, 5, 3], [6, 5, 2])
    np.testing.assert_allclose(rw, [1, 1 / 3, 1 / 3])
    np.testing.assert_allclose(rl, [1 / 3, 1 / 3, 1])
    np.testing.assert_allclose(aw, [4 / 9, -2 / 9, -2 / 9])
    np.testing.assert_allclose(al, [-2 / 9, -2 / 9, 4 / 9])


def naive_gcpo(win, lose):
    """The paper's Eq. 2-3 written as plain loops (all scores parseable)."""
    n = len(win)
    rw = [sum(1 for k in range(n) if win[j] > lose[k]) / n for j in range(n)]
    rl = [sum(1 for k in range(n) if lose[j] < win[k]) / n for j in range(n)]
    mw, ml = sum(rw) / n, sum(rl) / n
    return [r - mw for r in rw], [r - ml for r in rl], rw, rl


scores_strategy = st.integers(1, 10).flatmap(lambda n: st.tuples(
    st.lists(st.integers(0, 20).map(lambda v: v / 2), min_size=n, max_size=n),
    st.lists(st.integers(0, 20).map(lambda v: v / 2), min_size=n, max_size=n)))


@FUZZ
@given(scores_strategy)
def test_gcpo_matches_naive_loop_and_invariances(pair):
    win, lose = pair
    aw, al, rw, rl = C.gcpo_advantages(win, lose)
    naw, nal, nrw, nrl = naive_gcpo(win, lose)
    np.testing.assert_allclose(rw, nrw)
    np.testing.assert_allclose(rl, nrl)
    np.testing.assert_allclose(aw, naw, atol=1e-12)
    np.testing.assert_allclose(al, nal, atol=1e-12)
    # advantages sum to zero in each group
    assert abs(aw.sum()) < 1e-9 and abs(al.sum()) < 1e-9
    # permuting a group permutes its advantages (and leaves the other group's unchanged)
    perm = np.random.default_rng(len(win)).permutation(len(win))
    aw2, al2, _, _ = C.gcpo_advantages([win[i] for i in perm], lose)
    np.testing.assert_allclose(aw2, aw[perm], atol=1e-12)
    np.testing.assert_allclose(al2, al, atol=1e-12)


def test_gcpo_ties_earn_nothing_and_separated_pairs_give_zero_advantage():
    aw, al, rw, rl = C.gcpo_advantages([5, 5, 5], [5, 5, 5])
    assert rw.tolist() == [0, 0, 0] and rl.tolist() == [0, 0, 0]
    assert not aw.any() and not al.any()
    # fully separated: every winner beats every loser -> all ratios 1 -> zero advantages
    aw, al, rw, rl = C.gcpo_advantages([9, 8, 7], [1, 2, 3])
    assert rw.tolist() == [1, 1, 1] and rl.tolist() == [1, 1, 1]
    assert not aw.any() and not al.any()


def test_gcpo_unparseable_policies():
    # worst: the unparseable winner trajectory earns 0 and gets a negative advantage;
    # it is not counted as an opponent (loser ratios are over 2 parseable winners).
    aw, al, rw, rl = C.gcpo_advantages([8, None, 4], [6, 5, None], unparseable="worst")
    np.testing.assert_allclose(rw, [1.0, 0.0, 0.0])          # 8 beats 6,5 of 2 parseable
    np.testing.assert_allclose(rl, [0.5, 0.5, 0.0])          # 6<8 only, 5<8 only, None earns 0
    np.testing.assert_allclose(aw, [2 / 3, -1 / 3, -1 / 3])
    assert aw[1] < 0 and al[2] < 0                           # unparseable is pushed down
    # exclude: unparseable trajectories get advantage exactly 0 and leave the mean
    aw, al, rw, rl = C.gcpo_advantages([8, None, 4], [6, 5, None], unparseable="exclude")
    np.testing.assert_allclose(aw, [0.5, 0.0, -0.5])
    np.testing.assert_allclose(al, [0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="unparseable"):
        C.gcpo_ratios([1], [2], unparseable="random")


# ----------------------------------------------------------------------------- GRPO
def naive_grpo(rewards, g, ddof, eps):
    out = []
    for start in range(0, len(rewards), g):
        grp = rewards[start:start + g]
        mean = sum(grp) / g
        var = sum((x - mean) ** 2 for x in grp) / (g - ddof)
        sd = math.sqrt(var)
        out += [0.0 if max(grp) == min(grp) else (x - mean) / (sd + eps) for x in grp]
    return out


@FUZZ
@given(st.integers(2, 6), st.integers(1, 4), st.sampled_from(["population", "sample"]),
       st.data())
def test_grpo_matches_naive_loop(g, groups, std, data):
    rewards = data.draw(st.lists(st.integers(0, 10).map(float), min_size=g * groups,
                                 max_size=g * groups))
    adv = C.grpo_advantages(rewards, g, std=std, eps=1e-4)
    ref = naive_grpo(rewards, g, 1 if std == "sample" else 0, 1e-4)
    np.testing.assert_allclose(adv, ref, atol=1e-9)
    assert np.isfinite(adv).all()
    for start in range(0, len(adv), g):  # zero-sum per group
        assert abs(adv[start:start + g].sum()) < 1e-9


def test_grpo_hand_worked_and_options():
    # group [1, 2, 3, 6]: mean 3, population std sqrt((4+1+0+9)/4) = sqrt(3.5) = 1.8708
    adv = C.grpo_advantages([1, 2, 3, 6], 4, eps=0.0)
    np.testing.assert_allclose(adv, np.array([-2, -1, 0, 3]) / math.sqrt(3.5))
    # sample std: sqrt(14/3) = 2.1602
    adv = C.grpo_advantages([1, 2, 3, 6], 4, std="sample", eps=0.0)
    np.testing.assert_allclose(adv, np.array([-2, -1, 0, 3]) / math.sqrt(14 / 3))
    # global std: mean per group, one std over all 4 rewards [0, 2, 10, 12] -> sd = sqrt(26)
    adv = C.grpo_advantages([0, 2, 10, 12], 2, scope="global", eps=0.0)
    np.testing.assert_allclose(adv, np.array([-1, 1, -1, 1]) / math.sqrt(26))
    # all-equal group -> zeros, not NaN; clipping
    assert C.grpo_advantages([3, 3, 3], 3).tolist() == [0, 0, 0]
    adv = C.grpo_advantages([0] * 9 + [10], 10, clip=2.0)
    assert adv.max() == 2.0 and np.isclose(adv[:9], -1 / 3, atol=1e-3).all()


# ----------------------------------------------------------------------------- PPO
def test_ppo_ratio_one_is_plain_policy_gradient():
    torch.manual_seed(0)
    logp = torch.randn(3, 5, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.float)
    adv = torch.tensor([0.5, -1.0, 2.0])
    loss, stats = C.ppo_clip_loss(logp, logp.detach(), adv, mask)
    assert abs(loss.item() - (-adv.mean().item())) < 1e-6
    assert stats["clip_frac"] == 0.0 and stats["approx_kl"] == 0.0 and stats["ratio_mean"] == 1.0
    loss.backward()
    # d loss / d logp_{i,t} = -A_i / (B * T_i) on valid tokens, 0 on padding
    T = mask.sum(1)
    expected = -(adv / (3 * T))[:, None] * mask
    torch.testing.assert_close(logp.grad, expected)


def naive_ppo(logp, old, adv, mask, eps):
    per_seq = []
    for i in range(len(logp)):
        terms = []
        for t in range(len(logp[i])):
            if mask[i][t]:
                r = math.exp(logp[i][t] - old[i][t])
                rc = min(max(r, 1 - eps), 1 + eps)
                terms.append(-min(r * adv[i], rc * adv[i]))
        per_seq.append(sum(terms) / len(terms))
    return sum(per_seq) / len(per_seq)


def test_ppo_matches_naive_loop_and_token_averaging():
    g = torch.Generator().manual_seed(1)
    logp, old = torch.randn(4, 6, generator=g) * 0.3, torch.randn(4, 6, generator=g) * 0.3
    adv = torch.randn(4, generator=g)
    mask = (torch.rand(4, 6, generator=g) > 0.3).float()
    mask[:, 0] = 1
    loss, stats = C.ppo_clip_loss(logp, old, adv, mask, clip_eps=0.2)
    ref = naive_ppo(logp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), 0.2)
    assert abs(loss.item() - ref) < 1e-5
    assert 0 < stats["clip_frac"] < 1 and stats["approx_kl"] > 0
    # token averaging: one long sequence weighs more
    loss_tok, _ = C.ppo_clip_loss(logp, old, adv, mask, averaging="token")
    ratio = torch.exp(logp - old)
    per_tok = -torch.minimum(ratio * adv[:, None], ratio.clamp(0.8, 1.2) * adv[:, None])
    assert abs(loss_tok.item() - ((per_tok * mask).sum() / mask.sum()).item()) < 1e-5


def test_ppo_clipping_stops_gradient_past_the_trust_region():
    # ratio = e^0.5 = 1.65 > 1.2 with positive advantage: clipped, no gradient
    logp = torch.full((1, 2), 0.5, requires_grad=True)
    loss, stats = C.ppo_clip_loss(logp, torch.zeros(1, 2), torch.tensor([1.0]), torch.ones(1, 2))
    loss.backward()
    assert stats["clip_frac"] == 1.0 and torch.all(logp.grad == 0)
    assert abs(loss.item() + 1.2) < 1e-6


# ----------------------------------------------------------------------------- selection
def test_select_best_trajectory_tie_rules():
    mk = lambda pts, s: C.parse_rrm_output(C.format_rrm_output("r", pts, s))
    gold = [1, 0, 1, 1]
    trajs = [mk([1, 0, 1, 0], 5),       # acc 3/4, avg 2/4
             mk([1, 1, 1, 1], 9),       # acc 3/4, avg 4/4  <- wins the avg tie-break
             mk([1, 1, 1, 1], 9),       # identical to 1: lower index wins
             mk([0, 1, 0, 0], 10),      # acc 0
             C.parse_rrm_output("no score here")]  # never chosen
    assert C.select_best_trajectory(trajs, gold) == 1
    assert C.select_best_trajectory(trajs[3:], gold) == 0
    assert C.select_best_trajectory([C.parse_rrm_output("junk")], gold) is None
    # the final score breaks a tie on accuracy and average
    assert C.select_best_trajectory([mk([1, 0, 1, 0], 5), mk([1, 0, 1, 0], 6)], gold) == 1
    assert C.verification_accuracy([1, 0], [1, 0, 1]) is None


def test_weighted_aggregate():
    ps = [{"question": "a", "category": "follow"}, {"question": "b", "category": "follow"},
          {"question": "c", "category": "keep"}]
    parsed = C.parse_rrm_output(C.format_rrm_output("", [1, 0, 1], 3))
    # categories present: follow (mean 0.5) and keep (1.0); weights .5 and .3
    assert abs(C.aggregate_score(parsed, ps, "weighted") - 10 * (0.5 * 0.5 + 0.3) / 0.8) < 1e-9
    assert C.aggregate_score(parsed, ps[:2], "weighted") is None   # wrong count: no reward
    assert C.aggregate_score(C.parse_rrm_output("x")) is None
    with pytest.raises(ValueError):
        C.aggregate_score(parsed, ps, "median")


def test_deductions_aggregate():
    # every failed principle costs its category's points, each Keep in full however many there
    # are (weighted mode would charge one Keep of four 0.3 * 10 / 4); capped = min(<score>, that)
    from miniworld import world
    ps = [{"question": q, "category": c} for q, c in
          (("a", "follow"), ("b", "keep"), ("c", "keep"), ("d", "keep"), ("e", "keep"), ("f", "quality"))]
    score = lambda pts: C.aggregate_score(C.parse_rrm_output(C.format_rrm_output("", pts, 9.0)), ps, "deductions")
    assert score([1, 1, 1, 1, 1, 1]) == 10.0
    assert score([1, 0, 1, 1, 1, 1]) == 5.0 and score([1, 0, 0, 1, 1, 1]) == 0.0
    assert score([1, 1, 1, 1, 1, 0]) == 8.0
    assert score([0, 1, 1, 1, 1, 1]) == 6.0                      # a missed Follow (or a no-op: the points can't tell)
    for pts in itertools.product([0, 1], repeat=6):             # = the mini world's utility of the same
        assert score(list(pts)) == world.utility_from_verdicts(list(pts), ps, noop=False)   # verdicts (no no-op)
    custom = {"follow": 1.0, "keep": 1.0, "quality": 1.0}
    assert C.aggregate_score(C.parse_rrm_output(C.format_rrm_output("", [1, 0, 0, 1, 1, 1], 9.0)), ps,
                             "deductions", costs=custom) == 8.0
    capped = lambda pts, s: C.aggregate_score(C.parse_rrm_output(C.format_rrm_output("", pts, s)), ps, "capped")
    assert capped([1, 0, 1, 1, 1, 1], 8.2) == 5.0                # a generous score is capped by its own verdicts
    assert capped([0, 1, 1, 1, 1, 1], 1.3) == 1.3                # the score's no-op judgement survives
    assert capped([1, 1, 1, 1, 1, 1], 9.5) == 9.5
    for mode in ("deductions", "capped"):
        assert C.aggregate_score(C.parse_rrm_output(C.format_rrm_output("", [1, 1], 9.0)), ps, mode) is None
    bad_score = C.parse_rrm_output(C.format_rrm_output("", [1, 0, 1, 1, 1, 1], 11))   # points, but <score> 11
    assert bad_score["status"] == "out_of_range" and bad_score["points"] is not None
    assert C.aggregate_score(bad_score, ps, "capped") is None      # capped needs the score ...
    assert C.aggregate_score(bad_score, ps, "deductions") == 5.0   # ... deductions reads the points only


def test_follow_gate_scores_zero_when_every_follow_fails():
    """follow_gate: 0 exactly when the points fail every Follow principle, in every mode; else
    the mode's own score. With true verdicts, gated deductions is the mini world's utility of a
    no-op (0) and of any edit that meets a Follow; it differs only for a real edit that meets
    none (the points cannot tell it from a no-op)."""
    from miniworld import world
    ps = [{"question": q, "category": c} for q, c in
          (("a", "follow"), ("b", "follow"), ("c", "keep"), ("d", "keep"), ("e", "quality"))]
    for pts in itertools.product([0, 1], repeat=5):
        parsed = C.parse_rrm_output(C.format_rrm_output("", list(pts), 7.5))
        for mode in ("holistic", "weighted", "deductions", "capped"):
            gated = C.aggregate_score(parsed, ps, mode, follow_gate=True)
            assert gated == (0.0 if pts[0] == pts[1] == 0 else C.aggregate_score(parsed, ps, mode)), (pts, mode)
        gated = C.aggregate_score(parsed, ps, "deductions", follow_gate=True)
        if pts[0] == pts[1] == 0:
            assert gated == world.utility_from_verdicts(list(pts), ps, noop=True) == 0.0
        else:
            assert gated == world.utility_from_verdicts(list(pts), ps, noop=False)
    no_follow = ps[2:]
    parsed = C.parse_rrm_output(C.format_rrm_output("", [0, 0, 0], 2.0))
    assert C.aggregate_score(parsed, no_follow, follow_gate=True) == 2.0   # nothing to gate on
    assert C.aggregate_score(parsed, ps, follow_gate=True) is None           # wrong count of points
    assert C.aggregate_score(C.parse_rrm_output("<score>9</score>"), ps, follow_gate=True) is None  # no points
    with pytest.raises(ValueError):
        C.aggregate_score(parsed, no_follow, "median", follow_gate=True)


def test_noop_call_zeroes_a_called_noop_in_every_mode():
    """aggregate_score(noop_call=True): 0 when the reasoning says nothing changed, else the
    mode's own score. With true verdicts and a right call, deductions with the call IS the mini
    world's utility, no-ops included (what the Follow gate gets wrong for a failed attempt)."""
    from miniworld import world, sim
    ps = [{"question": q, "category": c} for q, c in
          (("a", "follow"), ("b", "follow"), ("c", "keep"), ("d", "keep"), ("e", "quality"))]
    for pts in itertools.product([0, 1], repeat=5):
        for noop in (False, True):
            reasoning = "changed: nothing. q1 ..." if noop else "changed: top left red circle -> green circle. q1 ..."
            parsed = C.parse_rrm_output(C.format_rrm_output(reasoning, list(pts), 7.5))
            assert parsed["says_unchanged"] == noop == sim.says_noop(reasoning)
            for mode in ("holistic", "weighted", "deductions", "capped"):
                plain = C.aggregate_score(parsed, ps, mode)
                assert C.aggregate_score(parsed, ps, mode, noop_call=True) == (0.0 if noop else plain), (pts, mode)
            assert C.aggregate_score(parsed, ps, "deductions", noop_call=True) == \
                world.utility_from_verdicts(list(pts), ps, noop=noop)
    # the pool's other wording, plain VLM phrasings; an answer without a score stays None
    for text in ("q1 left: want red, see green, no. nothing changed.", "No changes were made to the image.",
                 "The edited image looks identical to the original."):
        assert C.parse_rrm_output(text)["says_unchanged"], text
    for text in ("q1 left: want red, see red, yes. q2 other cells: want same, see same, yes.",
                 "The circle changed; nothing else changed.", None, ""):
        assert not C.parse_rrm_output(text)["says_unchanged"], text
    assert C.aggregate_score(C.parse_rrm_output("changed: nothing."), ps, "deductions", noop_call=True) is None
    assert C.aggregate_score(C.parse_rrm_output("changed: nothing. <score>4</score>"), noop_call=True) == 0.0


def test_reasoning_verdicts_replace_the_points_block_when_asked():
    """aggregate_score(verdicts="reasoning") prices the yes/no each reasoning line states, not
    the <points> block (session 18: the mini SFT-RRM's points differ from its own lines on 13%
    of them, often a Keep failure its line catches and its points pass); None when the
    reasoning does not give exactly one verdict per principle."""
    ps = [{"question": "a", "category": "follow"}, {"question": "b", "category": "keep"},
          {"question": "c", "category": "quality"}]
    reasoning = ("changed: top left red circle -> green circle. q1 top left: want green circle, see green circle, "
                 "yes. q2 bottom: want blue square, see empty, no. q3 noise: want none, see none, yes.")
    parsed = C.parse_rrm_output(C.format_rrm_output(reasoning, [1, 1, 1], 9.0), len(ps))
    assert parsed["points"] == [1, 1, 1] and parsed["reasoning_points"] == [1, 0, 1]
    assert C.aggregate_score(parsed, ps, "deductions") == 10.0
    assert C.aggregate_score(parsed, ps, "deductions", verdicts="reasoning") == 5.0       # the Keep line's "no"
    assert C.aggregate_score(parsed, ps, "deductions", noop_call=True, verdicts="reasoning") == 5.0
    assert C.aggregate_score(parsed, ps, "holistic", verdicts="reasoning") == 9.0         # <score> is untouched
    short = C.parse_rrm_output(C.format_rrm_output("q1 top left: want green, see green, yes.", [1, 1, 1], 9.0), 3)
    twice = C.parse_rrm_output(C.format_rrm_output(reasoning + " q2 again: yes.", [1, 1, 1], 9.0), 3)
    assert short["reasoning_points"] is None and twice["reasoning_points"] is None
    assert C.aggregate_score(short, ps, "deductions", verdicts="reasoning") is None
    assert C.parse_rrm_output(None)["reasoning_points"] is None
    with pytest.raises(ValueError, match="verdicts source"):
        C.aggregate_score(parsed, ps, "deductions", verdicts="think")


def test_verdict_probabilities_are_the_rrms_odds_of_1_against_0_at_each_digit(tiny_run):
    """verdict_probabilities: at each <points> digit of an answer, P("1") / (P("1") + P("0"))
    under the RRM, the answer teacher-forced; checked against the log-probs of the same
    answer written with that digit 1 and with it 0 (common.completion_logprobs). Priced with
    verdicts="probs", deductions is 10 - sum of cost x P(no); None without one digit per principle."""
    model, processor = C.load_rrm(tiny_run["base"])
    row = C.read_jsonl(os.path.join(tiny_run["run"], "data", "sft_think_verify.jsonl"))[0]
    ps, n = row["principles"], len(row["principles"])
    src, ed = C.load_image(row["source"]), C.load_image(row["edited"])
    req = [(src, ed, row["instruction"])]
    text = row["target"]
    soft = C.verdict_probabilities(model, processor, req, [ps], [text])[0]
    assert len(soft) == n and all(0.0 < q < 1.0 for q in soft)
    prompts = C.encode_prompts(processor, [C.verify_messages(row["instruction"], ps, "compact")], [[src, ed]])
    digits = [m.start(1) for m in C.POINT_VERDICT.finditer(text)]
    tok = processor.tokenizer
    for k in (0, n - 1):
        lp = {}
        for d in "01":
            t = text[:digits[k]] + d + text[digits[k] + 1:]
            ids, mask = C.tokenize_completions(processor, [t])
            offsets = tok(t, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
            j = next(i for i, (a, b) in enumerate(offsets) if a <= digits[k] < b)
            with torch.no_grad():
                lp[d] = C.completion_logprobs(model, prompts, ids, mask)[0, j].item()
        assert abs(soft[k] - math.exp(lp["1"]) / (math.exp(lp["1"]) + math.exp(lp["0"]))) < 1e-4
    parsed = dict(C.parse_rrm_output(text, n), soft_points=soft)
    by_hand = 10 - sum(C.DEFAULT_COSTS[p["category"]] * (1 - q) for p, q in zip(ps, soft))
    assert abs(C.aggregate_score(parsed, ps, "deductions", verdicts="probs") - min(10, max(0, by_hand))) < 1e-9
    assert C.verdict_probabilities(model, processor, req, [ps], ["<think>no points</think>"])[0] is None
    assert C.aggregate_score(C.parse_rrm_output("junk", n), ps, "deductions", verdicts="probs") is None


def test_gedit_scores():
    assert C.gedit_scores([8, 6], [9, 4]) == {"SC": 6.0, "PQ": 4.0, "O": math.sqrt(24)}
    assert C.gedit_scores(None, [9, 4])["O"] is None


# ----------------------------------------------------------------------------- parsers
def test_rrm_parser_formats():
    text = C.format_rrm_output("source: red circle. edited: green circle. q1 yes.", [1, 0, 1], 6.5)
    r = C.parse_rrm_output(text, n_principles=3)
    assert (r["status"], r["score"], r["points"], r["average"], r["flags"]) == \
        ("ok", 6.5, [1, 0, 1], 0.67, [])
    r = C.parse_rrm_output(text, n_principles=4)
    assert "points_count_mismatch" in r["flags"] and r["score"] == 6.5
    # the paper's malformed closing tag, and an inconsistent average
    r = C.parse_rrm_output('[{"question": "q", "score": 1}] average_score: 0.2 <score> 7 <\\score>')
    assert r["score"] == 7.0 and {"backslash_close_tag", "average_mismatch"} <= set(r["flags"])
    # two scores: the last one is the answer, flagged
    r = C.parse_rrm_output("<score>3</score> on reflection <score>4</score>")
    assert r["score"] == 4.0 and "multiple_scores" in r["flags"]
    for bad in ["<score>nan</score>", "<score>inf</score>", "<score></score>", "score: 7",
                "<score>7", "", "<score>1e999</score>"]:
        assert C.parse_rrm_output(bad)["score"] is None, bad
    assert C.parse_rrm_output("<score>-1</score>")["status"] == "out_of_range"
    assert C.parse_rrm_output("<score>10.5</score>")["status"] == "out_of_range"
    # non-binary points are rejected, not rounded
    assert C.parse_rrm_output('<points>[{"question": 1, "score": 0.5}]</points><score>5</score>')[
        "points"] is None


def test_principle_parser_validation():
    ok = C.parse_principles('[{"question": "Is it red?", "category": "Image Quality"}]')
    assert ok["principles"] == [{"question": "Is it red?", "category": "quality"}]
    for bad, why in [("[]", "empty"), ("no json", "no JSON"), ('[{"question": ""}]', "question"),
                     ('[{"question": "q", "category": "x"}]', "unknown category"),
                     ('["just a string"]', "not an object")]:
        r = C.parse_principles(bad)
        assert r["status"] == "error" and r["principles"] is None and why in r["reason"], (bad, r)


def test_inspector_and_judge_parsers():
    r = C.parse_inspector('prose {"gold": [{"question": 1, "gold": 1, "reason": "ok"},'
                          ' {"question": 2, "gold": 0, "reason": "no"},]} more', 2)
    assert r["gold"] == [1, 0] and r["reasons"] == ["ok", "no"]
    assert C.parse_inspector('{"gold": [{"gold": 2}]}', 1)["status"] == "error"
    assert C.parse_inspector('{"gold": [{"gold": true}]}', 1)["status"] == "error"
    assert C.parse_judge("{'reasoning': 'x', 'score': [3, 4]}")["scores"] == [3.0, 4.0]
    assert C.parse_judge('{"score": [3]}')["status"] == "error"
    assert C.parse_judge("nothing")["status"] == "error"


# ----------------------------------------------------------------------------- fuzzing
# Fragments a model might emit, recombined and mutated: the parsers must never raise and
# never produce a score that is not literally in the text.
FRAGMENTS = ["<think>", "</think>", "<score>", "</score>", "<\\score>", "<points>", "</points>",
             "[", "]", "{", "}", '"score": 1', '"score": 0', '"question": 1', ",", "7.5", "10",
             "-3", "nan", "average_score", ": 0.5", "'", '"', "\n", "```json", "```", "yes",
             '{"gold": [', '{"gold": 1}', "1e309", "\\", "<score>8</score>"]
model_text = st.one_of(
    st.text(max_size=300),
    st.lists(st.sampled_from(FRAGMENTS), max_size=40).map("".join),
    st.builds(lambda pts, s, cut, junk: C.format_rrm_output("r", pts, s)[:cut] + junk,
              st.lists(st.integers(0, 1), min_size=1, max_size=8), st.floats(0, 10),
              st.integers(0, 400), st.text(max_size=20)))


@FUZZ
@given(model_text)
def test_fuzz_rrm_parser(text):
    r = C.parse_rrm_output(text, n_principles=3)
    assert r["status"] in ("ok", "no_score", "out_of_range")
    if r["score"] is not None:
        assert r["status"] == "ok" and 0 <= r["score"] <= 10 and math.isfinite(r["score"])
        # no invented score: the number appears inside a <score> tag in the text
        assert "<score>" in text.lower()
        assert any(math.isclose(float(m), r["score"]) for m in C._SCORE_RE.findall(text))
    else:
        assert r["reason"]
    if r["points"] is not None:
        assert set(r["points"]) <= {0, 1}


@FUZZ
@given(model_text)
def test_fuzz_other_parsers(text):
    p = C.parse_principles(text)
    assert (p["status"] == "ok") == (p["principles"] is not None)
    if p["principles"]:
        assert all(x["category"] in C.CATEGORIES and x["question"] for x in p["principles"])
    i = C.parse_inspector(text, 2)
    assert i["gold"] is None or (len(i["gold"]) == 2 and set(i["gold"]) <= {0, 1})
    j = C.parse_judge(text)
    assert j["scores"] is None or all(0 <= v <= 10 for v in j["scores"])


@FUZZ
@given(st.lists(st.integers(0, 1), min_size=1, max_size=12), st.integers(0, 100).map(lambda v: v / 10),
       st.text(alphabet=st.characters(blacklist_characters="<>"), max_size=80))
def test_fuzz_roundtrip(points, score, reasoning):
    r = C.parse_rrm_output(C.format_rrm_output(reasoning, points, score), n_principles=len(points))
    assert r["status"] == "ok" and r["score"] == score and r["points"] == points
    assert "average_mismatch" not in r["flags"]


@FUZZ
@given(st.lists(st.fixed_dictionaries({
    "question": st.text(min_size=1, max_size=30).filter(str.strip),
    "category": st.sampled_from(list(C.CATEGORY_ALIASES) + ["Instruction Following"])}),
    min_size=1, max_size=10), st.sampled_from(["", "Here you go:\n```json\n", "prose "]))
def test_fuzz_principles_roundtrip(principles, prefix):
    text = prefix + json.dumps(principles) + ("\n```" if "```" in prefix else "")
    r = C.parse_principles(text)
    assert r["status"] == "ok"
    assert [p["category"] for p in r["principles"]] == [C.normalize_category(p["category"])
                                                        for p in principles]


def test_prompt_templates_have_image_slots_in_order():
    ps = [{"question": "Is the circle red?", "category": "follow"}]
    for msgs, n_images in [(C.verify_messages("x", ps), 2), (C.decompose_messages("x"), 1),
                           (C.inspector_messages("x", ps, ["t"]), 2),
                           (C.judge_sc_messages("x"), 2), (C.judge_pq_messages(), 1),
                           (C.scalar_messages("x"), 2)]:
        assert [m["role"] for m in msgs] == ["system", "user"]
        assert sum(c["type"] == "image" for c in msgs[1]["content"]) == n_images
    for variant in C.VERIFY_SYSTEMS:
        text = C.verify_messages("x", ps, variant)[1]["content"][-1]["text"]
        assert "1. [Instruction Following] Is the circle red?" in text
