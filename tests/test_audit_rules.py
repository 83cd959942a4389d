"""The audit's evidence rules, each on a small case built so that the rule's answer is known."""

import numpy as np
import pytest

from poisonlab.audit import (class_excess, estimated_poisons, label_pair_shares, spectral_flags_in_clustered_classes,
                             suspicion_score, systematic_label_issues, systematic_pairs, trigger_cluster_flags)


def test_class_excess_and_estimated_poisons():
    labels = np.repeat([0, 1, 2, 3], [130, 100, 100, 90])
    counts, median, k = class_excess(labels)
    assert counts.tolist() == [130, 100, 100, 90] and median == 100 and k == 4
    # P poisons taken evenly from the 3 other classes inflate the target by P * 4 / 3 over the median
    assert estimated_poisons(40.0, 4) == 30 and estimated_poisons(-5.0, 4) == 0


def test_spectral_flags_follow_the_clusters_activation_clustering_found():
    labels = np.repeat([0, 1], 6)
    ac = np.zeros(12, bool)
    ac[[1, 2]] = True  # two images of class 0 in the small cluster, none of class 1
    ss = np.arange(12, dtype=float)  # highest spectral scores at the end of each class
    flags = spectral_flags_in_clustered_classes(labels, ss, ac)
    assert np.nonzero(flags)[0].tolist() == [4, 5]  # class 0's two highest; class 1 untouched


def _case(rng, sizes, cluster=None):
    labels = np.repeat(np.arange(len(sizes)), sizes)
    ac_flags = np.zeros(len(labels), bool)
    ac_scores = rng.random(len(labels)) * 0.1
    if cluster is not None:
        c, n = cluster
        idx = np.nonzero(labels == c)[0][:n]
        ac_flags[idx] = True
        ac_scores[idx] = 0.9 + rng.random(n) * 0.1
    return labels, ac_flags, ac_scores


def test_trigger_cluster_in_an_inflated_class_is_resized_to_the_excess():
    rng = np.random.default_rng(0)
    labels, ac, score = _case(rng, [140, 100, 100, 100], cluster=(0, 50))  # excess 40, cluster 50: in band
    rank = (rng.random(len(labels)), rng.random(len(labels)))
    flags, info = trigger_cluster_flags(labels, ac, score, rank)
    assert flags.sum() == estimated_poisons(40, 4) == 30
    assert set(np.nonzero(flags)[0]) <= set(np.nonzero(ac)[0])  # the highest-scoring members of the cluster
    assert info["0"] == {"excess_over_median_class": 40.0, "estimated_poisons": 30}


def test_cluster_without_excess_is_a_natural_sub_mode():
    rng = np.random.default_rng(1)
    labels, ac, score = _case(rng, [100, 100, 100, 100], cluster=(2, 30))
    flags, info = trigger_cluster_flags(labels, ac, score, (score, score))
    assert not flags.any() and info["2"]["suspicious"] is False
    # a band that admits it keeps nothing either: there is no excess to estimate the poisons from
    flags, _ = trigger_cluster_flags(labels, ac, score, (score, score), size_band=(0.0, 10.0))
    assert not flags.any()


def test_inflated_class_with_a_sub_mode_cluster_is_still_judged_by_its_excess():
    rng = np.random.default_rng(2)
    labels = np.repeat([0, 1, 2, 3, 4], [160, 100, 100, 100, 100])  # class 0 inflated by 60
    poisons = np.arange(60)
    ac = np.zeros(len(labels), bool)
    ac[140:160] = True  # a 20-image natural sub-mode of class 0: outside the 30-120 band of the excess
    ac_scores = np.where(ac, 0.5, -0.5)
    rank = rng.random(len(labels)) * 0.5
    rank[poisons] += 0.5  # the rank scores point at the poisons
    flags, info = trigger_cluster_flags(labels, ac, ac_scores, (rank, rank))
    n = info["0"]["estimated_poisons"]
    assert info["0"]["by_excess"] and flags.sum() == n and flags[poisons].sum() == n
    assert not flags[140:].any()


def test_inflated_class_without_a_cluster_is_flagged_by_rank():
    rng = np.random.default_rng(2)
    labels, ac, score = _case(rng, [100, 100, 180, 100])  # excess 80, far above 3 sqrt(100) = 30
    ss = np.where(labels == 2, np.arange(len(labels)), 0).astype(float)
    flags, info = trigger_cluster_flags(labels, ac, score, (ss, ss))
    n = estimated_poisons(80, 4)
    assert flags.sum() == n and np.nonzero(flags)[0].tolist() == np.nonzero(labels == 2)[0][-n:].tolist()
    assert info["2"]["by_excess"] is True
    # the same excess is not significant when the threshold is raised above it
    flags, info = trigger_cluster_flags(labels, ac, score, (ss, ss), min_excess_sigmas=10.0)
    assert not flags.any() and "by_excess" not in info["2"]


def test_systematic_label_issues_keep_pairs_and_near_certain_ones():
    k = 3
    labels = np.repeat([0, 1, 2], 10)
    suggested = labels.copy()
    issues = np.zeros(30, bool)
    issues[[0, 1, 2, 3]] = True
    suggested[[0, 1, 2, 3]] = 1  # 4 of class 0's 10 images suggested as 1: a systematic pair (40%)
    issues[15] = True
    suggested[15] = 2  # one scattered issue in class 1 ...
    probs = np.full((30, k), 1 / k)
    probs[15] = [0.0, 0.001, 0.999]  # ... that the model is all but certain about
    issues[25] = True
    suggested[25] = 0  # a scattered, unsure one
    mis, share, systematic = systematic_label_issues(labels, probs, issues, suggested, min_pair_share=0.3,
                                                     certain_confidence=0.995)
    assert np.nonzero(mis)[0].tolist() == [0, 1, 2, 3, 15]
    assert share[0, 1] == pytest.approx(0.4)
    assert systematic_pairs(share, systematic) == {"0": {"1": 0.4}}
    mis, _, _ = systematic_label_issues(labels, probs, issues, suggested, min_pair_share=0.5, certain_confidence=1.0)
    assert not mis.any()


def test_a_pair_is_systematic_only_where_it_holds_most_of_its_class_issues():
    # class 0 (100 images): 10 issues suggesting 1 and 10 spread over 2..5 -> the 0->1 pair holds 10% of the
    # class but only half of its issues (a natural confusion); class 6: 8 issues suggesting 7, 1 suggesting 8
    # -> 8% of the class and 89% of its issues (flips)
    labels = np.repeat([0, 1, 2, 3, 4, 5, 6, 7, 8], 100)
    suggested, issues = labels.copy(), np.zeros(len(labels), bool)
    for i, to in enumerate([1] * 10 + [2, 3, 4, 5] * 2 + [2, 3]):
        issues[i], suggested[i] = True, to
    for i, to in enumerate([7] * 8 + [8]):
        issues[600 + i], suggested[600 + i] = True, to
    probs = np.full((len(labels), 9), 1 / 9)
    share, conc = label_pair_shares(labels, issues, suggested, 9)
    assert share[0, 1] == pytest.approx(0.10) and conc[0, 1] == pytest.approx(0.5)
    assert share[6, 7] == pytest.approx(0.08) and conc[6, 7] == pytest.approx(8 / 9)
    assert conc[1].sum() == 0  # a class without issues
    mis, _, systematic = systematic_label_issues(labels, probs, issues, suggested, min_pair_share=0.06,
                                                 certain_confidence=0.995, min_pair_concentration=0.8)
    assert np.nonzero(systematic) == (np.array([6]), np.array([7]))
    assert np.nonzero(mis)[0].tolist() == list(range(600, 608))
    # without the concentration test, share alone takes the natural 0 -> 1 pair too
    mis, _, _ = systematic_label_issues(labels, probs, issues, suggested, min_pair_share=0.06,
                                        certain_confidence=0.995)
    assert np.nonzero(mis)[0].tolist() == list(range(10)) + list(range(600, 608))


def test_suspicion_score_ranks_flagged_above_unflagged():
    flagged = np.array([True, False, False])
    cl = np.array([0.0, 0.9, 0.2])
    ac = np.array([0.1, -0.5, 1.7])  # activation-clustering scores are clipped to [0, 1]
    s = suspicion_score(flagged, cl, ac)
    assert s.tolist() == [0.55, 0.45, 0.5] and s[0] > s[1:].max()


def test_why_suspect_names_the_evidence_of_each_kind():
    from poisonlab.audit import why_suspect

    names = ["plane", "car", "bird"]
    trig = why_suspect({"excess_over_median_class": 120.0, "small_share": 0.1, "silhouette": 0.42,
                        "estimated_poisons": 80}, names, n_trigger=80, n_mislabelled=0)
    assert "120 images more than the median class" in trig and "10% of the class" in trig and "80 images" in trig
    by_rank = why_suspect({"excess_over_median_class": 300.0, "by_excess": True}, names, 200, 0)
    assert "no clean cluster split" in by_rank and "200" in by_rank
    sub_mode = why_suspect({"excess_over_median_class": 0.0, "small_share": 0.2, "silhouette": 0.3,
                            "suspicious": False, "decided_by": "size+silhouette"}, names, 0, 0)
    assert "natural sub-mode" in sub_mode
    clean_label = why_suspect({"excess_over_median_class": -4.0, "small_share": 0.45, "silhouette": 0.28,
                               "top_axis_ratio": 4.43, "clean_label_ratio": 4.43}, names, 442, 0)
    assert "not inflated" in clean_label and "4.4x" in clean_label and "442 images" in clean_label
    pairs = why_suspect({"systematic_issues_to": {"2": 0.18}}, names, 0, 30)
    assert "18% of its images are confidently predicted as bird" in pairs
    assert why_suspect({"excess_over_median_class": 3.0, "small_share": 0.4, "silhouette": 0.1,
                        "suspicious": False, "decided_by": "silhouette"}, names, 0, 0) == ""


def test_trigger_evidence_shows_the_shared_patch_and_the_nearest_flags():
    from poisonlab.audit import AuditResult, trigger_evidence
    from poisonlab.data.imageset import ImageSet

    rng = np.random.default_rng(0)
    images = rng.integers(0, 120, size=(40, 8, 8, 3), dtype=np.uint8)
    labels = np.repeat([0, 1], 20)
    images[:6, -2:, -2:] = 255  # six class-0 images share a white corner patch
    finding = ["trigger" if i < 6 else "" for i in range(40)]
    ac = np.zeros(40)
    ac[:6] = [0.5, 0.9, 0.6, 0.8, 0.7, 0.95]
    data = ImageSet(images, labels, ["a", "b"])
    res = AuditResult(data=data, score=ac, flagged=ac > 0, finding=finding, reasons=[""] * 40,
                      suggested=labels, detector_scores={"activation_clustering": ac}, detector_flags={},
                      cv_pred_probs=np.eye(2)[labels], class_info={})
    views = trigger_evidence(res, nearest=3)
    assert [c for c, _, _ in views] == [0]
    _, diff, nearest = views[0]
    assert diff[-2:, -2:].min() > 200 > diff[:-2, :-2].max()  # the patch stands out, the rest averages out
    assert nearest.tolist() == [5, 1, 3]  # highest activation-clustering score first


def test_fold_recipe_picks_airnet_where_it_fits_and_keeps_probabilities_unsmoothed():
    from poisonlab.audit import AIRNET_MIN_SIDE, AuditConfig
    from poisonlab.errors import ParameterError

    name, recipe = AuditConfig().fold_recipe(32)
    assert (name, recipe.preset, recipe.epochs, recipe.label_smoothing) == ("airnet", "airbench_quick", 10, 0.0)
    name, recipe = AuditConfig().fold_recipe(AIRNET_MIN_SIDE - 1)
    assert name == "fastnet" and recipe.preset is None and recipe.optimizer == "sgd"
    name, recipe = AuditConfig(model="fastnet", epochs=3, batch_size=64).fold_recipe(32)
    assert (name, recipe.preset, recipe.epochs, recipe.batch_size) == ("fastnet", None, 3, 64)
    with pytest.raises(ParameterError, match="preset"):
        AuditConfig(preset="nope").check()
    with pytest.raises(ParameterError, match="batch_size"):
        AuditConfig(batch_size=0).check()


def test_unlearned_trigger_ranks_the_inflated_class_by_label_issue():
    from poisonlab.audit import unlearned_poisons

    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2, 3, 4], [160, 100, 100, 100, 100])  # class 0 inflated by 60
    poisons = np.arange(60)  # the first 60 of class 0: other classes' images, trigger not learnt
    issues = rng.random(len(labels)) < 0.05  # hard images everywhere
    issues[poisons] = True
    issue_scores = rng.random(len(labels)) * 0.5
    issue_scores[poisons] = 0.6 + 0.4 * rng.random(60)
    assert unlearned_poisons(labels, issues)[0] >= 50 and unlearned_poisons(labels, issues)[1:].max() <= 3
    ac_flags = np.zeros(len(labels), bool)
    ac_scores = rng.random(len(labels)) * 0.1  # no cluster
    rank = (rng.random(len(labels)), rng.random(len(labels)))
    flags, info = trigger_cluster_flags(labels, ac_flags, ac_scores, rank, issues=issues, issue_scores=issue_scores)
    n = info["0"]["estimated_poisons"]
    assert info["0"]["unlearned_poisons"] >= n / 2 and flags.sum() == n
    assert flags[poisons].sum() == min(n, 60) and not flags[160:].any()
    # without the label-issue evidence the same class is ranked by the (here uninformative) rank scores
    flags0, info0 = trigger_cluster_flags(labels, ac_flags, ac_scores, rank)
    assert "unlearned_poisons" not in info0["0"] and flags0[poisons].sum() < 0.5 * n
    # a half-learnt trigger: 20 of the 60 poisons are label issues (a third of the estimate) -> still
    # ranked by label issue; 2 of 60 (a learnt trigger's few issues) -> not
    for n_issue, fires in ((20, True), (2, False)):
        part = issues.copy()
        part[poisons[n_issue:]] = False
        _, inf = trigger_cluster_flags(labels, ac_flags, ac_scores, rank, issues=part, issue_scores=issue_scores)
        assert ("unlearned_poisons" in inf["0"]) == fires, (n_issue, inf["0"])


def test_a_half_learnt_trigger_is_found_from_its_unlearned_poisons_direction():
    """60 poisons in class 0: 30 the fold models did not learn (label issues), 30 they did (predicted as
    class 0, as surely as its clean images); all carry the trigger along one feature direction."""
    from poisonlab.audit import seeded_flags

    rng = np.random.default_rng(3)
    labels = np.repeat([0, 1, 2, 3, 4], [160, 100, 100, 100, 100])
    poisons, unlearnt = np.arange(60), np.arange(30)
    issues = rng.random(len(labels)) < 0.05
    issues[unlearnt] = True
    issues[30:60] = False
    issue_scores = rng.random(len(labels)) * 0.5
    issue_scores[unlearnt] = 0.6 + 0.4 * rng.random(30)
    whitened = rng.normal(size=(len(labels), 8))
    whitened[poisons, 0] += 3.0  # the trigger's direction
    ac_flags, ac_scores = np.zeros(len(labels), bool), rng.random(len(labels)) * 0.1
    rank = (rng.random(len(labels)), rng.random(len(labels)))
    common = dict(issues=issues, issue_scores=issue_scores, whitened=whitened)
    flags, info = trigger_cluster_flags(labels, ac_flags, ac_scores, rank, **common)
    n = info["0"]["estimated_poisons"]
    assert info["0"]["seeded_from_issues"] and flags.sum() == n and not flags[160:].any()
    assert flags[poisons].sum() >= min(n, 60) - 3  # the learnt half found along the seeds' direction
    old, old_info = trigger_cluster_flags(labels, ac_flags, ac_scores, rank, half_learnt="issues", **common)
    assert "seeded_from_issues" not in old_info["0"] and old[poisons].sum() <= 36  # only the unlearnt half
    # a class with no learnt part (every poison a label issue) is flagged from the issues as before
    all_issues = issues.copy()
    all_issues[poisons] = True
    scores = issue_scores.copy()
    scores[poisons] = 0.6 + 0.4 * rng.random(60)
    full, full_info = trigger_cluster_flags(labels, ac_flags, ac_scores, rank, issues=all_issues, issue_scores=scores,
                                            whitened=whitened)
    assert full[poisons].sum() == min(full_info["0"]["estimated_poisons"], 60)
    picked = seeded_flags(whitened[:160], issue_scores[:160], 30, 60)
    assert picked.sum() == 60 and picked[unlearnt].all() and picked[30:60].sum() >= 25  # clean images: noise


def test_split_that_matches_the_excess_ranks_by_cluster_even_with_a_low_silhouette():
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1, 2, 3, 4], [160, 100, 100, 100, 100])
    ac_scores = np.zeros(len(labels))
    ac_scores[:60] = 0.2 + 0.1 * rng.random(60)  # a small side of 60 (excess 60): the poisons
    ac_scores[60:160] = -0.1 * rng.random(100)
    rank = (rng.random(len(labels)), rng.random(len(labels)))
    flags, info = trigger_cluster_flags(labels, np.zeros(len(labels), bool), ac_scores, rank,
                                        split_sizes=np.array([60, 30, 0, 0, 0]))
    assert info["0"].get("split_matches_excess") and flags[:60].sum() == info["0"]["estimated_poisons"]
    assert not info["1"].get("suspicious", False) and not flags[160:].any()


def test_poison_side_picks_the_surer_side_when_both_fit_the_excess():
    from poisonlab.audit import poison_side

    ac = np.r_[np.full(50, 0.3), np.full(50, -0.3)]  # 50 / 50 split
    sure_big = np.r_[np.full(50, 0.3), np.full(50, 0.01)]  # 1 - p(given): the big side is predicted surely
    assert (poison_side(ac, sure_big, excess=50.0, size_band=(0.5, 2.0)) == -ac).all()
    sure_small = sure_big[::-1]
    assert (poison_side(ac, sure_small, 50.0, (0.5, 2.0)) == ac).all()
    assert (poison_side(ac, sure_big, 20.0, (0.5, 2.0)) == ac).all()  # sides too big for the excess: size decides
    assert (poison_side(ac, None, 50.0, (0.5, 2.0)) == ac).all()


def test_clean_label_cluster_is_found_by_its_dominant_axis_and_clean_folders_are_left_alone():
    from poisonlab.audit import clean_label_flags

    rng = np.random.default_rng(2)
    labels = np.repeat(np.arange(6), 100)
    ac_scores = np.where(rng.random(600) < 0.3, 0.2, -0.2)  # every class split 30/70
    issue_scores = rng.random(600) * 0.4
    sure = (labels == 5) & (ac_scores > 0)
    issue_scores[sure] = 0.01  # class 5's small side is predicted surely: a learnt clean-label trigger
    ratios = [1.4, 2.2, 1.1, 2.9, 1.6, 6.0]
    info = {str(c): {"top_axis_ratio": r} for c, r in enumerate(ratios)}
    flags, out = clean_label_flags(labels, ac_scores, issue_scores, info, min_ratio=3.1)
    assert np.array_equal(flags, sure) and out == {"5": {"clean_label_ratio": 6.0, "clean_label_flagged": int(sure.sum())}}
    # the same class already explained by another rule is skipped; a clean folder (no dominant axis) is left alone
    assert not clean_label_flags(labels, ac_scores, issue_scores, info, 3.1, skip={5})[0].any()
    calm = {str(c): {"top_axis_ratio": r} for c, r in enumerate([1.4, 2.2, 1.1, 2.9, 1.6, 2.0])}
    assert not clean_label_flags(labels, ac_scores, issue_scores, calm, 3.1)[0].any()


def test_top_axis_ratio_rises_where_half_a_class_shares_a_direction_the_others_do_not_vary_in():
    """Synthetic features: six Gaussian classes; in the poisoned folder half of class 5 is moved along one
    direction (a clean-label trigger). Whitened by the other classes, that direction dominates class 5
    alone; in the clean folder no class reaches the audit's default bar."""
    from poisonlab.audit import AuditConfig, run_detectors

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(6), 200)
    means = rng.normal(0, 3, (6, 32))
    clean = means[labels] + rng.normal(0, 1, (1200, 32))
    probs = np.full((1200, 6), 0.02)
    probs[np.arange(1200), labels] = 0.9
    bar = AuditConfig().clean_label_ratio
    info = run_detectors(labels, probs, clean.astype(np.float32), AuditConfig()).class_info
    assert max(info[str(c)]["top_axis_ratio"] for c in range(6)) < bar
    poisoned = clean.copy()
    idx = np.nonzero(labels == 5)[0][::2]
    poisoned[idx] += 6.0 * np.eye(32)[7]  # 6 within-class standard deviations
    info = run_detectors(labels, probs, poisoned.astype(np.float32), AuditConfig()).class_info
    assert info["5"]["top_axis_ratio"] >= bar
    assert max(info[str(c)]["top_axis_ratio"] for c in range(5)) < bar

def test_one_certain_label_issue_does_not_veto_the_clean_label_path():
    """A class holding one image the fold models are all but certain is another class (any class may)
    is still judged by the clean-label rule; it missed SIG on the audit suite's draw 103 before."""
    from poisonlab.audit import AuditConfig, combine_evidence

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(6), 200)
    feats = rng.normal(0, 3, (6, 32))[labels] + rng.normal(0, 1, (1200, 32))
    trig = np.nonzero(labels == 5)[0][::2]
    feats[trig] += 6.0 * np.eye(32)[7]
    probs = np.full((1200, 6), 0.02)
    probs[np.arange(1200), labels] = 0.9
    probs[trig] = np.eye(6)[5] * 0.99 + 0.002
    odd = np.nonzero(labels == 5)[0][1]
    probs[odd] = np.eye(6)[2] * 0.999 + 0.0002  # one certain label issue in class 5
    ev = combine_evidence(labels, probs, feats.astype(np.float32), AuditConfig())
    assert ev["finding"][odd] == "mislabelled"
    assert "clean_label_ratio" in ev["class_info"]["5"]
    flagged_trig = ev["flagged"][trig].mean()
    assert flagged_trig > 0.9 and ev["flagged"][labels != 5].sum() == 0
