"""mgs_torch: Model Gradient Similarity (MGS) kernels, metrics and penalties for PyTorch.

For a mini-batch X of n inputs with q raw outputs each, J = ∂f(X)/∂θ has n·q rows and the MGS
kernel is K = J Jᵀ (the empirical neural tangent kernel). Its trace and log-determinant measure how
similar the model's per-sample gradients are; as a penalty α·g(K) they regularise training.

>>> from mgs_torch import mgs_kernel, mgs_metrics, mgs_penalty
>>> K = mgs_kernel(model, x)                     # (n·q, n·q)
>>> mgs_metrics(K).as_dict()                     # trace, logdet, rank, ...
>>> loss = task_loss + alpha * mgs_penalty(model, x, kind="trace")
"""

import importlib.util

from ._validation import NonFiniteOutputError
from .cuda_graph import capture_step
from .engines import LayerRule, layer_rule, register_layer_rule, unregister_layer_rule
from .kernel import mgs_kernel, mgs_trace
from .metrics import MGSMetrics, kernel_target_alignment, mgs_metrics
from .op_fixes import ModelForwardError, UnsupportedLayerError
from .options import KernelOptions, PenaltyOptions
from .penalty import mgs_penalty
from .scores import SampleScores, mgs_sample_scores, sample_scores_from_kernel
from .self_check import SelfCheckError, SelfCheckReport, self_check_reports, set_self_check
from .verify import VerifyReport, verify

__version__ = "0.1.0"

__all__ = [
    "mgs_kernel",
    "mgs_trace",
    "mgs_metrics",
    "mgs_penalty",
    "capture_step",
    "MGSMetrics",
    "mgs_sample_scores",
    "sample_scores_from_kernel",
    "SampleScores",
    "kernel_target_alignment",
    "LayerRule",
    "register_layer_rule",
    "unregister_layer_rule",
    "layer_rule",
    "NonFiniteOutputError",
    "UnsupportedLayerError",
    "ModelForwardError",
    "verify",
    "set_self_check",
    "self_check_reports",
    "SelfCheckError",
    "SelfCheckReport",
    "KernelOptions",
    "PenaltyOptions",
    "VerifyReport",
    "__version__",
]

# The Lightning integration is optional (pip install "mgs-torch[lightning]") and imported lazily:
# ``import mgs_torch`` stays fast, and a bug inside mgs_torch.lightning is never mistaken for a
# missing Lightning.
_LIGHTNING_NAMES = ("MGSMonitor", "MGSRegularizedMixin", "MGSEarlyStopping")
if any(importlib.util.find_spec(name) is not None for name in ("pytorch_lightning", "lightning")):
    __all__ += list(_LIGHTNING_NAMES)


def __getattr__(name: str):
    if name in _LIGHTNING_NAMES:
        from . import lightning

        return getattr(lightning, name)
    raise AttributeError(f"module 'mgs_torch' has no attribute {name!r}")
