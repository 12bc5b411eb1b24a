"""PyTorch Lightning integration of mgs_torch (needs PyTorch Lightning: ``pip install -e ".[lightning]"`` in a clone).

* :class:`MGSMonitor` — a callback that logs the MGS metrics (``mgs/trace``, ``mgs/logdet``, …)
  through the Trainer's loggers during training.
* :class:`MGSEarlyStopping` — an ``EarlyStopping`` that stops when the MGS curve stops growing
  (no validation set needed).
* :class:`MGSRegularizedMixin` — ``class Net(MGSRegularizedMixin, LightningModule)`` adds the
  MGS penalty α·g(K) to the loss returned by ``training_step``.

The core package never imports Lightning; importing this subpackage without it raises ImportError.
"""

from ._utils import MGSConfigurationError
from .callback import MGSMonitor
from .mixin import MGSRegularizedMixin
from .stopping import MGSEarlyStopping

__all__ = ["MGSMonitor", "MGSRegularizedMixin", "MGSEarlyStopping", "MGSConfigurationError"]
