"""The plug-in contract over the whole catalogue: every registered attack and defence, plug-ins included.

The parameter lists come from the registries when the tests are collected, so an attack or a
defence added by anyone is checked without touching this file.
"""

import numpy as np
import pytest
import torch

from poisonlab.attacks import ATTACKS, Attack, Poisoning
from poisonlab.contract import ContractError, check_attack, check_defense, check_recorded_indices
from poisonlab.data import ImageSet, load_dataset
from poisonlab.defenses import DEFENSES

SIZE = 32  # digits enlarged to the 32x32x3 shape the catalogue's defaults are written for


def _enlarged(split: str, n: int) -> ImageSet:
    """A stratified digits slice, each 8x8 image repeated to 32x32 and 3 channels (digits stay digits)."""
    d = load_dataset("digits", split).stratified_subset(n, seed=0)
    x = np.repeat(np.repeat(d.images, SIZE // 8, axis=1), SIZE // 8, axis=2).repeat(3, axis=3)
    return ImageSet(x, d.labels, d.classes, name=f"digits-{SIZE}")


@pytest.fixture(scope="module")
def slice_and_model():
    from poisonlab.models import build_model_for
    from poisonlab.training import TrainConfig, fit

    train, test = _enlarged("train", 300), _enlarged("test", 200)

    def train_fn(data: ImageSet, **_):
        torch.manual_seed(0)
        model = build_model_for("fastnet", data, widths=(16, 32, 64))
        fit(model, data, TrainConfig(epochs=4, batch_size=32, lr=0.05))
        return model

    return train, test, train_fn(train), train_fn


@pytest.mark.parametrize("name", ATTACKS.names())
def test_attack_contract(name, slice_and_model):
    train, test, clean, train_fn = slice_and_model
    check_attack(name, train, test, clean_model=clean, train_fn=train_fn)


@pytest.mark.parametrize("name", DEFENSES.names())
def test_defense_contract(name):
    check_defense(name)


def test_the_contract_catches_what_it_promises(digits):
    """A parameter not stored under its name, a wrong record and an uncachable trigger are each refused."""
    from poisonlab.contract import check_parameters, check_trigger_cache

    class Forgetful(Attack):
        def __init__(self, rate: float = 0.1, size: int = 2):
            self.rate = rate
            self.patch = size  # stored under another name: params() drops `size`

        def _poison(self, train, rng, context):  # pragma: no cover - the contract refuses the class first
            none = np.array([], dtype=np.int64)
            return train, Poisoning(attack="forgetful", params=self.params(), indices=none, original_labels=none)

    with pytest.raises(ContractError, match="takes size but params\\(\\) does not report"):
        check_parameters("attack", "forgetful", lambda n, **p: Forgetful(**p), Forgetful)

    tr, _ = digits
    poisoned = tr.with_data(labels=np.where(np.arange(len(tr)) < 5, (tr.labels + 1) % 10, tr.labels))

    class Record:
        indices = np.arange(4)  # the fifth changed label is not recorded

    with pytest.raises(ContractError, match="changed but not recorded: \\[4\\]"):
        check_recorded_indices("liar", tr, poisoned, Record())

    class Opaque:  # not a dataclass: the cache cannot store it
        def apply(self, images):
            return images

    with pytest.raises(ContractError, match="not a dataclass"):
        check_trigger_cache("opaque", Opaque(), tr.images[:2])
