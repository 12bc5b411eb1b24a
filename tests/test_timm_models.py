"""timm (PyTorch Image Models) architectures in small configurations (eval mode, float64): K and the
trace-penalty gradient of both strategies against the independent per-sample autograd loop of
``tests/reference.py`` (not ``verify``, which is the library's own check).

Skipped without a working timm (an optional extra: ``pip install -e ".[timm]"``, which needs a
torchvision built for the installed torch; nothing is downloaded: random weights). A selection of the
families ``tests/timm_sweep.py`` runs in full, chosen for layers nothing else here names:
weight-standardised convolutions (NFNet), a hard-sigmoid squeeze-excitation gate (HardCoReNAS, where
PyTorch's own single-precision hardsigmoid derivative once made the reference wrong), LCNet's
hard-swish, MobileViT's unfolded patches, XCiT's cross-covariance attention, LeViT's attention biases
indexed by buffers, CoAtNet's relative-position tables, MambaOut's gated convolutions.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch

from architectures import assert_matches_the_loop, loop_reference
from optional import require_extra

timm = require_extra("timm", "timm")  # timm imports torchvision, whose C ops must match the installed torch


ARCHITECTURES = {  # name: (constructor arguments, input size)
    "test_nfnet": ({}, 64),
    "test_resnet": ({}, 64),
    "test_byobnet": ({"img_size": 64}, 64),
    "test_efficientnet": ({}, 64),
    "test_convnext": ({}, 64),
    "test_mambaout": ({}, 64),
    "test_coatnet": ({"img_size": 64}, 64),
    "test_vit_relpos": ({"img_size": 32}, 32),
    "lcnet_035": ({}, 32),
    "hardcorenas_a": ({}, 32),
    "mobilevit_xxs": ({}, 64),
    "xcit_nano_12_p8_224": ({"img_size": 32, "depth": 2}, 32),
    "levit_128s": ({"img_size": 64}, 64),
    "efficientvit_m0": ({"img_size": 64}, 64),
    "efficientformerv2_s0": ({"img_size": 64}, 64),
}


def _model_and_input(name):
    kwargs, size = ARCHITECTURES[name]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = timm.create_model(name, pretrained=False, num_classes=3, **kwargs)
    return model.double().eval(), torch.randn(2, 3, size, size, dtype=torch.float64)


@functools.lru_cache(maxsize=None)
def _reference(name):
    """The loop's K and ∂ tr K/∂θ, once per architecture (both strategies compare with it).

    LeViT's attention (like EfficientFormer's, EfficientViT-MSRA's and TinyViT's) keeps
    ``attention_biases[:, idxs]`` in a dict the first time it runs in eval mode and reuses it until
    ``train()``: the loop, which differentiates many forwards, runs those modules with the flag that
    recomputes the biases every call (the same function, without the cache)."""
    model, x = _model_and_input(name)
    caching = [m for m in model.modules() if hasattr(m, "attention_bias_cache")]
    for m in caching:
        m.training = True
    try:
        return loop_reference(model, x)
    finally:
        for m in caching:
            m.train(False)


# eval-mode LeViT, EfficientViT-MSRA, EfficientFormer v2: their attention_bias_cache holds tensors computed from a
# Parameter; mgs_torch once differentiated them as constants (J's columns for attention_biases zero; found by this
# file, issue 25). Every forward mgs_torch runs now sees the caches empty (mgs_torch._guards.fresh_caches).


@pytest.mark.parametrize("strategy", ["structured", "jacobian"])
@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_timm_architecture_matches_the_autograd_loop(name, strategy):
    # Hardsigmoid (HardCoReNAS's gates) has no double backward upstream: the loop runs it as its formula (reference.py)
    assert_matches_the_loop(*_model_and_input(name), strategy, _reference(name), tol=1e-10)
