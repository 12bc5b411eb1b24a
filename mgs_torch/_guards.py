"""Guards that keep an MGS computation free of side effects: random states, modes, autocast, warnings."""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterable, Iterator

import torch
from torch import Tensor, nn

from . import _walk

__all__ = [
    "BATCH_NORM_TYPES", "capturing_cuda_graph", "cuda_devices", "rng_states", "restore_rng_states", "preserved_state",
    "fresh_caches",
]

BATCH_NORM_TYPES = (nn.modules.batchnorm._BatchNorm,)


def cuda_devices(tensors: Iterable[Tensor]) -> list[int]:
    """The CUDA device indices among ``tensors`` (what a random-state fork must cover)."""
    return sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})


def capturing_cuda_graph(device: torch.device | str) -> bool:
    """True while the current CUDA stream is being captured into a CUDA graph (no host sync allowed),
    for work on ``device`` (always False for the CPU)."""
    return torch.device(device).type == "cuda" and torch.cuda.is_current_stream_capturing()


def rng_states(model: nn.Module) -> list[tuple[str, int, Tensor]]:
    """The random states a forward of ``model`` draws from: the CPU's and its CUDA devices'."""
    states = [("cpu", 0, torch.get_rng_state())]
    for index in cuda_devices(_walk.parameters(model)):
        states.append(("cuda", index, torch.cuda.get_rng_state(index)))
    return states


def restore_rng_states(states: list[tuple[str, int, Tensor]]) -> None:
    for kind, index, state in states:
        torch.set_rng_state(state) if kind == "cpu" else torch.cuda.set_rng_state(state, index)


@contextlib.contextmanager
def preserved_state(model: nn.Module, batch_norm: str) -> Iterator[None]:
    """Run a kernel computation without side effects on ``model`` or the global RNG.

    Train/eval flags are restored, BatchNorm layers are in eval mode under ``batch_norm="eval"``,
    autocast is off (the kernel is computed in the parameters' dtype or the requested one), and the
    global random state (CPU and the model's CUDA device) is forked, so Dropout masks drawn here do
    not shift the training run's random stream. While a CUDA graph is being captured the CUDA random
    state cannot be read or set: it is not forked then, and the graph's own random offsets advance.

    The caching of parametrizations (``torch.nn.utils.parametrize.cached()``) is off inside: a cached weight
    was computed from the Parameter itself, not from what mgs_torch substitutes for it.

    Module backward hooks (``register_full_backward_hook``, its pre-hook and the legacy
    ``register_backward_hook``, per module and global) are set aside: they act on training
    gradients, not on the function, so K stays the true Jacobian — as for tensor hooks on the
    parameters, which the substituted tensors never carry — and torch.func cannot run the
    autograd.Function that implements them. Forward hooks stay: they change the function.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    with _walk.one_walk(model):  # the module tree, walked once for every check of this call (see _walk)
        with _preserved_state(model, batch_norm):
            yield


@contextlib.contextmanager
def _preserved_state(model: nn.Module, batch_norm: str) -> Iterator[None]:
    from torch.nn.utils import parametrize

    caching = parametrize._cache_enabled  # parametrize.cached() would hand out weights made before substitution
    parametrize._cache_enabled = 0
    flags = [(m, m.training) for m in _walk.modules(model)]
    hooks = _set_aside_backward_hooks(model)
    on_cuda = cuda_devices(_walk.parameters(model))
    devices = [] if on_cuda and capturing_cuda_graph("cuda") else on_cuda
    try:
        if batch_norm == "eval":
            for m in _walk.modules(model):
                if isinstance(m, BATCH_NORM_TYPES):
                    m.eval()
        with torch.random.fork_rng(devices=devices), contextlib.ExitStack() as stack:
            for dev in ("cpu", "cuda"):
                if dev == "cpu" or on_cuda:
                    stack.enter_context(torch.autocast(dev, enabled=False))
            stack.enter_context(warnings.catch_warnings())
            # vmap's fallback for ops without a batching rule is correct, only slower: not the user's concern
            warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented")
            yield
    finally:
        for m, flag in flags:
            m.training = flag
        _restore_backward_hooks(hooks)
        parametrize._cache_enabled = caching


_MODULE_HOOK_DICTS = ("_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOK_DICTS = ("_global_backward_hooks", "_global_backward_pre_hooks")


def has_backward_hooks(model: nn.Module) -> bool:
    """Whether any module of ``model``, or the global registry, holds a backward hook or pre-hook."""
    from torch.nn.modules import module as module_lib

    return any(getattr(m, attr, None) for m in _walk.modules(model) for attr in _MODULE_HOOK_DICTS) or any(
        getattr(module_lib, attr, None) for attr in _GLOBAL_HOOK_DICTS
    )


def _set_aside_backward_hooks(model: nn.Module) -> list:
    """Empty every backward-hook dict of ``model``'s modules and the global ones; return what to restore."""
    from torch.nn.modules import module as module_lib

    saved = []
    for m in _walk.modules(model):
        for attr in _MODULE_HOOK_DICTS:
            hooks = getattr(m, attr, None)
            if hooks:
                saved.append((hooks, dict(hooks)))
                hooks.clear()
    for attr in _GLOBAL_HOOK_DICTS:
        hooks = getattr(module_lib, attr, None)
        if hooks:
            saved.append((hooks, dict(hooks)))
            hooks.clear()
    return saved


def _restore_backward_hooks(saved: list) -> None:
    for hooks, entries in saved:
        hooks.update(entries)  # the same dict objects: the users' RemovableHandles keep working


@contextlib.contextmanager
def fresh_caches(model: nn.Module) -> Iterator[None]:
    """Every module attribute that is a ``dict`` named like a cache (``*cache*``) is an empty dict inside, the
    module's own dict again after.

    Some modules keep tensors computed from their Parameters between calls: timm's LeViT, EfficientFormer,
    EfficientViT (MSRA) and TinyViT store ``attention_biases[:, idxs]`` in ``attention_bias_cache`` on their first
    eval-mode call. A forward that reads such a tensor differentiates it as a constant (J's columns for those
    Parameters would be zero); with the cache empty it computes it from the Parameters, as its first call does.
    """
    swapped = [
        (m, name, value) for m in _walk.modules(model) for name, value in list(vars(m).items())
        if isinstance(value, dict) and "cache" in name.lower() and not name.startswith("__")
    ]
    try:
        for m, name, _ in swapped:
            setattr(m, name, {})
        yield
    finally:
        for m, name, value in swapped:
            setattr(m, name, value)


# not torch.seed(): it sets a fresh non-deterministic seed, after which draws are as random as without it
_RESEEDING = ("manual_seed", "set_rng_state")


@contextlib.contextmanager
def watch_reseeding() -> Iterator[list[str]]:
    """Record calls of ``torch.manual_seed`` and ``torch.set_rng_state`` (and their ``torch.random`` names;
    ``torch.random.fork_rng`` restores the state with them) made inside the block: a forward that reseeds the
    global generator, as ``torch.testing``'s ``wrapper_set_seed`` does, draws from a fixed state."""
    calls: list[str] = []
    patched = []
    for owner in (torch, torch.random):
        for name in _RESEEDING:
            original = getattr(owner, name)

            def spy(*args, _original=original, _name=f"{owner.__name__}.{name}", **kwargs):
                calls.append(_name)
                return _original(*args, **kwargs)

            patched.append((owner, name, original))
            setattr(owner, name, spy)
    try:
        yield calls
    finally:
        for owner, name, original in reversed(patched):
            setattr(owner, name, original)
