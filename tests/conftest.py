import os
from pathlib import Path

import pytest

# On a shared, oversubscribed machine OpenMP threads that spin while waiting slow everyone down.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

# A fixed thread count, not one chosen by the machine's load: the order of float reductions depends on
# it, and the short trainings some tests judge (detection rates on MNIST) must repeat exactly.
torch.set_num_threads(int(os.environ.get("POISONLAB_TEST_THREADS", min(2, os.cpu_count() or 1))))

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("POISONLAB_TEST_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_root() -> Path:
    if not (DATA / "cifar-10-batches-py").is_dir():
        pytest.skip(f"real datasets not found at {DATA} (set POISONLAB_TEST_DATA)")
    return DATA


@pytest.fixture(scope="session")
def digits():
    from poisonlab.data import load_dataset

    return load_dataset("digits", "train"), load_dataset("digits", "test")


@pytest.fixture(scope="session")
def cifar_test(data_root):
    from poisonlab.data import read_cifar10

    return read_cifar10(data_root / "cifar-10-batches-py", "test")


@pytest.fixture(scope="session")
def mnist_small(data_root):
    from poisonlab.data import load_dataset

    tr = load_dataset("mnist", "train", data_dir=data_root).stratified_subset(2000, seed=0)
    te = load_dataset("mnist", "test", data_dir=data_root).stratified_subset(500, seed=0)
    return tr, te
