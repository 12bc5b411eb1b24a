"""timm (PyTorch Image Models) architectures in small configurations through ``verify``: K and the
trace-penalty gradient against the float64 per-sample autograd loop, both strategies.

Skipped without a working timm (an optional extra: ``pip install -e ".[timm]"``, which needs a
torchvision built for the installed torch; nothing is downloaded: random weights). A selection of the
families ``tests/timm_sweep.py`` runs in full, chosen for layers nothing else here names:
weight-standardised convolutions (NFNet), a hard-sigmoid squeeze-excitation gate (HardCoReNAS, where
PyTorch's own single-precision hardsigmoid derivative once made the reference wrong), LCNet's
hard-swish, MobileViT's unfolded patches, XCiT's cross-covariance attention, LeViT's attention biases
indexed by buffers, CoAtNet's relative-position tables, MambaOut's gated convolutions.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from mgs_torch import verify

try:  # timm imports torchvision, whose C ops must match the installed torch
    import timm
except Exception as error:  # noqa: BLE001 - any failure to import means: not usable here
    pytest.skip(f"timm not usable here ({type(error).__name__})", allow_module_level=True)


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
}


@pytest.mark.parametrize("strategy", ["structured", "jacobian"])
@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_timm_architecture_matches_the_autograd_loop(name, strategy):
    kwargs, size = ARCHITECTURES[name]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = timm.create_model(name, pretrained=False, num_classes=3, **kwargs)
        report = verify(model, torch.randn(2, 3, size, size), strategy=strategy)
    assert report.failure is None and report.samples_interact is None, str(report)
    assert report.kernel_error <= 1e-10, str(report)
    assert report.gradient_check == "autograd" and report.gradient_error <= 1e-10, str(report)
