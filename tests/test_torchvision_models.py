"""torchvision's classification architectures (small configurations, eval mode, float64): K and the
trace-penalty gradient of both strategies against the independent per-sample autograd loop of
``tests/reference.py`` (not ``verify``, which is the library's own check and shares its plan).

Skipped without a working torchvision (an optional extra: ``pip install -e ".[vision]"``; see
tests/optional.py for MGS_REQUIRE_EXTRAS=1, which fails instead). The
architectures bring what the hand-written zoo may not: ViT's class token and position embedding,
Swin's relative-position bias tables indexed by buffers, shifted windows and masks, MaxViT's grid
attention, ConvNeXt's layer scale, squeeze-excitation, channel shuffle, concatenating blocks.
"""

from __future__ import annotations

import functools

import pytest
import torch

from architectures import assert_matches_the_loop, loop_reference
from optional import require_extra

M = require_extra("torchvision.models", "vision")


def _swin(v2: bool):
    extra = dict(block=M.swin_transformer.SwinTransformerBlockV2, downsample_layer=M.swin_transformer.PatchMergingV2) if v2 else {}
    return M.swin_transformer.SwinTransformer(
        patch_size=[4, 4], embed_dim=8, depths=[2, 2], num_heads=[2, 2], window_size=[4, 4], num_classes=3, **extra
    )


ARCHITECTURES = {
    "mobilenet_v2": lambda: M.mobilenet_v2(num_classes=3, width_mult=0.25),
    "mobilenet_v3_small": lambda: M.mobilenet_v3_small(num_classes=3, width_mult=0.25),
    "shufflenet_v2": lambda: M.shufflenet_v2_x0_5(num_classes=3),
    "squeezenet1_1": lambda: M.squeezenet1_1(num_classes=3),
    "mnasnet0_5": lambda: M.mnasnet0_5(num_classes=3),
    "densenet": lambda: M.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2, num_classes=3),
    "regnet": lambda: M.regnet.RegNet(
        M.regnet.BlockParams.from_init_params(depth=4, w_0=8, w_a=8.0, w_m=2.0, group_width=8, se_ratio=0.25), num_classes=3
    ),
    "convnext": lambda: M.convnext.ConvNeXt(
        [M.convnext.CNBlockConfig(8, 16, 1), M.convnext.CNBlockConfig(16, None, 1)], stochastic_depth_prob=0.1, num_classes=3
    ),
    "vit": lambda: M.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=3),
    "swin": lambda: _swin(False),
    "swin_v2": lambda: _swin(True),
    "maxvit": lambda: M.MaxVit(
        input_size=(32, 32), stem_channels=8, partition_size=2, block_channels=[8, 16], block_layers=[1, 1], head_dim=4,
        stochastic_depth_prob=0.1, num_classes=3,
    ),
}


def _model_and_input(name):
    torch.manual_seed(0)
    return ARCHITECTURES[name]().double().eval(), torch.randn(2, 3, 32, 32, dtype=torch.float64)


@functools.lru_cache(maxsize=None)
def _reference(name):
    """The loop's K and ∂ tr K/∂θ, once per architecture (both strategies compare with it)."""
    return loop_reference(*_model_and_input(name))


@pytest.mark.parametrize("strategy", ["structured", "jacobian"])
@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_torchvision_architecture_matches_the_autograd_loop(name, strategy):
    # MobileNetV3's Hardsigmoid has no double backward upstream: the loop runs it as its formula (reference.py)
    assert_matches_the_loop(*_model_and_input(name), strategy, _reference(name), tol=1e-10)
