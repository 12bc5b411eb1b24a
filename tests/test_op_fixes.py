"""Every replacement in ``mgs_torch.op_fixes`` against the public op it replaces, over every argument.

A replacement is a liability: whenever mgs_torch runs a model, it runs instead of PyTorch's op, so it
must compute what the public op computes for *every* argument that op accepts. For each case the
public op is called once as it is and once under :class:`~mgs_torch.op_fixes.ExactOps`, on fresh
copies of the same arguments, and compared on

* values (float64, NaN where the public op gives NaN),
* in-place effects on every argument (``inplace=True`` with the result unused must still act),
* first derivatives with respect to every floating argument (one vjp with a random cotangent),
* second derivatives: the replacement's double backward along random directions against central
  finite differences of the *public* op's first derivative (so ops PyTorch cannot differentiate twice
  are checked too),
* one sample at a time under ``vmap`` (how mgs_torch runs them): the first argument batched, then
  every tensor argument batched, against the public op applied to each slice.

The cases are PyTorch's own OpInfo / ModuleInfo sample inputs of each op, with all their kwargs, plus
what those never exercise (:func:`extra_cases`): boolean attention masks of every broadcastable shape
with fully-masked rows, ``scale``, ``enable_gqa``, ``is_causal`` beside a mask, ``inplace=True``,
``training=False`` for random ops, padding masks and ``need_weights`` for multi-head attention.
A replacement may refuse a case it cannot differentiate (:class:`~mgs_torch.UnsupportedLayerError`)
only where :data:`REFUSALS` says why; it may never return something else.

Needs PyTorch's test dependencies (``expecttest``, ``hypothesis``; in the ``dev`` extra).
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import inspect
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from mgs_torch import UnsupportedLayerError
from mgs_torch.op_fixes import _CONVOLUTIONS, EXACT_FORWARDS, REPLACED_OPS, ExactOps, exact_computation, use_transposed_convolution_backward

pytest.importorskip("expecttest", reason="PyTorch's OpInfo database needs expecttest (pip install -e '.[dev]')")
from torch.testing._internal.common_methods_invocations import op_db  # noqa: E402
from torch.testing._internal.common_modules import module_db  # noqa: E402

D = torch.float64
_VF = torch._C._VariableFunctions


@dataclasses.dataclass
class Case:
    """``fn(*args, **kwargs)`` with the public op inside; ``random`` cases are compared on in-place
    semantics and shapes only (the two draw from the random stream differently)."""

    label: str
    fn: Callable
    args: tuple
    kwargs: dict = dataclasses.field(default_factory=dict)
    random: bool = False
    smooth: bool = True  # False: kinks at the sample (max ties): no finite-difference second derivative
    wrt: tuple[int, ...] | None = None  # positions of the arguments to differentiate (None: every floating one)
    module: nn.Module | None = None  # for EXACT_FORWARDS: the module whose forward mgs_torch replaces


# -------------------------------------------------------------------------------- cases

OPINFO_NAMES = {
    F.layer_norm: ["nn.functional.layer_norm"],
    F.instance_norm: ["nn.functional.instance_norm"],
    F.batch_norm: ["nn.functional.batch_norm"],
    F.prelu: ["nn.functional.prelu"],
    torch.prelu: ["nn.functional.prelu"],
    F.hardsigmoid: ["nn.functional.hardsigmoid"],
    F.rrelu: ["nn.functional.rrelu"],
    F.embedding: ["nn.functional.embedding"],
    F.embedding_bag: ["nn.functional.embedding_bag"],
    F.scaled_dot_product_attention: ["nn.functional.scaled_dot_product_attention"],
    F.multi_head_attention_forward: ["nn.functional.multi_head_attention_forward"],
    F.conv_transpose1d: ["nn.functional.conv_transpose1d"],
    F.conv_transpose2d: ["nn.functional.conv_transpose2d"],
    F.conv_transpose3d: ["nn.functional.conv_transpose3d"],
    torch.roll: ["roll"],
    torch.cdist: ["cdist"],
    torch.pdist: ["nn.functional.pdist"],
    torch.native_layer_norm: ["native_layer_norm"],
    torch.Tensor.roll: ["roll"],
    F.conv1d: ["nn.functional.conv1d"],
    F.conv2d: ["nn.functional.conv2d"],
    F.conv3d: ["nn.functional.conv3d"],
}
# torch.* forms of replaced F ops, called with the F op's OpInfo samples through their own argument order
ALIASES = {
    torch.layer_norm: (F.layer_norm, lambda input, normalized_shape, weight=None, bias=None, eps=1e-5: torch.layer_norm(
        input, normalized_shape, weight, bias, eps)),
    torch.instance_norm: (F.instance_norm, lambda input, running_mean=None, running_var=None, weight=None, bias=None,
                          use_input_stats=True, momentum=0.1, eps=1e-5: torch.instance_norm(
        input, weight, bias, running_mean, running_var, use_input_stats, momentum, eps, False)),
    torch.batch_norm: (F.batch_norm, lambda input, running_mean, running_var, weight=None, bias=None, training=False,
                       momentum=0.1, eps=1e-5: torch.batch_norm(
        input, weight, bias, running_mean, running_var, training, momentum, eps, False)),
}
MODULE_CASES = {
    _VF.lstm: nn.LSTM, _VF.gru: nn.GRU, _VF.rnn_tanh: nn.RNN, _VF.rnn_relu: nn.RNN,
    _VF.lstm_cell: nn.LSTMCell, _VF.gru_cell: nn.GRUCell, _VF.rnn_tanh_cell: nn.RNNCell, _VF.rnn_relu_cell: nn.RNNCell,
}
RANDOM_OPS = {F.rrelu: lambda args, kwargs: kwargs.get("training", False)}

# What a replacement may refuse, and why (it raises UnsupportedLayerError there, never computes something else).
REFUSALS = {
    F.embedding_bag: "1-D input with offsets packs several samples into one row: no per-sample kernel",
    F.embedding: "max_norm renormalises the weight in place during the forward",
    torch.fused_moving_avg_obs_fake_quant: "an observer that is on updates its range from the batch in place",
}
# Derivatives by definition: Embedding(scale_grad_by_freq=True) rescales what autograd reports, not the
# function; MGS uses the function's true derivative, i.e. the public op's derivative without the rescaling.
DERIVATIVE_WITHOUT = {F.embedding: {"scale_grad_by_freq": False}, F.embedding_bag: {"scale_grad_by_freq": False}}
# Derivatives PyTorch defines (the padding row of an embedding is a constant): the finite-difference fallback
# for an upstream backward bug never applies to them; the replacement must match the public backward itself.
DEFINED_BACKWARDS = (F.embedding, F.embedding_bag)
# PyTorch's own first derivative is imprecise: hardsigmoid's CPU backward multiplies by a single-precision
# 1/6 even in float64 (tests/test_upstream_bugs.py); the replacement's exact one is checked to that rounding.
UPSTREAM_RTOL = {F.hardsigmoid: 1e-7}
# The one intended difference: the running-statistics update of train-mode batch/instance norm. It never
# changes an output, and inside mgs_torch it lands in per-call copies of the buffers.
RUNNING_STATISTICS = (F.batch_norm, F.instance_norm)


def _running_statistics(op, args, kwargs) -> set[int]:
    """ids of the running-statistics buffers among a norm's arguments (held fixed, never compared)."""
    op = ALIASES.get(op, (op,))[0]  # the aliases take the F op's arguments (through their adapters)
    if op not in RUNNING_STATISTICS:
        return set()
    bound = inspect.signature(op).bind_partial(*args, **kwargs).arguments
    return {id(bound[k]) for k in ("running_mean", "running_var") if isinstance(bound.get(k), Tensor)}


def _opinfo_cases(op) -> list[Case]:
    if op in ALIASES:
        public, adapter = ALIASES[op]
        return [dataclasses.replace(c, label=f"{_name(op)} {c.label}", fn=adapter) for c in _opinfo_cases(public)]
    cases = []
    for name in OPINFO_NAMES.get(op, []):
        for info in op_db:
            if info.name != name:
                continue
            fn = info.method_variant if op is torch.Tensor.roll else (op if op is torch.prelu else info.op)
            for i, s in enumerate(info.sample_inputs("cpu", D, requires_grad=False)):
                random = op in RANDOM_OPS and RANDOM_OPS[op](s.args, s.kwargs)
                if op is F.scaled_dot_product_attention:
                    random = s.kwargs.get("dropout_p", 0.0) > 0
                if op is F.multi_head_attention_forward:
                    random = s.kwargs.get("training", True) and s.args[9] > 0
                cases.append(Case(f"{name}{'.' + info.variant_test_name if info.variant_test_name else ''}[{i}]", fn,
                                  (s.input, *s.args), dict(s.kwargs), random=random))
    return cases


def _module_cases(op) -> list[Case]:
    """ModuleInfo samples of the module that calls ``op`` (the fused RNN ops), as functions of their
    parameters (leading arguments) and inputs."""
    cls = MODULE_CASES.get(op)
    if cls is None:
        return []
    (info,) = [m for m in module_db if m.module_cls is cls]
    cases = []
    for training in (False, True):
        for i, mi in enumerate(info.module_inputs_func(info, device="cpu", dtype=D, requires_grad=False, training=training)):
            module = cls(*mi.constructor_input.args, **mi.constructor_input.kwargs).to(D).train(training)
            nonlinearity = getattr(module, "nonlinearity", "tanh")
            if cls in (nn.RNN, nn.RNNCell) and (op in (_VF.rnn_relu, _VF.rnn_relu_cell)) != (nonlinearity == "relu"):
                continue
            if mi.forward_input.kwargs:
                continue
            names = [k for k, _ in module.named_parameters()]
            fn = _functional(module, names, len(mi.forward_input.args))
            random = training and getattr(module, "dropout", 0) > 0 and getattr(module, "num_layers", 1) > 1
            cases.append(Case(f"{cls.__name__}[{i}, {'train' if training else 'eval'}]", fn,
                              (*[p.detach() for p in module.parameters()], *mi.forward_input.args), random=random))
    return cases


def _functional(module: nn.Module, names: list[str], n_inputs: int):
    def fn(*args):
        params, inputs = args[: len(names)], args[len(names):]
        return functional_call(module, dict(zip(names, params)), inputs)

    return fn


def _t(*shape, low=-2.0, high=2.0, seed=0):
    g = torch.Generator().manual_seed(seed + sum(shape) * 7 + len(shape))
    return low + (high - low) * torch.rand(shape, dtype=D, generator=g)


def _masks(b: int, h: int, lq: int, lk: int):
    """Boolean attention masks of every broadcastable shape, one query row fully masked in each."""
    g = torch.Generator().manual_seed(lq * 31 + lk)
    full = torch.rand(b, h, lq, lk, generator=g) > 0.4
    full[..., 0, :] = False  # a query that may attend to nothing: the public op returns zeros there
    full[..., 1, 0] = True
    keys = torch.rand(b, 1, 1, lk, generator=g) > 0.3  # a key-padding mask, as Hugging Face passes it
    keys[..., 0] = True
    return {"(L,S)": full[0, 0], "(B,H,L,S)": full, "(B,1,L,S)": full[:, :1], "(1,1,1,S)": keys[:1], "(B,1,1,S)": keys}


def extra_cases(op) -> list[Case]:
    """The arguments OpInfo does not exercise."""
    cases: list[Case] = []
    if op is F.scaled_dot_product_attention:
        b, h, lq, lk, e = 2, 4, 5, 6, 3
        q, k, v = _t(b, h, lq, e), _t(b, h, lk, e, seed=1), _t(b, h, lk, e, seed=2)
        for name, mask in _masks(b, h, lq, lk).items():
            cases.append(Case(f"bool mask {name}", op, (q, k, v), {"attn_mask": mask}))
            cases.append(Case(f"additive mask {name}", op, (q, k, v),
                              {"attn_mask": torch.zeros(mask.shape, dtype=D).masked_fill(~mask, -1e4)}))
        mask = _masks(b, h, lq, lk)["(B,1,1,S)"]
        cases.append(Case("scale", op, (q, k, v), {"scale": 0.37, "attn_mask": mask}))
        cases.append(Case("is_causal", op, (q, k, v), {"is_causal": True}))
        cases.append(Case("is_causal, square", op, (q, _t(b, h, lq, e, seed=3), _t(b, h, lq, e, seed=4)), {"is_causal": True}))
        kv = (_t(b, 2, lk, e, seed=5), _t(b, 2, lk, e, seed=6))
        cases.append(Case("enable_gqa, bool mask", op, (q, *kv), {"enable_gqa": True, "attn_mask": mask}))
        cases.append(Case("enable_gqa, causal", op, (q, *kv), {"enable_gqa": True, "is_causal": True}))
        cases.append(Case("3-d inputs, bool mask", op, (q[:, 0], k[:, 0], v[:, 0]), {"attn_mask": _masks(b, 1, lq, lk)["(L,S)"]}))
        cases.append(Case("dropout_p > 0", op, (q, k, v), {"dropout_p": 0.5}, random=True))
    elif op in (F.hardsigmoid,):
        x = _t(3, 7, low=-5, high=5)
        cases += [Case("inplace=True", lambda x: (op(x, inplace=True), x)[1], (x,)),
                  Case("inplace=True, result returned", lambda x: op(x, inplace=True), (x,)),
                  Case("inplace=False", lambda x: op(x, inplace=False), (x,))]
    elif op is F.rrelu:
        x = _t(3, 7)
        for training in (False, True):
            for inplace in (False, True):
                cases.append(Case(f"training={training}, inplace={inplace}",
                                  lambda x, t=training, i=inplace: (op(x, 0.1, 0.3, training=t, inplace=i), x)[1], (x,),
                                  random=training))
        cases.append(Case("defaults, eval", lambda x: op(x), (x,)))
    elif op is F.embedding:
        w, idx = _t(6, 3), torch.tensor([[0, 2, 5], [1, 1, 0]])
        cases += [Case("padding_idx", lambda w, i: op(i, w, padding_idx=1), (w, idx)),
                  Case("negative padding_idx", lambda w, i: op(i, w, padding_idx=-1), (w, idx)),
                  Case("scale_grad_by_freq", lambda w, i, **kw: op(i, w, **kw), (w, idx), {"scale_grad_by_freq": True}),
                  Case("max_norm", lambda w, i: op(i, w, max_norm=1.0), (w, idx))]
    elif op is F.embedding_bag:
        w, idx = _t(6, 3), torch.tensor([[0, 2, 5], [1, 1, 0]])
        for mode in ("sum", "mean", "max"):
            cases.append(Case(f"2-d, {mode}", lambda w, i, m=mode: op(i, w, mode=m), (w, idx), smooth=mode != "max"))
            cases.append(Case(f"2-d, {mode}, padding_idx", lambda w, i, m=mode: op(i, w, mode=m, padding_idx=1), (w, idx),
                              smooth=mode != "max"))
        cases.append(Case("2-d, per_sample_weights", lambda w, i, p: op(i, w, mode="sum", per_sample_weights=p), (w, idx, _t(2, 3))))
        cases.append(Case("2-d, all padding, mean", lambda w, i: op(i, w, mode="mean", padding_idx=1), (w, torch.ones(2, 3, dtype=torch.long))))
    elif op is F.multi_head_attention_forward:
        cases += _attention_module_cases()
    elif op is torch.fused_moving_avg_obs_fake_quant:
        cases += _fake_quant_cases(op)
    elif op is nn.CrossMapLRN2d:
        for size in (1, 2, 3, 4, 5, 7):
            for channels in (1, 3, 6):
                module = nn.CrossMapLRN2d(size, alpha=0.3, beta=0.75, k=1.5)
                cases.append(Case(f"size {size}, {channels} channels", module, (_t(2, channels, 3, 4),), module=module))
    elif op in (torch.roll, torch.Tensor.roll):
        cases += [Case("0-d", lambda x: op(x, 1), (torch.tensor(1.5, dtype=D),)),
                  Case("no dims", lambda x: op(x, 2), (_t(3, 4),)),
                  Case("several dims", lambda x: op(x, (1, -2), (0, 1)), (_t(3, 4),))]
    elif op in (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d):
        dims = {F.conv_transpose1d: 1, F.conv_transpose2d: 2, F.conv_transpose3d: 3}[op]
        x = _t(2, 1, *[3] * dims).transpose(0, 1).contiguous().transpose(0, 1)  # a size-1 dim with an odd stride
        cases.append(Case("size-1 channel dim with odd stride", op, (x, _t(1, 2, *[2] * dims))))
    elif op in (F.conv1d, F.conv2d, F.conv3d):
        dims = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}[op]
        x, w = _t(2, 2, *[5] * dims), _t(4, 2, *[2] * dims)
        cases += [Case("padding='same', even kernel", lambda x, w: op(x, w, padding="same", dilation=2), (x, w)),
                  Case("padding='valid'", lambda x, w: op(x, w, padding="valid"), (x, w)),
                  Case("unbatched", op, (x[0], w))]
    return cases


def _fake_quant_cases(op) -> list[Case]:
    """QAT's fused FakeQuantize op: observer off or on, fake quantisation on or off, per tensor or per channel."""
    cases = []
    x = 3 * _t(4, 6).float()
    per_tensor = (torch.tensor([-2.0]), torch.tensor([2.0]), torch.tensor([0.02]), torch.tensor([128], dtype=torch.int32))
    per_channel = (-torch.ones(4), torch.ones(4), torch.tensor([0.01, 0.02, 0.05, 0.1]), torch.zeros(4, dtype=torch.int32))
    for observer in (0, 1):
        for fake_quant in (0, 1):
            for name, (lo, hi, scale, zero), (qmin, qmax), per_row, symmetric in (
                ("per tensor", per_tensor, (0, 255), False, False), ("per channel", per_channel, (-128, 127), True, True),
            ):
                args = (x, torch.tensor([observer], dtype=torch.long), torch.tensor([fake_quant], dtype=torch.long), lo, hi,
                        scale, zero, 0.01, qmin, qmax, 0, per_row, symmetric)
                cases.append(Case(f"{name}, observer {observer}, fake quant {fake_quant}", op, args, wrt=(0,)))
    return cases


def _attention_module_cases() -> list[Case]:
    """nn.MultiheadAttention (which calls F.multi_head_attention_forward) in its configurations and calls."""
    cases = []
    configs = {"default": {}, "batch_first": {"batch_first": True}, "kdim/vdim": {"kdim": 3, "vdim": 5},
               "bias_kv, zero_attn": {"add_bias_kv": True, "add_zero_attn": True}, "no bias": {"bias": False}}
    for cname, config in configs.items():
        torch.manual_seed(0)
        module = nn.MultiheadAttention(4, 2, **config).to(D).eval()
        names = [k for k, _ in module.named_parameters()]
        b, lq, lk = 2, 3, 4
        first = config.get("batch_first", False)
        shape = (lambda l, d: (b, l, d)) if first else (lambda l, d: (l, b, d))
        q, k, v = _t(*shape(lq, 4)), _t(*shape(lk, config.get("kdim", 4)), seed=1), _t(*shape(lk, config.get("vdim", 4)), seed=2)
        padding = torch.tensor([[False, False, True, True], [False, True, False, False]])
        calls = {
            "plain": {},
            "need_weights=False": {"need_weights": False},
            "bool key_padding_mask": {"key_padding_mask": padding},
            "float key_padding_mask": {"key_padding_mask": torch.zeros(b, lk, dtype=D).masked_fill(padding, float("-inf"))},
            "bool attn_mask": {"attn_mask": torch.tensor([[False, True, False, False]] * lq)},
            "per-head weights": {"average_attn_weights": False},
            "causal": {"attn_mask": nn.Transformer.generate_square_subsequent_mask(lq, dtype=D)[:, :lk].contiguous()
                       if lq == lk else None, "is_causal": lq == lk},
        }
        for call, kwargs in calls.items():
            kwargs = {key: val for key, val in kwargs.items() if val is not None}
            if "bias_kv" in cname and ("key_padding_mask" in kwargs or "attn_mask" in kwargs):
                continue  # the mask grows with the extra key; covered by OpInfo's own sample
            for training in (False,):
                fn = _attention_call(module.train(training), names, kwargs)
                cases.append(Case(f"MultiheadAttention {cname}, {call}", fn,
                                  (*[p.detach() for p in module.parameters()], q, k, v)))
        cases.append(Case(f"MultiheadAttention {cname}, train, dropout", _attention_call(
            nn.MultiheadAttention(4, 2, dropout=0.5, **config).to(D).train(), names, {}),
            (*[p.detach() for p in module.parameters()], q, k, v), random=True))
    return cases


def _attention_call(module, names, kwargs):
    def fn(*args):
        params, (q, k, v) = args[: len(names)], args[len(names):]
        return functional_call(module, dict(zip(names, params)), (q, k, v), kwargs)

    return fn


def cases_for(op) -> list[Case]:
    return _opinfo_cases(op) + _module_cases(op) + extra_cases(op)


# -------------------------------------------------------------------------------- comparison


def _map(obj, f):
    if isinstance(obj, Tensor):
        return f(obj)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map(o, f) for o in obj)
    if isinstance(obj, dict):
        return {k: _map(v, f) for k, v in obj.items()}
    return obj


def _tensors(obj) -> list[Tensor]:
    out: list[Tensor] = []
    _map(obj, lambda t: out.append(t) or t)
    return out


def _fresh(case: Case):
    return _map(case.args, lambda t: t.detach().clone()), _map(case.kwargs, lambda t: t.detach().clone())


@contextlib.contextmanager
def _mode(exact: bool, case: Case):
    """What mgs_torch puts in place while it runs a model: the op replacements, and the module forwards."""
    if not exact:
        yield
    elif case.module is not None:
        with exact_computation(case.module):
            yield
    else:
        with ExactOps():
            yield


def _run(case: Case, exact: bool):
    args, kwargs = _fresh(case)
    with _mode(exact, case), torch.random.fork_rng():
        out = case.fn(*args, **kwargs)
    return out, args, kwargs


def _same(a, b, what: str, rtol=1e-9, atol=1e-11) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert len(ta) == len(tb), f"{what}: {len(ta)} tensors against {len(tb)}"
    for x, y in zip(ta, tb):
        x, y = (t.to_dense() if t.layout != torch.strided else t for t in (x, y))  # sparse=True: the same values
        assert x.shape == y.shape and x.dtype == y.dtype, f"{what}: {x.shape}/{x.dtype} against {y.shape}/{y.dtype}"
        if x.is_floating_point():
            torch.testing.assert_close(y, x, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{what}: {m}")
        else:
            assert torch.equal(x, y), what


def _floats(op, case: Case, args, kwargs) -> list[Tensor]:
    if case.wrt is not None:
        return [args[i] for i in case.wrt]
    fixed = _running_statistics(op, args, kwargs)
    return [t for t in _tensors((args, kwargs)) if t.is_floating_point() and id(t) not in fixed]


def _first_derivative(op, case: Case, exact: bool, shift: list[Tensor] | None = None, create_graph: bool = False):
    """(leaves, vjp of a fixed random cotangent) for every floating argument, after ``leaf + shift``."""
    args, kwargs = _fresh(case)
    leaves = [t.requires_grad_() for t in _floats(op, case, args, kwargs)]
    ids = {id(t): i for i, t in enumerate(leaves)}

    def use(t):  # a non-leaf copy, so that in-place ops may act on it
        i = ids.get(id(t))
        return t if i is None else (leaves[i] + shift[i] if shift is not None else leaves[i] * 1.0)

    a, k = _map(args, use), _map(kwargs, use)
    with _mode(exact, case), torch.random.fork_rng():
        out = case.fn(*a, **k)
    outs = [t for t in _tensors(out) if t.is_floating_point() and t.requires_grad]
    if not outs:
        return leaves, None
    g = torch.Generator().manual_seed(7)
    cot = [torch.randn(o.shape, dtype=o.dtype, generator=g) for o in outs]
    grads = torch.autograd.grad(outs, leaves, cot, allow_unused=True, create_graph=create_graph)
    return leaves, [torch.zeros_like(l) if d is None else d for d, l in zip(grads, leaves)]


def _refused(op, error: Exception) -> bool:
    return isinstance(error, UnsupportedLayerError) and op in REFUSALS


def check_case(op, case: Case) -> str:
    """Compare the replacement with the public op on one case; returns "match" or "refused"."""
    try:
        theirs, args_t, kwargs_t = _run(case, exact=False)
    except Exception:  # noqa: BLE001 - the public op refuses these arguments: nothing to be faithful to
        return "public op fails"
    try:
        ours, args_o, kwargs_o = _run(case, exact=True)
    except Exception as error:  # noqa: BLE001
        if _refused(op, error):
            return "refused"
        raise
    shapes = [(tuple(t.shape), t.dtype) for t in _tensors(theirs)], [(tuple(t.shape), t.dtype) for t in _tensors(ours)]
    assert shapes[0] == shapes[1], f"{case.label}: outputs {shapes[0]} against {shapes[1]}"
    # in-place effects on every argument (running statistics aside: see RUNNING_STATISTICS)
    after_t, after_o = list(_tensors((args_t, kwargs_t))), list(_tensors((args_o, kwargs_o)))
    skip = _running_statistics(op, args_t, kwargs_t)
    for i, (x, y) in enumerate(zip(after_t, after_o)):
        if id(x) in skip:
            continue
        if case.random:  # the same in-place behaviour: changed where the public op changes it
            before = _tensors((case.args, case.kwargs))[i]
            assert torch.equal(x, before) == torch.equal(y, before), f"{case.label}: argument {i} in-place effect differs"
        else:
            _same(x, y, f"{case.label}: argument {i} after the call")
    if case.random:
        return "match"
    _same(theirs, ours, f"{case.label}: values")
    reference = case
    if any(case.kwargs.get(k, v) != v for k, v in DERIVATIVE_WITHOUT.get(op, {}).items()):
        reference = dataclasses.replace(case, kwargs={**case.kwargs, **DERIVATIVE_WITHOUT[op]})
    _, d_ours = _first_derivative(op, case, exact=True)
    try:
        leaves, d_theirs = _first_derivative(op, reference, exact=False)
    except RuntimeError:  # PyTorch's own backward fails here: check against its values instead
        _same(_finite_difference_vjp(op, reference), d_ours, f"{case.label}: first derivatives (finite differences)",
              rtol=1e-6, atol=1e-8)
        return "match (public backward fails)"
    if d_theirs is None:
        return "match"
    try:
        _same(d_theirs, d_ours, f"{case.label}: first derivatives", rtol=UPSTREAM_RTOL.get(op, 1e-8), atol=1e-10)
    except AssertionError:
        # the truth is the public op's function: where its own backward disagrees with its values (an upstream
        # derivative bug, pinned in test_upstream_bugs.py), the replacement must agree with those values
        by_values = _finite_difference_vjp(op, reference)
        _same(by_values, d_ours, f"{case.label}: first derivatives (finite differences)", rtol=1e-6, atol=1e-8)
        with pytest.raises(AssertionError):
            _same(by_values, d_theirs, "the public backward", rtol=1e-6, atol=1e-8)
        return "match (public backward wrong)"
    if case.smooth:
        _check_second_derivative(op, case, reference, leaves)
    _check_per_sample(case)
    return "match"


def _finite_difference_vjp(op, case: Case) -> list[Tensor]:
    """The vjp of :func:`_first_derivative` (same cotangent) by central differences of the public op's values,
    entry by entry (the cases are small)."""
    args, kwargs = _fresh(case)
    leaves = _floats(op, case, args, kwargs)
    with torch.random.fork_rng():
        outs = [t for t in _tensors(case.fn(*args, **kwargs)) if t.is_floating_point()]
    g = torch.Generator().manual_seed(7)
    cot = [torch.randn(o.shape, dtype=o.dtype, generator=g) for o in outs]
    h, grads = 1e-6, []
    for leaf in leaves:
        grad = torch.zeros_like(leaf)
        flat = leaf.view(-1)
        for e in range(flat.numel()):
            values = []
            for step in (h, -h):
                old = float(flat[e])
                flat[e] = old + step
                with torch.random.fork_rng():
                    out = [t for t in _tensors(case.fn(*args, **kwargs)) if t.is_floating_point()]
                flat[e] = old
                values.append(sum(float((o * c).sum()) for o, c in zip(out, cot)))
            grad.view(-1)[e] = (values[0] - values[1]) / (2 * h)
        grads.append(grad)
    return grads


def _check_second_derivative(op, case: Case, reference: Case, leaves: list[Tensor]) -> None:
    """⟨∇(w·vjp), v⟩ of the replacement against a central difference of the public vjp (of ``reference``) along v."""
    g = torch.Generator().manual_seed(11)
    v = [torch.randn(l.shape, dtype=D, generator=g) for l in leaves]
    w = [torch.randn(l.shape, dtype=D, generator=g) for l in leaves]
    ours_leaves, first = _first_derivative(op, case, exact=True, create_graph=True)
    inner = sum((f * wi).sum() for f, wi in zip(first, w))
    if not inner.requires_grad:  # linear in every argument: the second derivative is zero
        ours = 0.0
    else:
        second = torch.autograd.grad(inner, ours_leaves, allow_unused=True)
        ours = sum(float((s * vi).sum()) for s, vi in zip(second, v) if s is not None)

    def central(h: float) -> float:
        hi = _first_derivative(op, reference, exact=False, shift=[h * vi for vi in v])[1]
        lo = _first_derivative(op, reference, exact=False, shift=[-h * vi for vi in v])[1]
        return sum(float(((a - b) * wi).sum()) for a, b, wi in zip(hi, lo, w)) / (2 * h)

    theirs = (4 * central(1e-5) - central(2e-5)) / 3  # Richardson: error O(h⁴), not O(h²)
    scale = max(1.0, abs(theirs), sum(float(f.detach().norm()) for f in first))
    assert abs(ours - theirs) <= 1e-6 * scale, f"{case.label}: second derivative {ours} against finite differences {theirs}"


def _check_per_sample(case: Case) -> None:
    """``vmap`` over a batch of two variants of the arguments against the public op on each."""
    args, kwargs = _fresh(case)
    flat = [t for t in _tensors(args)]
    if not flat or any(t.dim() == 0 and not t.is_floating_point() for t in flat):
        return
    g = torch.Generator().manual_seed(3)

    def variant(t: Tensor) -> Tensor:
        return t + 0.1 * torch.randn(t.shape, dtype=t.dtype, generator=g) if t.is_floating_point() else t

    for batch_all in (False, True):
        # the per-sample arguments: every tensor, or those a case differentiates (an op's buffers stay shared)
        positions = list(case.wrt) if case.wrt is not None else [i for i, a in enumerate(args) if isinstance(a, Tensor)]
        batched = positions if batch_all else positions[:1]
        stacked = list(args)
        for i in batched:
            stacked[i] = torch.stack([args[i], variant(args[i])])

        def one(*xs):
            a = list(args)
            for i, x in zip(batched, xs):
                a[i] = x
            return tuple(_tensors(case.fn(*a, **kwargs)))  # the tensors only (need_weights=False gives None)

        try:
            with _mode(False, case):
                theirs = [one(*[stacked[i][s] for i in batched]) for s in range(2)]
        except Exception:  # noqa: BLE001 - the variant is no valid input of the public op
            continue
        with _mode(True, case):
            ours = vmap(one, randomness="error")(*[stacked[i] for i in batched])
        for s in range(2):
            _same(_tensors(theirs[s]), _map(_tensors(ours), lambda t: t[s]), f"{case.label}: sample {s} under vmap"
                  f" ({'every tensor argument' if batch_all else 'first argument'} batched)")


ALL_REPLACED = list(REPLACED_OPS) + [op for op in _CONVOLUTIONS if op not in REPLACED_OPS] + list(EXACT_FORWARDS)


def _name(op) -> str:
    return getattr(op, "__qualname__", getattr(op, "__name__", str(op)))


def test_every_replacement_has_cases():
    """A replacement added to op_fixes without cases here fails this test."""
    missing = [_name(op) for op in ALL_REPLACED if not cases_for(op)]
    assert not missing, f"replacements without faithfulness cases: {missing}"


def _public_defaults(op) -> dict | None:
    """The public op's keyword defaults: from its signature, or from the signature line its docstring
    opens with (``conv2d(input, weight, bias=None, stride=1, ...) -> Tensor`` for builtins)."""
    try:
        return {k: p.default for k, p in inspect.signature(op).parameters.items() if p.default is not inspect.Parameter.empty}
    except (TypeError, ValueError):
        pass
    text = " ".join((op.__doc__ or "").split())
    name = getattr(op, "__name__", "")
    if not name or not text.startswith(name + "(") or ") ->" not in text:
        return None
    args = ast.parse(f"def f{text[len(name):text.index(') ->') + 1]}: pass").body[0].args
    positional = args.posonlyargs + args.args
    named = list(zip(positional[len(positional) - len(args.defaults):], args.defaults))
    named += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
    return {a.arg: ast.literal_eval(d) for a, d in named}


def _replacement(op):
    return REPLACED_OPS.get(op) or _CONVOLUTIONS[op]


# the replacements with their own argument list (the others forward *args/**kwargs, or replace a _VF
# builtin with no documented signature: their faithfulness cases cover them; EXACT_FORWARDS replace a
# module's forward, whose arguments are the module's own)
WITH_SIGNATURES = [
    op for op in ALL_REPLACED
    if op not in EXACT_FORWARDS and _public_defaults(op) is not None
    and not any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in inspect.signature(_replacement(op)).parameters.values())
]


@pytest.mark.parametrize("op", WITH_SIGNATURES, ids=_name)
def test_replacement_has_the_public_ops_defaults(op):
    """An argument left out must mean the same to the replacement as to the public op (OpInfo samples
    mostly pass every argument: a changed default eps or use_input_stats passed every other test)."""
    public, params = _public_defaults(op), inspect.signature(_replacement(op)).parameters
    for name, default in public.items():
        assert name in params, f"{_name(op)}'s replacement has no argument {name!r}"
        assert params[name].default == default, f"{_name(op)}: default {name}={params[name].default!r}, the public op's is {default!r}"


@pytest.mark.parametrize("op", ALL_REPLACED, ids=_name)
def test_replacement_is_faithful_to_the_public_op(op):
    opt_in = op in _CONVOLUTIONS and op not in REPLACED_OPS
    if opt_in:
        use_transposed_convolution_backward(True)
    try:
        outcomes = {}
        for case in cases_for(op):
            outcome = check_case(op, case)
            # the padding row's zero gradient is PyTorch's definition, not an upstream bug to route around
            assert not (op in DEFINED_BACKWARDS and outcome == "match (public backward wrong)"), (case.label, outcome)
            outcomes[outcome.split(" (")[0]] = outcomes.get(outcome.split(" (")[0], 0) + 1
    finally:
        if opt_in:
            use_transposed_convolution_backward(False)
    assert outcomes.get("match", 0) > 0, outcomes
    if "refused" in outcomes:
        assert op in REFUSALS


# the torch.* aliases: builtins without a Python signature or docstring; their defaults are in the ATen schema
ATEN_ALIASES = {torch.layer_norm: "aten::layer_norm", torch.native_layer_norm: "aten::native_layer_norm",
                torch.instance_norm: "aten::instance_norm", torch.batch_norm: "aten::batch_norm",
                torch.fused_moving_avg_obs_fake_quant: "aten::fused_moving_avg_obs_fake_quant"}


@pytest.mark.parametrize("op", list(ATEN_ALIASES), ids=_name)
def test_alias_replacement_has_the_aten_schemas_arguments_and_defaults(op):
    """``torch.layer_norm(x, shape)`` leaves eps out: the replacement's default must be ATen's (the faithfulness
    cases call the aliases with every argument, so a wrong default passed them). The same for the fused
    FakeQuantize op, which has no Python signature either."""
    (schema,) = [s for s in torch._C._jit_get_schemas_for_operator(ATEN_ALIASES[op]) if s.overload_name == ""]
    params = list(inspect.signature(REPLACED_OPS[op]).parameters.values())
    assert [p.name for p in params] == [{"self": "input"}.get(a.name, a.name) for a in schema.arguments]
    for p, a in zip(params, schema.arguments):
        assert (p.default is not inspect.Parameter.empty) == a.has_default_value(), p.name
        if a.has_default_value():
            assert p.default == a.default_value, f"{_name(op)}: default {p.name}={p.default!r}, ATen's is {a.default_value!r}"


def test_layer_norm_alias_with_its_defaults_is_the_public_op():
    """The value check beside the schema one: eps left out, on inputs whose variance is near eps."""
    torch.manual_seed(0)
    x = 1e-3 * torch.randn(3, 5, dtype=torch.float64)
    torch.testing.assert_close(REPLACED_OPS[torch.layer_norm](x, (5,)), torch.layer_norm(x, (5,)), rtol=1e-12, atol=1e-12)


class _PaddedBag(nn.Module):
    """F.embedding / F.embedding_bag called with the padding index as given (nn.Embedding makes a negative
    one positive when it is built; the functional ops take it as it comes)."""

    def __init__(self, bag: bool, padding_idx: int):
        super().__init__()
        self.bag, self.padding_idx = bag, padding_idx
        self.weight, self.head = nn.Parameter(torch.randn(6, 3)), nn.Linear(3, 2)

    def forward(self, i):
        if self.bag:
            e = F.embedding_bag(i, self.weight, mode="sum", padding_idx=self.padding_idx)
        else:
            e = F.embedding(i, self.weight, padding_idx=self.padding_idx).mean(1)
        return self.head(torch.tanh(e))


@pytest.mark.parametrize("bag", [False, True], ids=["embedding", "embedding_bag"])
@pytest.mark.parametrize("padding_idx", [1, -1])
def test_padding_rows_get_pytorchs_zero_gradient_in_k(bag, padding_idx):
    """The padding row is a constant by PyTorch's definition (its gradient is zero, whatever its values): the
    faithfulness cases accept a derivative that matches the values by finite differences, which the padding
    convention is not, so K is checked against the autograd loop here. A negative index counts from the end."""
    from mgs_torch import mgs_kernel
    from reference import kernel_loop, relative_error

    torch.manual_seed(0)
    model = _PaddedBag(bag, padding_idx).double()
    idx = torch.tensor([[0, 2, 5], [1, 5, 5], [3, 1, 4]])
    for strategy in ("jacobian", "structured", "auto"):
        assert relative_error(mgs_kernel(model, idx, strategy=strategy), kernel_loop(model, idx)) < 1e-12
    if bag:
        return  # PyTorch has no double backward of embedding_bag: its penalty gradients are the audit's (by formula)
    from mgs_torch import mgs_penalty
    from reference import penalty_grad_loop, trainable

    for strategy in ("jacobian", "structured", "auto"):
        for kind in ("trace", "logdet"):
            value = mgs_penalty(model, idx, strategy=strategy, kind=kind, reduction="sum")
            ours = torch.autograd.grad(value, trainable(model), allow_unused=True)
            for a, b, p in zip(ours, penalty_grad_loop(model, idx, kind), trainable(model)):
                a, b = (torch.zeros_like(p) if g is None else g for g in (a, b))
                assert float((a - b).norm()) <= 1e-10 * max(float(b.norm()), 1.0), (strategy, kind)


def test_train_mode_rrelu_replacement_draws_slopes_as_the_public_op():
    """The random cases only compare shapes and in-place effects: here the slopes themselves. On negative inputs
    both draw slope ~ U(lower, upper) per element (the replacement from the same generator, not the same numbers)."""
    x = -torch.rand(20000, dtype=torch.float64) - 0.5
    for rrelu in (F.rrelu, REPLACED_OPS[F.rrelu]):
        torch.manual_seed(0)
        slope = rrelu(x, 0.1, 0.3, training=True) / x
        assert 0.1 <= float(slope.min()) and float(slope.max()) <= 0.3, rrelu
        assert abs(float(slope.mean()) - 0.2) < 0.005 and abs(float(slope.std()) - 0.2 / 12**0.5) < 0.005, rrelu
    positive = torch.rand(100, dtype=torch.float64) + 0.1
    assert torch.equal(REPLACED_OPS[F.rrelu](positive, 0.1, 0.3, training=True), positive)


def test_embedding_bag_with_2d_input_and_offsets_raises_as_the_public_op():
    """The public op refuses offsets beside a 2-D input (each row is a bag already); the replacement must not
    compute a kernel for a call model(x) cannot make (the faithfulness cases skip what the public op refuses)."""
    from mgs_torch import mgs_kernel

    class Bags(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight, self.head = nn.Parameter(torch.randn(6, 3)), nn.Linear(3, 2)

        def forward(self, i):
            return self.head(F.embedding_bag(i, self.weight, offsets=torch.tensor([0, 1]), mode="sum"))

    idx, offsets = torch.tensor([[0, 2], [1, 5], [3, 4]]), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="offsets"):
        Bags()(idx)
    with pytest.raises(ValueError, match="if input is 2D, then offsets has to be None"):  # the replacement itself
        REPLACED_OPS[F.embedding_bag](idx, torch.randn(6, 3), offsets=offsets)
    with pytest.raises(ValueError, match="offsets"):
        mgs_kernel(Bags(), idx, strategy="jacobian")


def test_multi_head_attention_replacement_returns_the_weights_when_need_weights_is_left_out():
    """need_weights defaults to True in F.multi_head_attention_forward: called without it, the replacement must
    return the averaged attention weights as the public op does (not None)."""
    torch.manual_seed(0)
    d, heads = 4, 2
    q = torch.randn(3, 2, d, dtype=torch.float64)  # (length, batch, embed)
    args = (q, q, q, d, heads, torch.randn(3 * d, d, dtype=torch.float64), torch.randn(3 * d, dtype=torch.float64),
            None, None, False, 0.0, torch.randn(d, d, dtype=torch.float64), torch.randn(d, dtype=torch.float64))
    theirs = F.multi_head_attention_forward(*args)
    ours = REPLACED_OPS[F.multi_head_attention_forward](*args)
    assert theirs[1] is not None and ours[1] is not None
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-12, atol=1e-12)
    assert REPLACED_OPS[F.multi_head_attention_forward](*args, need_weights=False)[1] is None


def test_the_transposed_convolution_backward_is_switched_on_and_off():
    """The opt-in replaces the convolutions only while on (its own tests in test_audit.py need it really on)."""
    try:
        use_transposed_convolution_backward()  # the default: on
        assert all(REPLACED_OPS.get(op) is _CONVOLUTIONS[op] for op in _CONVOLUTIONS)
    finally:
        use_transposed_convolution_backward(False)
    assert not any(op in REPLACED_OPS for op in _CONVOLUTIONS)


@pytest.mark.parametrize("op", [F.prelu, F.rrelu], ids=["prelu", "rrelu (eval)"])
@pytest.mark.parametrize("shape", [(5,), (4, 3), (2, 3, 4), (2, 3, 2, 2)])
def test_activation_replacements_at_exact_zeros_match_the_public_op(op, shape):
    """Values and first derivatives (input and slope) at inputs of exactly 0, where the public op takes the slope
    branch: the OpInfo samples draw random inputs and never hit 0."""
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64)
    x.view(-1)[::2] = 0.0
    for weight in (torch.tensor([0.25], dtype=torch.float64), torch.rand(shape[1] if len(shape) > 1 else 1, dtype=torch.float64)):
        results = []
        for fn in (op, REPLACED_OPS[op]):
            xi, wi = x.clone().requires_grad_(), weight.clone().requires_grad_()
            y = fn(xi, wi) if op is F.prelu else fn(xi, 0.1, 0.3, training=False)
            cot = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
            grads = torch.autograd.grad(y, [xi, wi] if op is F.prelu else [xi], cot, allow_unused=True)
            results.append((y.detach(), grads))
        (y_t, g_t), (y_o, g_o) = results
        torch.testing.assert_close(y_o, y_t, rtol=0, atol=0)
        for a, b in zip(g_o, g_t):
            torch.testing.assert_close(a, b, rtol=1e-15, atol=1e-15)
