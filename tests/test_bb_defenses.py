"""BackdoorBench defences (issue 18): abl, anp, nad, i_bau, clp, ft_sam.

One BadNets model of a 2,000-image MNIST slice (3x3 white square, 10%, target 0) is trained once per
module; every defence must bring its ASR below 0.2 while keeping clean accuracy within the bound
given per test, and never modify the shared model. CLP, which this net's MNIST backdoor escapes, is
shown on the digits' one-pixel trigger instead. The trusted clean set is 10% of the slice
(200 images; BackdoorBench's 5% of 50,000 CIFAR-10 images is 2,500).
"""

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from poisonlab.attacks import get_attack
from poisonlab.defenses import DEFENSES, DefenseContext, get_defense
from poisonlab.defenses._bb_common import StageTap, conv_bn_pairs
from poisonlab.defenses.clp import channel_lipschitz
from poisonlab.defenses.ft_sam import sam_step
from poisonlab.defenses.i_bau import implicit_hypergradient
from poisonlab.defenses.nad import attention_map
from poisonlab.errors import ParameterError
from poisonlab.metrics import evaluate
from poisonlab.models import build_model
from poisonlab.training import TrainConfig, fit

NEW = ("abl", "anp", "nad", "i_bau", "clp", "ft_sam")


def _train(train, epochs=6, **kw):
    torch.manual_seed(0)
    m = build_model("fastnet", 1, 10, 28, *train.channel_stats(), widths=(16, 32, 64))
    fit(m, train, TrainConfig(epochs=epochs, batch_size=64, lr=0.05), seed=0)
    return m


@pytest.fixture(scope="module")
def victim(mnist_small):
    tr, te = mnist_small
    p, rec = get_attack("badnets", rate=0.1, size=3, intensity=1.0, target=0).poison(tr, seed=0)
    model = _train(p)
    before = evaluate(model, te, rec)
    assert before["asr"] > 0.95 and before["clean_acc"] > 0.95  # the backdoor is in
    clean = tr.subset(np.setdiff1d(np.arange(len(tr)), rec.indices)).stratified_subset(200, seed=0)
    return p, rec, model, clean, before


def _run(name, mnist_small, victim, **params):
    p, rec, model, clean, before = victim
    state = copy.deepcopy(model.state_dict())
    ctx = DefenseContext(train=p, model=model, test=mnist_small[1], train_model=_train, clean_set=clean,
                         poisoning=rec, seed=0)
    res = get_defense(name, **params).run(ctx)
    for k, v in model.state_dict().items():  # the shared poisoned model is never modified
        assert torch.equal(v, state[k]), k
    return res, evaluate(res.model, mnist_small[1], rec), before


# Budgets below are the test's (a CPU minute in total); "paper" marks the settings kept at the default.
@pytest.mark.parametrize("name,params,acc_drop", [
    # rho 2, adaptive (BackdoorBench), at the victim's own lr 0.05: at 0.01, 60 epochs left ASR 0.28
    ("ft_sam", {"epochs": 10, "batch_size": 32, "lr": 0.05}, 0.05),
    ("i_bau", {"batch_size": 32, "lr": 1e-3}, 0.05),                      # the authors' lr; 5 rounds, k=5
    # eps 0.4, alpha 0.2 (paper); the masks do not reach the paper's 0.2 in 300 iterations on this net
    # (docs/defenses.md), so prune by trusted-set accuracy: margin 0.05 there, + 3 points to the test set
    ("anp", {"iterations": 300, "batch_size": 64, "selection": "clean_accuracy"}, 0.08),
    # a teacher fine-tuned at lr 0.01 keeps this backdoor (ASR 1.0); at 0.05 with the crop-4 augmentation of
    # every fine-tune the clean accuracy fell 10.8 points, so lr 0.03; betas / 10: at
    # BackdoorBench's the attention gradient is 6-18x the cross-entropy's on this net and training collapses
    ("nad", {"batch_size": 64, "lr": 0.03, "betas": [50, 100, 100]}, 0.10),
    # LGA, 1% isolated, 20 unlearning epochs (paper) at gamma 0.1: MNIST's clean loss falls far below the
    # paper's CIFAR gamma 0.5. Precision of the isolated 1% after 10 epochs, defence seeds 0, 0, 1, 1, 2, 2
    # with float32 then bf16 loops: gamma 0.5 0.95/0.00/0.10/0.25/1.00/1.00, gamma 0.1 1.00/1.00/0.00/0.95/1.00/1.00
    # (1.0: 0 everywhere). No augmentation of the fine-tuning: 5 epochs of crop-4 MNIST left clean accuracy
    # 0.916-0.942 (the default's wiring is test_abl_fine_tunes_as_backdoorbench)
    ("abl", {"lr": 0.05, "batch_size": 64, "isolation_epochs": 10, "gamma": 0.1, "finetune_epochs": 5,
             "unlearning_epochs": 20, "augment": False}, 0.05),
])
def test_defence_removes_badnets(name, params, acc_drop, mnist_small, victim):
    res, after, before = _run(name, mnist_small, victim, **params)
    assert after["asr"] < 0.2 < before["asr"] - 0.7, (after["asr"], res.metrics)
    assert after["clean_acc"] > before["clean_acc"] - acc_drop, (after["clean_acc"], res.metrics)


def test_clp_removes_a_one_pixel_backdoor_without_data(digits):
    """CLP on the 8x8 digits with a one-pixel BadNets trigger (needs no clean data).

    At the paper's u = 3 CLP pruned one channel of these narrow nets and left the backdoor, on this
    victim and on the MNIST one above (ASR 1.0 after; at u = 1.5 on MNIST 0.64 or 0.02 depending on the
    thread count); u = 2, inside the range the paper sweeps, removes this one.
    """
    from helpers import train_small

    tr, te = digits
    p, rec = get_attack("badnets", rate=0.1, size=1, intensity=1.0, target=0).poison(tr, seed=0)
    model = train_small(p, epochs=6)
    before = evaluate(model, te, rec)
    ctx = DefenseContext(train=p, model=model, test=te, train_model=None, poisoning=rec, seed=0)
    res = get_defense("clp", u=2.0).run(ctx)
    after = evaluate(res.model, te, rec)
    assert after["asr"] < 0.2 < before["asr"] - 0.7
    assert after["clean_acc"] > before["clean_acc"] - 0.03
    paper = get_defense("clp").run(ctx).metrics  # u = 3 prunes a subset of u = 2's channels
    assert 0 < paper["pruned_channels"] < res.metrics["pruned_channels"]


def test_abl_fine_tunes_as_backdoorbench(mnist_small, monkeypatch):
    """ABL's fine-tuning: augmented (crop 4 on 28-pixel digits, no flip), lr a tenth after two thirds."""
    import poisonlab.defenses.abl as abl_module

    seen = []
    monkeypatch.setattr(abl_module, "fit", lambda model, data, cfg, **k: seen.append(cfg) or [])
    tr = mnist_small[0].subset(np.arange(300))
    torch.manual_seed(0)
    model = build_model("fastnet", 1, 10, 28, widths=(8, 8, 8))
    get_defense("abl", isolation_epochs=1, finetune_epochs=6, unlearning_epochs=1).run(
        DefenseContext(train=tr, model=model, test=tr, train_model=None))
    (cfg,) = seen
    assert (cfg.crop_padding, cfg.flip, cfg.schedule, cfg.step_milestones, cfg.step_factor) == (4, False, "step",
                                                                                                 (2 / 3,), 0.1)
    from poisonlab.training.loop import lr_factor
    per_epoch = [lr_factor(cfg, e * 10, 60) for e in range(6)]  # 10 steps an epoch
    assert per_epoch == [1, 1, 1, 1, 0.1, 0.1]


@pytest.mark.parametrize("name,params", [
    ("abl", {"isolation_epochs": 1, "finetune_epochs": 1, "unlearning_epochs": 1}),
    ("nad", {"teacher_epochs": 1, "epochs": 1}),
    ("ft_sam", {"epochs": 1}),
    ("anp", {"iterations": 2}),
    ("neural_cleanse", {"steps": 10, "epochs": 1}),
])
@pytest.mark.parametrize("bf16_units", [True, False])
def test_own_loops_follow_the_training_precision_rule(name, params, bf16_units, mnist_small, victim):
    """Every convolution a defence runs, in its own loops and in the fine-tunes it calls, is bfloat16 on a
    CPU with bf16 units (28x28 images: the training rule says bf16) and float32 on one without: a defence
    never mixes precisions, and its own loops are not left in float32 where training is not."""
    from unittest import mock

    model = victim[2]
    seen: set = set()
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    handles = [m.register_forward_hook(lambda mod, inp, out: seen.add(out.dtype)) for m in convs]
    try:  # the hooks travel with every deep copy the defence makes
        with mock.patch("poisonlab.training.device.fast_bf16", return_value=bf16_units):
            _run(name, mnist_small, victim, **params)
    finally:
        for h in handles:
            h.remove()
    assert seen == {torch.bfloat16 if bf16_units else torch.float32}


def test_registered():
    for name in NEW:
        assert name in DEFENSES.names()
        get_defense(name)  # defaults are valid


@pytest.mark.parametrize("name", ["anp", "clp"])
def test_batch_norm_defences_refuse_a_model_without_it(name, mnist_small, victim):
    p, rec, _, clean, _ = victim
    plain = build_model("mnist_cnn", 1, 10, 28)
    ctx = DefenseContext(train=p, model=plain, test=mnist_small[1], train_model=_train, clean_set=clean,
                         poisoning=rec, seed=0)
    with pytest.raises(ParameterError, match="batch.norm"):
        get_defense(name).run(ctx)


@pytest.mark.parametrize("model_name", ["fastnet", "vgg_like", "cnn3", "resnet18"])
def test_every_zoo_model_with_batch_norm(model_name, digits):
    """Each defence runs (tiny budgets) on each zoo model with batch norm, on 8x8 digits."""
    tr, te = digits
    small = tr.stratified_subset(200, seed=0)
    p, rec = get_attack("badnets", rate=0.1, size=2, intensity=1.0).poison(small, seed=0)
    torch.manual_seed(0)
    model = build_model(model_name, 1, 10, 8, *small.channel_stats())
    fit(model, p, TrainConfig(epochs=1, batch_size=64, lr=0.01), seed=0)
    ctx = DefenseContext(train=p, model=model, test=te, train_model=None, clean_set=small.subset(np.arange(60)),
                         poisoning=rec, seed=0)
    budgets = {"abl": {"isolation_epochs": 1, "finetune_epochs": 1, "unlearning_epochs": 1},
               "anp": {"iterations": 2}, "nad": {"teacher_epochs": 1, "epochs": 1},
               "i_bau": {"rounds": 1, "k": 2}, "clp": {}, "ft_sam": {"epochs": 1}}
    for name in NEW:
        out = get_defense(name, **budgets[name]).run(ctx).model
        assert np.isfinite(evaluate(out, te.subset(np.arange(50)), rec)["clean_acc"])


def test_stage_tap_finds_stage_outputs():
    x = torch.rand(2, 3, 32, 32)
    res = build_model("resnet18", 3, 10, 32)
    assert [s[1:] for s in StageTap(res, x, 3).shapes] == [(16, 16), (8, 8), (4, 4)]
    assert [s[0] for s in StageTap(res, x, 3).shapes] == [128, 256, 512]  # layer2-4, as in NAD
    fast = build_model("fastnet", 3, 10, 32)
    assert [s[1:] for s in StageTap(fast, x, 3).shapes] == [(15, 15), (7, 7), (3, 3)]
    vgg = build_model("vgg_like", 3, 10, 32)  # two resolutions only
    assert [s[1:] for s in StageTap(vgg, x, 3).shapes] == [(32, 32), (16, 16)]


def test_conv_bn_pairs_and_lipschitz_bound():
    m = build_model("resnet18", 3, 10, 32).eval()
    pairs = conv_bn_pairs(m, (32, 32, 3))
    assert len(pairs) == 20  # stem + 16 block convs + 3 shortcuts
    conv, bn = pairs[3]
    with torch.no_grad():
        bn.weight.uniform_(-2, 2)
        bn.running_var.uniform_(0.5, 2)
    lips = channel_lipschitz(conv, bn)
    k = 7
    w = conv.weight[k].reshape(conv.weight.shape[1], -1) * (bn.weight[k] / (bn.running_var[k] + bn.eps).sqrt()).abs()
    assert float(lips[k]) == pytest.approx(float(torch.linalg.svdvals(w.detach())[0]), rel=1e-4)


def test_attention_map_is_normalised():
    f = torch.randn(4, 8, 5, 5)
    am = attention_map(f)
    assert am.shape == (4, 1, 5, 5) and torch.allclose(am.flatten(1).norm(dim=1), torch.ones(4), atol=1e-4)
    assert torch.allclose(attention_map(3 * f), am, atol=1e-5)  # scale-free


def test_sam_step_with_zero_radius_is_plain_sgd():
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(4, 3))
    b = copy.deepcopy(a)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    loss = torch.nn.functional.cross_entropy
    sam_step(a, torch.optim.SGD(a.parameters(), lr=0.1), loss, x, y, rho=1e-12, adaptive=False)
    opt = torch.optim.SGD(b.parameters(), lr=0.1)
    loss(b(x), y).backward()
    opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6)


def test_implicit_hypergradient_on_a_quadratic():
    """Inner: delta* = argmin 0.5|delta - A theta|^2 = A theta; outer 0.5|delta|^2: d/dtheta = A^T A theta."""
    torch.manual_seed(0)
    a = torch.randn(3, 2)
    theta = torch.randn(2, requires_grad=True)

    def inner_map(d):
        return d - 0.5 * (d - a @ theta)

    got = implicit_hypergradient((a @ theta).detach(), [theta], inner_map, lambda d: 0.5 * (d ** 2).sum(), k=60)
    assert torch.allclose(got[0], a.T @ a @ theta.detach(), atol=1e-4)


@pytest.mark.parametrize("name,params,match", [
    ("abl", {"isolation_ratio": 0}, "isolation_ratio must be in"),
    ("abl", {"ascent": "sgd"}, "ascent must be one of"),
    ("anp", {"threshold": 1}, "threshold must be in"),
    ("anp", {"selection": "test_asr"}, "selection must be one of"),
    ("anp", {"eps": 2}, "eps must be in"),
    ("nad", {"betas": []}, "betas must be a list"),
    ("nad", {"betas": [1, -1]}, r"betas\[\] must be in"),
    ("i_bau", {"portion": 0}, "portion must be in"),
    ("clp", {"u": -1}, "u must be in"),
    ("ft_sam", {"rho": 0}, "rho must be in"),
    ("ft_sam", {"adaptive": "yes"}, "adaptive must be true or false"),
])
def test_bad_parameters_fail_at_construction(name, params, match):
    with pytest.raises(ParameterError, match=match):
        get_defense(name, **params)


REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("config", ["cifar10.toml", "digits_tiny.toml"])
def test_table_config_trains_each_poisoned_model_once(config, tmp_path):
    """The table's grid: one victim per attack and seed, shared by every defence (planning reads no data)."""
    from poisonlab.experiments import build_plan, load_config
    from poisonlab.experiments.cache import ArtifactCache

    cfg = load_config(REPO / "examples" / "backdoorbench" / config)
    assert {a.name for a in cfg.attacks} == {"badnets", "blended", "sig", "wanet"}
    assert {d.name for d in cfg.defenses} >= {"finetune", "fine_pruning", "neural_cleanse", "activation_clustering",
                                              "spectral_signatures", *NEW} - {"clp"}
    plan = build_plan(cfg, tmp_path / "o", ArtifactCache(tmp_path / "c"), estimate=False)
    n_attacks = len(cfg.attacks)  # badnets 10% and 1% are two variants
    attack_units = [u for u in plan.units if u.kind == "attack"]
    assert n_attacks == 5 and len(attack_units) == n_attacks * len(cfg.seeds)
    victims = [(u.cell.seed, u.attack.index) for u in attack_units]  # one poisoned model per attack and seed
    assert len(set(victims)) == len(victims)
    retraining = sum(1 for d in plan.defenses if d.retrains)  # AC, SS, ABL
    assert plan.trainings_needed == len(cfg.seeds) * (1 + n_attacks + retraining)
    defence_units = [u for u in plan.units if u.kind == "defenses"]
    assert len(defence_units) == len(cfg.seeds)  # all defences of BadNets 10% in one unit, one victim
    seeds_cfg = cfg.model_copy(update={"seeds": [1, 2], "defenses": []})
    plan2 = build_plan(seeds_cfg, tmp_path / "o2", ArtifactCache(tmp_path / "c"), estimate=False)
    assert plan2.trainings_needed == 2 * (1 + n_attacks)


def test_table_writer_puts_ours_beside_the_published():
    from helpers import load_benchmark

    bench = load_benchmark("backdoorbench")
    bad = "badnets(corner=bottom-right,intensity=1.0,rate=0.1,size=3,target=0)"
    rows = [{"attack": bad, "defense": "none", "seed": s, "clean_acc": a, "asr": 0.95, "robust_acc": 0.04}
            for s, a in ((0, "0.90"), (1, "0.92"))]
    rows += [{"attack": "sig(delta=0.15,frequency=6.0,rate=1.0,target=0)", "defense": "none", "seed": 0,
              "clean_acc": "0.88", "asr": "0.9", "robust_acc": "0.1"},
             {"attack": bad, "defense": "anp(iterations=2000)", "seed": 0, "clean_acc": "0.9", "asr": "0.02",
              "robust_acc": "0.85", "der": "0.96", "defense_seconds": "120"},
             {"attack": bad, "defense": "finetune(epochs=100)", "seed": 0, "error": "boom"}]
    table = bench.build_table(rows)
    lines = table.splitlines()
    assert any(ln.startswith("| BadNets | 10% | 91.82 | 91.00 ± 1.41 (n=2) | 93.79 | 95.00 ± 0.00 (n=2)") for ln in lines)
    assert any(ln.startswith("| SIG | 10% | 84.49 | 88.00 | 97.87 | 90.00") for ln in lines)  # rate 1.0 of a class
    assert "| ANP | 91.65 | 90.00 | 3.83 | 2.00 | 85.00 | 94.89 | 96.00 | 120 |" in lines
    assert any(ln.startswith("| FT | 90.29 | not measured yet") for ln in lines)  # a failed run is not a figure


def test_extra_only_runs_the_no_defence_rows_of_the_extra_seeds_alone(tmp_path, monkeypatch):
    """--extra-only: step 1 (the seed-0 grid with every defence) is not run; the seeds pass is, without
    defences and into OUT/seeds; asking for it with no extra seed is refused."""
    import poisonlab.experiments as experiments
    from helpers import load_benchmark

    bench = load_benchmark("backdoorbench")
    calls = []
    monkeypatch.setattr(experiments, "run_experiment", lambda cfg, out, *a, **k: calls.append((cfg, out)))
    bench.main(["--out", str(tmp_path), "--extra-only", "--extra-seeds", "1", "--dry-run", "--quiet"])
    assert len(calls) == 1
    cfg, out = calls[0]
    assert cfg.seeds == [1] and cfg.defenses == [] and out == tmp_path / "seeds"
    with pytest.raises(SystemExit):
        bench.main(["--out", str(tmp_path), "--extra-only", "--extra-seeds", "0", "--dry-run"])


def test_table_reads_the_abl_run_beside_the_table(tmp_path):
    """OUT/abl (ABL run alone) adds its defence row; its own no-defence row, seed 0's again, is not counted twice."""
    from helpers import load_benchmark

    bench = load_benchmark("backdoorbench")
    bad = "badnets(corner=bottom-right,intensity=1.0,rate=0.1,size=3,target=0)"
    head = "attack,defense,seed,clean_acc,asr,robust_acc,der,defense_seconds,error\n"
    none = f'"{bad}",none,0,0.93,0.96,0.03,,,\n'
    abl = f'"{bad}","abl(ascent=flooding)",0,0.8,0.01,0.79,0.97,9000,\n'
    for folder, body in (("table", none), ("abl", none + abl)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "results.csv").write_text(head + body)
    bench.main(["--out", str(tmp_path), "--table-only"])
    lines = (tmp_path / "table.md").read_text().splitlines()
    assert any(ln.startswith("| BadNets | 10% | 91.82 | 93.00 | 93.79 | 96.00 | 3.00 |") for ln in lines)  # n=1
    assert "| ABL | 80.10 | 80.00 | 0.00 | 1.00 | 79.00 | 91.03 | 97.00 | 9000 |" in lines


def test_defense_loops_benchmark_budgets_are_valid_and_a_bad_victim_is_refused(tmp_path):
    """benchmarks/defense_loops.py: every short budget it times builds its defence; a model whose meta.json
    is not a cached victim's stops with one sentence naming the file, before any data is read."""
    from helpers import load_benchmark

    bench = load_benchmark("defense_loops")
    assert {name for name, *_ in bench.SPEED_RUNS} == {"ft_sam", "neural_cleanse", "anp", "nad", "abl"}
    for name, params, _unit, units in bench.SPEED_RUNS:
        get_defense(name, **params)
        assert units >= 1
    (tmp_path / "meta.json").write_text('{"poisoning": {"attack": "no_such_attack", "params": {}}}')
    with pytest.raises(SystemExit, match="meta.json"):
        bench.main(["speed", "--model", str(tmp_path / "model.pt"), "--data-dir", str(tmp_path)])
