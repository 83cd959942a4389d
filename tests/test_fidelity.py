"""Issue 17: attacks and defences faithful to their papers (fine-pruning after the residual add,
activation clustering's exclusionary reclassification, Koh & Liang influence, the attacks' settings)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from poisonlab.defenses.fine_pruning import ChannelMask, PrunePoint, layer_outputs, prune_point
from poisonlab.models import MODELS, Classifier, build_model


# ------------------------------------------------------------------ fine-pruning
def _masked(model: nn.Module, module: nn.Module, channels: torch.Tensor, x: torch.Tensor, read: nn.Module):
    """Output of ``read`` (called once per pass) with ``channels`` of ``module``'s output masked."""
    mask = ChannelMask(channels.numel())
    mask.mask.copy_(channels)
    h = module.register_forward_hook(mask)
    try:
        return layer_outputs(model, PrunePoint(module, "", read, 0, channels.numel()), x)
    finally:
        h.remove()


def _warm_batch_norm(model: nn.Module, x: torch.Tensor) -> None:
    """Give the batch norms non-trivial running statistics (a trained model's BN has them)."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x)
    model.eval()


def test_fine_pruning_zeroes_resnet18_channels_after_the_residual_add():
    torch.manual_seed(0)
    model = build_model("resnet18", 3, 10, 16)
    x = torch.rand(6, 3, 16, 16)
    _warm_batch_norm(model, x)
    last_block = model.body[-3]
    assert type(last_block).__name__ == "_BasicBlock"
    point = prune_point(model, x)
    assert point.layer_output is last_block and point.channels == 512
    keep = torch.ones(512)
    keep[torch.randperm(512)[:200]] = 0
    after_add = _masked(model, point.mask_module, keep, x, last_block)
    assert (after_add[:, keep == 0] == 0).all()  # exactly zero after the identity shortcut is added back
    assert (after_add[:, keep == 1] != 0).any()
    # the old mask point, the last conv's own batch norm, leaves the shortcut's signal in the pruned channels
    leak = _masked(model, last_block.bn2, keep, x, last_block)
    assert (leak[:, keep == 0] != 0).any()


class _PreActBlock(nn.Module):
    """Pre-activation residual block (He et al. 2016b): BN-ReLU-conv twice, then add the shortcut, no ReLU after."""

    def __init__(self, c: int):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1, bias=False)

    def forward(self, x):
        out = self.conv1(torch.relu(self.bn1(x)))
        return self.conv2(torch.relu(self.bn2(out))) + x


class _PreActNet(Classifier):
    """A pre-activation ResNet's tail: the last block's sum goes through a final BN + ReLU before pooling."""

    def __init__(self):
        super().__init__(3)
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), _PreActBlock(16), _PreActBlock(16),
                                  nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(16, 10)


def _probe(name: str) -> tuple[Classifier, torch.Tensor]:
    torch.manual_seed(0)
    if name == "preact_toy":
        model, x = _PreActNet(), torch.rand(6, 3, 16, 16)
    elif name == "mnist_cnn":
        model, x = build_model(name, 1, 10, 28), torch.rand(6, 1, 28, 28)
    else:
        model, x = build_model(name, 3, 10, 32), torch.rand(6, 3, 32, 32)
    if getattr(model, "needs_data_init", False):
        model.data_init(x)
    _warm_batch_norm(model, x)
    return model, x


@pytest.mark.parametrize("name", sorted(MODELS.names()) + ["preact_toy"])
def test_fine_pruning_mask_is_exact_at_the_layer_output_for_every_model(name):
    model, x = _probe(name)
    point = prune_point(model, x)
    keep = (torch.arange(point.channels) % 3 != 0).float()
    mask = ChannelMask(point.channels)
    mask.mask.copy_(keep)
    h = point.mask_module.register_forward_hook(mask)
    try:
        out = layer_outputs(model, point, x)
        feats = model.features(x)
    finally:
        h.remove()
    assert out.shape[1] == point.channels
    assert (out[:, keep == 0] == 0).all() and (out[:, keep == 1] != 0).any()
    if name == "preact_toy":  # the final BN + ReLU after the last block is part of the layer
        assert point.layer_output is model.body[4]
        assert (feats[:, keep == 0] == 0).all()
    unmasked = layer_outputs(model, point, x)
    assert (unmasked[:, keep == 0] != 0).any()  # the hook is gone: the channels carry signal again


def test_fine_pruning_defence_on_resnet18_keeps_pruned_channels_silent(digits):
    from poisonlab.defenses import DefenseContext, get_defense

    tr, te = digits
    torch.manual_seed(0)
    model = build_model("resnet18", 1, 10, 8)
    clean = tr.stratified_subset(200, seed=0)

    def no_training(*a, **k):
        raise AssertionError("fine-pruning does not retrain from scratch")

    ctx = DefenseContext(train=tr, model=model, test=te, train_model=no_training, clean_set=clean, seed=0)
    res = get_defense("fine_pruning", margin=0.5, max_fraction=0.5, epochs=1, batch_size=64).run(ctx)
    m = res.metrics
    assert m["layer_output"] == "body.10" and m["channels"] == 512
    assert m["pruned_channels"] > 0 and m["pruned_output_max_abs"] == 0.0


# ------------------------------------------------------------------ activation clustering
def test_exclusionary_reclassification_rule_on_a_synthetic_case():
    from poisonlab.defenses.filters.activation_clustering import exclusionary_reclassification

    # a poison cluster labelled 3: the model trained without it sends most members to their source class 5
    poison = exclusionary_reclassification(np.array([5] * 30 + [3] * 8 + [1] * 2), label=3)
    assert (poison.l, poison.p, poison.source_class, poison.n) == (8, 30, 5, 40)
    assert poison.poisoned and poison.ratio == pytest.approx(8 / 30, abs=1e-4)
    # a natural sub-mode of class 3: most members come back as 3
    legit = exclusionary_reclassification(np.array([3] * 30 + [5] * 6 + [8] * 4), label=3)
    assert not legit.poisoned and legit.ratio == pytest.approx(5.0) and legit.source_class == 5
    # nothing points away from the label: legitimate, no ratio
    all_back = exclusionary_reclassification(np.array([3] * 12), label=3)
    assert not all_back.poisoned and all_back.ratio is None and all_back.source_class is None
    # the threshold T decides the borderline: l / p = 1
    tie = np.array([3] * 10 + [5] * 10)
    assert not exclusionary_reclassification(tie, 3, threshold=1.0).poisoned
    assert exclusionary_reclassification(tie, 3, threshold=1.5).poisoned


def test_size_silhouette_verdict_names_the_deciding_rule():
    from poisonlab.defenses.filters.activation_clustering import ClassSplit, size_silhouette_verdict

    def split(share, sil):
        return ClassSplit(0, np.arange(4), np.array([True, False, False, False]), share, sil)

    assert size_silhouette_verdict(split(0.5, 0.9), 0.1, 10, 0.35, 0.25, True) == (False, "size")
    assert size_silhouette_verdict(split(0.2, 0.1), 0.05, 10, 0.35, 0.25, True) == (False, "silhouette")
    assert size_silhouette_verdict(split(0.2, 0.3), 0.4, 10, 0.35, 0.25, True) == (False, "relative_silhouette")
    assert size_silhouette_verdict(split(0.2, 0.5), 0.3, 10, 0.35, 0.25, True) == (
        True, "size+silhouette+relative_silhouette")
    assert size_silhouette_verdict(split(0.2, 0.3), 0.4, 10, 0.35, 0.25, False) == (True, "size+silhouette")


# ------------------------------------------------------------------ influence (Koh & Liang)
def _fit_softmax_regression(x: torch.Tensor, y: torch.Tensor, lam: float, n: int, w0=None) -> nn.Linear:
    """argmin (1/n) sum CE + lam/2 ||theta||^2 (weights and bias), float64, L-BFGS to a tight tolerance.

    ``n`` is fixed by the caller: leaving a sample out keeps the 1/n, which is exactly Koh & Liang's
    upweighting by -1/n.
    """
    lin = nn.Linear(x.shape[1], int(y.max()) + 1).double()
    if w0 is not None:
        lin.load_state_dict(w0)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(lin(x), y, reduction="sum") / n
        loss = loss + lam / 2 * sum(p.pow(2).sum() for p in lin.parameters())
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    return lin


def test_influence_equals_leave_one_out_retraining_on_a_convex_last_layer(digits):
    """Koh & Liang's influence on a softmax regression over fixed features: -I_up,loss / n predicts the
    change of the test loss when one training sample is left out and the layer retrained to optimum."""
    from poisonlab.defenses.filters.influence import influence_scores

    torch.manual_seed(0)
    tr, te = digits
    sub = tr.stratified_subset(300, seed=0)
    x = torch.from_numpy(sub.images.reshape(len(sub), -1) / 255.0)
    y = torch.from_numpy(sub.labels.astype(np.int64))
    lam = 0.01
    n = len(sub)
    lin = _fit_softmax_regression(x, y, lam, n)
    xt = torch.from_numpy(te.images.reshape(len(te), -1) / 255.0)
    yt = torch.from_numpy(te.labels.astype(np.int64))
    with torch.no_grad():
        losses = nn.functional.cross_entropy(lin(xt), yt, reduction="none")
    protect = torch.argsort(losses, descending=True)[:3]  # three test points the layer gets most wrong
    scores = influence_scores(lin, x.numpy(), y.numpy(), xt[protect].numpy(), yt[protect].numpy(), damping=lam)
    order = np.argsort(-scores)
    check = np.concatenate([order[:5], order[-5:], np.random.default_rng(0).choice(order[5:-5], 5, replace=False)])

    def test_loss(layer):
        with torch.no_grad():
            return float(nn.functional.cross_entropy(layer(xt[protect]), yt[protect], reduction="sum"))

    base = test_loss(lin)
    actual, predicted = [], []
    for i in check:
        keep = torch.ones(n, dtype=torch.bool)
        keep[int(i)] = False
        loo = _fit_softmax_regression(x[keep], y[keep], lam, n, w0=lin.state_dict())
        actual.append(test_loss(loo) - base)
        predicted.append(-scores[i] / n)
    actual, predicted = np.array(actual), np.array(predicted)
    from scipy.stats import spearmanr

    assert np.corrcoef(actual, predicted)[0, 1] > 0.99, (actual, predicted)
    assert spearmanr(actual, predicted).correlation > 0.95
    assert np.argmin(actual) == np.argmin(predicted)  # the most harmful sample is the one removal helps most
    assert (np.sign(actual[:5]) == -1).all() and (np.sign(actual[5:10]) == 1).all()


class _Scale(nn.Module):
    def forward(self, x):
        return x / 9  # fastnet's head ends in a fixed scale like this


@pytest.mark.parametrize("bias", [True, False])
def test_last_layer_hessian_equals_autograd_hessian(bias):
    from poisonlab.defenses.filters.influence import last_layer_hessian

    torch.manual_seed(0)
    lin = nn.Linear(5, 3, bias=bias)
    head = nn.Sequential(lin, _Scale())
    rng = np.random.default_rng(0)
    feats, labels = rng.normal(size=(40, 5)), rng.integers(0, 3, 40)
    x, y = torch.from_numpy(feats), torch.from_numpy(labels)
    theta0 = torch.cat([lin.weight.detach().double(), lin.bias.detach().double()[:, None]], 1) if bias \
        else lin.weight.detach().double()

    def risk(theta):
        w = theta[:, :5]
        logits = x @ w.T + (theta[:, 5] if bias else 0)
        return nn.functional.cross_entropy(logits / 9, y)

    expected = torch.autograd.functional.hessian(risk, theta0).reshape(theta0.numel(), theta0.numel())
    got = last_layer_hessian(head, feats, labels, batch_size=16)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------ label-consistent (Turner et al.)
def test_turner_trigger_is_the_released_pattern():
    from poisonlab.attacks.label_consistent import CornerPatternTrigger

    # the released code's "all-corners" trigger: ((row, col), +1 white / -1 black)
    released = [((0, 0), 1), ((0, 1), -1), ((0, 2), -1), ((1, 0), -1), ((1, 1), 1), ((1, 2), -1), ((2, 0), 1),
                ((2, 1), -1), ((2, 2), 1), ((-1, 0), 1), ((-1, 1), -1), ((-1, 2), 1), ((-2, 0), -1), ((-2, 1), 1),
                ((-2, 2), -1), ((-3, 0), 1), ((-3, 1), -1), ((-3, 2), -1), ((0, -1), 1), ((0, -2), -1),
                ((0, -3), -1), ((1, -1), -1), ((1, -2), 1), ((1, -3), -1), ((2, -1), 1), ((2, -2), -1),
                ((2, -3), 1), ((-1, -1), 1), ((-1, -2), -1), ((-1, -3), 1), ((-2, -1), -1), ((-2, -2), 1),
                ((-2, -3), -1), ((-3, -1), 1), ((-3, -2), -1), ((-3, -3), -1)]
    expected = np.zeros((32, 32))
    for (r, c), v in released:
        expected[r, c] = v
    signs = CornerPatternTrigger(3, 1.0, "all", "turner").signs((32, 32, 3))[..., 0]
    assert np.array_equal(signs, expected)
    assert np.array_equal(signs, signs[:, ::-1])  # survives a horizontal flip
    bottom_right = CornerPatternTrigger(3, 1.0, "bottom-right", "turner").signs((32, 32, 3))[..., 0]
    assert np.array_equal(bottom_right[-3:, -3:], expected[-3:, -3:]) and (bottom_right != 0).sum() == 9
    # reduced amplitude adds +-amplitude*255 and clips, as the released code does
    x = np.full((1, 32, 32, 3), 250, np.uint8)
    y = CornerPatternTrigger(3, 32 / 255, "all", "turner").apply(x).astype(int)
    assert set(np.unique(y[0, -3:, -3:])) == {218, 255} and (y[0, 5:-5, 5:-5] == 250).all()


def test_pgd_batch_transform_inside_fit(digits):
    """fit() hands every augmented batch to batch_transform; the PGD transform returns examples within eps
    that the current model gets more wrong, and leaves every module's train/eval mode as it found it."""
    from poisonlab.attacks.label_consistent import pgd_batch_transform
    from poisonlab.training import TrainConfig, fit

    tr, _ = digits
    torch.manual_seed(0)
    model = build_model("fastnet", 1, 10, 8, widths=(16, 32, 64))
    fit(model, tr, TrainConfig(epochs=2, batch_size=64, lr=0.1), seed=0)
    eps = 16 / 255
    pgd = pgd_batch_transform(eps, 3, eps / 2, generator=torch.Generator().manual_seed(0))
    seen = []

    def spy(m, x, y):
        modes = [mod.training for mod in m.modules()]
        adv = pgd(m, x, y)
        assert [mod.training for mod in m.modules()] == modes and m.training and not m.body.training
        with torch.no_grad():
            ce = nn.functional.cross_entropy
            m.eval()
            seen.append(((adv - x).abs().max().item(), ce(m(adv), y).item() - ce(m(x), y).item()))
            for mod, mode in zip(m.modules(), modes):
                mod.training = mode
        return adv

    fit(model, tr, TrainConfig(epochs=1, batch_size=256, lr=0.01), seed=0, freeze_body=True, batch_transform=spy)
    assert len(seen) == -(-len(tr) // 256)  # once per batch
    assert max(d for d, _ in seen) <= eps + 1e-6 and all(gain > 0 for _, gain in seen)


def test_label_consistent_adversarial_surrogate_is_recorded_and_repeatable(digits):
    from poisonlab.attacks import AttackContext, get_attack
    from poisonlab.training import TrainConfig, fit

    tr, te = digits
    torch.manual_seed(0)
    clean = build_model("fastnet", 1, 10, 8, widths=(16, 32, 64))
    fit(clean, tr, TrainConfig(epochs=2, batch_size=64, lr=0.1), seed=0)
    a = get_attack("label_consistent", rate=0.3, target=3, eps=16 / 255, steps=3, step_size=8 / 255, trigger_size=2,
                   pattern="checkerboard", surrogate_epochs=1, surrogate_eps=16 / 255, surrogate_steps=2,
                   surrogate_step_size=8 / 255, surrogate_lr=0.05)
    state = {k: v.clone() for k, v in clean.state_dict().items()}
    ctx = AttackContext(test=te, clean_model=clean)
    p, r = a.poison(tr, seed=0, context=ctx)
    assert all(torch.equal(v, clean.state_dict()[k]) for k, v in state.items())  # the clean model is a template
    info = r.extra["surrogate"]
    assert info["init"] == "scratch" and info["epochs"] == 1 and info["steps"] == 2 and info["seconds"] > 0
    assert np.array_equal(p.labels, tr.labels)
    p2, _ = a.poison(tr, seed=0, context=ctx)
    assert np.array_equal(p.images, p2.images)  # the adversarial training is seeded too
    r3 = get_attack("label_consistent", rate=0.3, target=3, trigger_size=2, pattern="checkerboard",
                    surrogate="clean", steps=3, eps=16 / 255).poison(tr, seed=0, context=ctx)[1]
    assert "not adversarially trained" in r3.extra["surrogate"]["init"]


# ------------------------------------------------------------------ targeted attacks
def test_gradient_matching_defaults_are_the_papers_and_the_best_restart_is_kept(digits):
    from poisonlab.attacks import AttackContext, get_attack
    from poisonlab.training import TrainConfig, fit

    p = get_attack("gradient_matching").params()
    assert (p["budget"], p["epsilon"], p["steps"], p["restarts"], p["tau"], p["batch_size"]) == (
        0.01, 16 / 255, 240, 8, 0.1, 512)
    tr, te = digits
    torch.manual_seed(0)
    model = build_model("fastnet", 1, 10, 8, widths=(16, 32, 64))
    fit(model, tr, TrainConfig(epochs=2, batch_size=64, lr=0.1), seed=0)
    a = get_attack("gradient_matching", budget=0.02, target_class=8, adversarial_class=4, steps=4, restarts=3,
                   batch_size=10, bf16=False)
    poisoned, r = a.poison(tr, seed=0, context=AttackContext(test=te, clean_model=model))
    runs = r.extra["restart_alignments"]
    assert len(runs) == 3 and r.extra["restart_chosen"] == int(np.argmax(runs))
    assert r.extra["alignment_last"] == max(runs) and r.extra["shift"] == 1 and r.extra["bf16"] is False
    diff = np.abs(poisoned.images.astype(int) - tr.images.astype(int))
    assert diff.max() <= 16 and (tr.labels[r.indices] == 4).all()


def test_gradient_matching_can_match_a_label_smoothed_victims_gradient(digits):
    """label_smoothing (not in the paper, default 0) crafts against the gradient of the label-smoothed loss
    the victim trains on: (1 - a) CE + a * mean over classes of -log p; out of [0, 1) it is refused."""
    from poisonlab.attacks import AttackContext, get_attack
    from poisonlab.attacks.gradient_matching import _param_grad
    from poisonlab.errors import ParameterError
    from poisonlab.training import TrainConfig, fit

    assert get_attack("gradient_matching").params()["label_smoothing"] == 0.0
    for bad in (-0.1, 1.0):
        with pytest.raises(ParameterError, match="label_smoothing"):
            get_attack("gradient_matching", label_smoothing=bad)
    tr, te = digits
    torch.manual_seed(0)
    model = build_model("fastnet", 1, 10, 8, widths=(16, 32, 64))
    fit(model, tr, TrainConfig(epochs=2, batch_size=64, lr=0.1), seed=0)
    model.eval()
    params = [q for q in model.parameters() if q.requires_grad]
    x = torch.rand(6, 1, 8, 8)
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    got = _param_grad(model, x, y, params, False, create_graph=False, label_smoothing=0.2)
    logp = torch.log_softmax(model(x), 1)
    manual = (0.8 * nn.functional.nll_loss(logp, y) - 0.2 * logp.mean(1).mean())
    want = torch.autograd.grad(manual, params)
    plain = _param_grad(model, x, y, params, False, create_graph=False)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    assert any(not torch.allclose(g, q) for g, q in zip(got, plain))
    ctx = AttackContext(test=te, clean_model=model)
    kw = dict(budget=0.02, target_class=8, adversarial_class=4, steps=3, restarts=1, batch_size=16, bf16=False)
    _, ra = get_attack("gradient_matching", **kw).poison(tr, seed=0, context=ctx)
    _, rb = get_attack("gradient_matching", label_smoothing=0.2, **kw).poison(tr, seed=0, context=ctx)
    # the crafting objective differs (the signed steps may still round to the same pixels in 3 steps)
    assert ra.extra["alignment_per_step"] != rb.extra["alignment_per_step"]


def test_nn_flip_feature_spaces_and_metrics(digits):
    from poisonlab.attacks import AttackContext, get_attack
    from poisonlab.attacks.targeted_flip import neighbour_distances
    from poisonlab.training import TrainConfig, fit

    f = np.array([[1.0, 0.0], [2.0, 0.1], [0.0, 3.0]])
    np.testing.assert_allclose(neighbour_distances(f, np.array([4.0, 0.0])), [3.0, np.sqrt(4.01), 5.0])
    cos = neighbour_distances(f, np.array([4.0, 0.0]), "cosine")
    assert cos[0] == pytest.approx(0.0) and cos[2] == pytest.approx(1.0)  # direction only, not the norm
    tr, te = digits
    torch.manual_seed(0)
    model = build_model("fastnet", 1, 10, 8, widths=(16, 32, 64))
    fit(model, tr, TrainConfig(epochs=2, batch_size=64, lr=0.1), seed=0)
    ctx = AttackContext(test=te, clean_model=model)
    _, rp = get_attack("nn_flip", k=30, feature_space="pixels").poison(tr, seed=0, context=ctx)
    t = int(rp.target_indices[0])
    d = np.sqrt(((tr.images.reshape(len(tr), -1).astype(float) - te.images[t].reshape(-1)) ** 2).sum(1))
    d[tr.labels == 5] = np.inf
    assert np.array_equal(rp.indices, np.sort(np.argsort(d, kind="stable")[:30]))
    assert rp.extra["feature_space"] == "pixels"
    _, rc = get_attack("nn_flip", k=30, metric="cosine").poison(tr, seed=0, context=ctx)
    _, re = get_attack("nn_flip", k=30).poison(tr, seed=0, context=ctx)
    assert rc.target_indices[0] == re.target_indices[0] == t and not np.array_equal(rc.indices, rp.indices)
