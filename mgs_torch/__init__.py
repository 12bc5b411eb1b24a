"""mgs_torch: Model Gradient Similarity (MGS) kernels, metrics and penalties for PyTorch.

For a mini-batch X of n inputs with q raw outputs each, J = ∂f(X)/∂θ has n·q rows and the MGS
kernel is K = J Jᵀ (the empirical neural tangent kernel). Its trace and log-determinant measure how
similar the model's per-sample gradients are; as a penalty α·g(K) they regularise training.

>>> from mgs_torch import mgs_kernel, mgs_metrics, mgs_penalty
>>> K = mgs_kernel(model, x)                     # (n·q, n·q)
>>> mgs_metrics(K).as_dict()                     # trace, logdet, rank, ...
>>> loss = task_loss + alpha * mgs_penalty(model, x, kind="trace")
"""

from .engines import LayerRule, register_layer_rule
from .kernel import mgs_kernel, mgs_trace
from .metrics import MGSMetrics, kernel_target_alignment, mgs_metrics
from .penalty import mgs_penalty

__version__ = "0.1.0"

__all__ = [
    "mgs_kernel",
    "mgs_trace",
    "mgs_metrics",
    "mgs_penalty",
    "MGSMetrics",
    "kernel_target_alignment",
    "LayerRule",
    "register_layer_rule",
    "__version__",
]

try:  # the Lightning integration is optional: pip install "mgs-torch[lightning]"
    from .lightning import MGSMonitor, MGSRegularizedMixin  # noqa: F401
except ImportError:  # pragma: no cover - depends on the environment
    pass
else:
    __all__ += ["MGSMonitor", "MGSRegularizedMixin"]
