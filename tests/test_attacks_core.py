import numpy as np
import pytest

from poisonlab.attacks import ATTACKS, get_attack
from poisonlab.errors import ConfigError, ParameterError


def test_random_flip_exact_indices_and_determinism(digits):
    tr, _ = digits
    a = get_attack("random_flip", rate=0.2)
    p1, r1 = a.poison(tr, seed=3)
    p2, r2 = a.poison(tr, seed=3)
    _, r3 = a.poison(tr, seed=4)
    assert np.array_equal(r1.indices, r2.indices) and not np.array_equal(r1.indices, r3.indices)
    assert len(r1.indices) == round(0.2 * len(tr))
    changed = np.nonzero(p1.labels != tr.labels)[0]
    assert np.array_equal(changed, r1.indices)  # every recorded label changed, nothing else
    assert np.array_equal(r1.original_labels, tr.labels[r1.indices])
    assert np.array_equal(p1.images, tr.images)
    assert np.array_equal(tr.labels, digits[0].labels)  # input untouched


def test_badnets_touches_exactly_recorded(digits):
    tr, te = digits
    a = get_attack("badnets", size=3, rate=0.1, target=2)
    p, r = a.poison(tr, seed=0)
    img_changed = np.nonzero((p.images != tr.images).reshape(len(tr), -1).any(1))[0]
    lab_changed = np.nonzero(p.labels != tr.labels)[0]
    assert set(img_changed) <= set(r.indices) and np.array_equal(lab_changed, r.indices)
    assert (p.labels[r.indices] == 2).all() and (r.original_labels != 2).all()
    # test-time trigger equals the training-time one
    trig = r.apply_trigger(tr.images[r.indices])
    assert np.array_equal(trig, p.images[r.indices])
    assert (p.images[r.indices][:, -3:, -3:, :] == round(0.85 * 255)).all()


def test_badnets_bb_preset():
    a = get_attack("badnets_bb")
    assert (a.size, a.intensity, a.rate, a.target) == (3, 1.0, 0.1, 0)


@pytest.mark.parametrize("name,params,match", [
    ("random_flip", {"rate": 0}, "rate must be in"),
    ("random_flip", {"rate": 1.5}, "rate must be in"),
    ("badnets", {"intensity": 2}, "intensity must be in"),
    ("badnets", {"corner": "middle"}, "corner must be one of"),
])
def test_bad_parameters_fail_at_construction(name, params, match):
    with pytest.raises(ParameterError, match=match):
        get_attack(name, **params)


def test_bad_parameters_for_the_data(digits):
    tr, _ = digits
    with pytest.raises(ParameterError, match="target=12 is not a class"):
        get_attack("badnets", target=12).poison(tr)
    with pytest.raises(ParameterError, match="does not fit in 8x8"):
        get_attack("badnets", size=9).poison(tr)
    with pytest.raises(ParameterError, match="fewer than one poisoned sample"):
        get_attack("random_flip", rate=0.0001).poison(tr)
    with pytest.raises(ConfigError, match="no parameter 'rat'"):
        get_attack("random_flip", rat=0.1)


def test_registry_lists_core_attacks():
    assert {"random_flip", "badnets", "badnets_bb"} <= set(ATTACKS.names())
