import pytest
import torch

from poisonlab.models import MODELS, build_model, count_parameters


def test_cnn3_counts_match_thesis():
    m = build_model("cnn3", 3, 10, 32)
    assert count_parameters(m) == 3_251_018
    assert count_parameters(m, include_buffers=True) == 3_253_834


def test_mnist_cnn_counts_match_study():
    assert count_parameters(build_model("mnist_cnn", 3, 10, 28)) == 160_202
    assert count_parameters(build_model("mnist_cnn", 1, 10, 28)) == 159_626


def test_resnet18_and_vgg_like_counts():
    assert count_parameters(build_model("resnet18", 3, 10, 32)) == 11_173_962
    # 4 convs 32-32-64-64 (+BN), dense 4096->512, dense 512->10
    assert count_parameters(build_model("vgg_like", 3, 10, 32)) == 2_168_746


@pytest.mark.parametrize("name", MODELS.names())
def test_forward_and_features(name):
    c, s = (1, 28) if name == "mnist_cnn" else (3, 32)
    m = build_model(name, c, 10, s).eval()
    x = torch.rand(2, c, s, s)
    f = m.features(x)
    assert f.ndim == 2 and m(x).shape == (2, 10)
    assert torch.allclose(m.head(f), m(x), atol=1e-5)
    assert isinstance(m.last_conv, torch.nn.Conv2d)
