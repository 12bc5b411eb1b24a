"""A whole training step with an MGS penalty, captured once into a CUDA graph and replayed.

Small networks on a GPU are bound by Python and kernel launches: an eager LeNet-5 step with the exact
trace penalty costs about 17 ms on an H200 whatever the batch size, replayed from a CUDA graph 1.5 ms
(``benchmarks/RESULTS.md``). Nothing in mgs_torch synchronises with the host inside a step while a
graph is captured, so the step can be captured whole: forward, loss + α·penalty, backward, optimizer step.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

__all__ = ["capture_step"]


def capture_step(
    step: Callable[[], object], *, warmup: int = 3, generators: Sequence[torch.Generator] = ()
) -> Callable[[], None]:
    """Run ``step`` ``warmup`` times on a side stream, capture one call into a CUDA graph, return its replay.

    This is PyTorch's whole-network capture. ``step`` must read its batch from fixed tensors, so copy
    each new batch into them (``x_static.copy_(x)``) before calling the returned function. It must also
    keep its shapes and the tensors it reads: the graph replays the captured kernels on the captured
    memory. The warm-up steps are real training steps, and mgs_torch builds and caches its plan there.

    While capturing, mgs_torch skips the NaN check of the model outputs (a host sync), does not fork
    the CUDA random state, computes ``kind="logdet"`` with ε = ``jitter`` (NaN where K + εI is not
    positive definite), and refuses Hutchinson probes from a CPU generator. Pass the CUDA generators
    of Hutchinson probes (``mgs_penalty(..., generator=g)``) in ``generators``: they are registered
    with the graph, so each replay draws new probes.

    Example::

        def step():
            opt.zero_grad(set_to_none=False)
            out = model(x_static)
            loss = F.cross_entropy(out, y_static) + alpha * mgs_penalty(model, x_static)
            loss.backward()
            opt.step()

        replay = capture_step(step)
        for x, y in loader:
            x_static.copy_(x); y_static.copy_(y)
            replay()
    """
    if not callable(step):
        raise TypeError(f"step must be a callable taking no arguments, got {type(step).__name__}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
        raise ValueError(f"warmup must be an int >= 1 (the plan is built and cached there), got {warmup!r}")
    for generator in generators:
        if not isinstance(generator, torch.Generator) or generator.device.type != "cuda":
            raise ValueError(
                f"generators must be CUDA torch.Generator objects (torch.Generator(device='cuda')), got {generator!r}"
            )
    if not torch.cuda.is_available():
        raise RuntimeError("capture_step needs a CUDA device: CUDA graphs exist only on the GPU; on the CPU call step() itself")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    for generator in generators:
        graph.register_generator_state(generator)
    with torch.cuda.graph(graph):
        step()
    return graph.replay
