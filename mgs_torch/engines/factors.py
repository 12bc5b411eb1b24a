"""Per-sample gradients of one parameter in factored form, and their Gram products.

A layer rule (:mod:`mgs_torch.engines.layers`) turns a layer's saved input and its output-gradients
for k cotangents into factors; here they become the parameter's contribution to K or to the row
norms. Notation: n samples, k cotangents (k = q one-hot outputs for the exact kernel), G groups,
T positions sharing the weight (sequence or spatial), I inputs and O outputs per group
(einsum letters: k/l cotangents, i/j/n samples, g group, t/s positions, c inputs, o outputs).

* :class:`DirectFactor` holds the per-sample gradients themselves, shape (k, n, P).
* :class:`OuterFactor` holds a (n, G, T, I) and g (k, n, G, T, O); the per-sample gradient of a
  weight block is Σ_t g[k,i,g,t] ⊗ a[i,g,t]. Its Gram products are either computed *ghost*-style,
  ⟨G_ki, G_lj⟩ = Σ_{g,t,s} (a_igt·a_jgs)(g_kigt·g_ljgs) without forming the gradients (cost ∝ T²),
  or by materialising the gradients (cost ∝ T·O·I); the cheaper is chosen per factor.
* :class:`IndexOuterFactor` (embeddings: one-hot activations given as indices) and
  :class:`ConvFactor` (convolutions: patches never unfolded unless the ghost route is cheaper;
  per-sample gradients from one grouped ``convolution_backward``) specialise it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


class _SymmetricGram(torch.autograd.Function):
    """X Xᵀ for X (..., m, d) whose backward is one product, (Ḡ + Ḡᵀ) X, where autograd's matmul
    backward takes two (Ḡ X and Ḡᵀ X); the backward is itself differentiable."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return x @ x.mT

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return (grad + grad.mT) @ x


class _GramUsedSymmetrically(_SymmetricGram):
    """X Xᵀ whose backward is 2 Ḡ X: valid when the incoming gradient Ḡ is symmetric, which
    :func:`kernel_with_symmetric_gradient` guarantees for every Gram inside a kernel it wraps (each
    Gram is used there as itself or Hadamard-multiplied by a symmetric matrix). Saves forming Ḡ + Ḡᵀ,
    a strided (n·q)² pass per layer."""

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return 2 * (grad @ x)


class _SymmetricGradient(torch.autograd.Function):
    """Identity on a symmetric matrix K(θ), whose backward symmetrises the incoming gradient once:
    ⟨Ḡ, dK⟩ = ⟨(Ḡ + Ḡᵀ)/2, dK⟩ for every symmetric dK, so nothing upstream changes."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return (grad + grad.mT) / 2


_symmetric_grads_inside = False


def symmetric_gram(x: Tensor) -> Tensor:
    """X Xᵀ over the last two dimensions (batched), with a one-product backward."""
    return (_GramUsedSymmetrically if _symmetric_grads_inside else _SymmetricGram).apply(x)


def kernel_with_symmetric_gradient(compute):
    """``compute()`` builds a kernel (a sum of Grams, each used symmetrically); its gradient is
    symmetrised once at the top, so each Gram's backward is one product without a transpose-add."""
    global _symmetric_grads_inside
    previous, _symmetric_grads_inside = _symmetric_grads_inside, True
    try:
        return _SymmetricGradient.apply(compute())
    finally:
        _symmetric_grads_inside = previous


def _gram_rows(G: Tensor, outputs: str) -> Tensor:
    """Gram of per-sample gradients G (k, n, P): (n·k)² ordered (sample, output), or n×n summed over k."""
    k, n, _ = G.shape
    if outputs == "full":
        return symmetric_gram(G.transpose(0, 1).reshape(n * k, -1))
    return symmetric_gram(G.transpose(0, 1).reshape(n, -1))


class DirectFactor:
    """Per-sample gradients (k, n, P) given explicitly (biases, normalisation affines)."""

    def __init__(self, grads: Tensor):
        self.grads = grads

    def row_sq_norms(self) -> Tensor:
        return (self.grads**2).flatten(2).sum(-1)

    def kernel(self, outputs: str) -> Tensor:
        return _gram_rows(self.grads.flatten(2), outputs)


class OuterFactor:
    """Per-sample gradient Σ_t g_t ⊗ a_t for a (n, G, T, I) and g (k, n, G, T, O)."""

    def __init__(self, a: Tensor, g: Tensor):
        self.a, self.g = a, g

    # ---- shape and cost model (multiply-adds), used to pick ghost or materialised products
    def dims(self) -> tuple[int, int, int, int, int, int]:
        """(k, n, G, T, O, I)."""
        k, n, G, T, O = self.g.shape
        return k, n, G, T, O, self.a.shape[-1]

    def ghost_operands(self) -> tuple[Tensor, Tensor]:
        """(a, g) laid out as (n, G, T, I) and (k, n, G, T, O)."""
        return self.a, self.g

    def ghost_is_cheaper(self, quantity: str) -> bool:
        k, n, G, T, O, I = self.dims()
        make = k * n * G * T * O * I
        if quantity == "rows":
            return n * G * T * T * (I + k * O) < make
        if quantity == "full":
            return n * n * G * T * T * (I + k * k * O) < make + (k * n) ** 2 * G * O * I
        return n * n * G * T * T * (I + k * O) < make + k * n * n * G * O * I

    # ---- the two routes
    def gram_within(self) -> Tensor:
        """(n, G, T, T): a_igt · a_igs."""
        a, _ = self.ghost_operands()
        return torch.einsum("ngtc,ngsc->ngts", a, a)

    def gram_across(self) -> Tensor:
        """(n, n, G, T, T): a_igt · a_jgs."""
        a, _ = self.ghost_operands()
        return torch.einsum("igtc,jgsc->ijgts", a, a)

    def materialize(self) -> Tensor:
        """Per-sample gradients (k, n, G·O·I)."""
        a, g = self.ghost_operands()
        return torch.einsum("kngto,ngtc->kngoc", g, a).flatten(2)

    # ---- contributions
    def row_sq_norms(self) -> Tensor:
        if not self.ghost_is_cheaper("rows"):
            return DirectFactor(self.materialize()).row_sq_norms()
        a, g = self.ghost_operands()
        if g.shape[3] == 1 and type(self) is OuterFactor:
            return torch.einsum("kng,ng->kn", (g**2).sum(-1)[..., 0], (a**2).sum(-1)[..., 0])
        B = torch.einsum("kngto,kngso->kngts", g, g)
        return (B * self.gram_within()).sum((2, 3, 4))

    def kernel(self, outputs: str) -> Tensor:
        if not self.ghost_is_cheaper(outputs):
            return _gram_rows(self.materialize(), outputs)
        k, n, G, T = self.dims()[:4]
        _, g = self.ghost_operands()
        A = self.gram_across()  # (n, n, G, T, T)
        if T == 1:  # K_l = (g gᵀ) ⊙ (a aᵀ ⊗ 1): two Grams per group and a product
            A = A[..., 0, 0].permute(2, 0, 1)  # (G, n, n)
            g0 = g[:, :, :, 0].permute(2, 1, 0, 3)  # (G, n, k, O)
            if outputs == "full":
                B = symmetric_gram(g0.reshape(G, n * k, -1)).view(G, n, k, n, k)
                K = B * A.view(G, n, 1, n, 1)
                return (K.squeeze(0) if G == 1 else K.sum(0)).reshape(n * k, n * k)
            K = A * symmetric_gram(g0.reshape(G, n, -1))
            return K.squeeze(0) if G == 1 else K.sum(0)
        if outputs == "full":
            K = torch.einsum("kigto,ljgso,ijgts->ikjl", g, g, A)
            return K.reshape(n * k, n * k)
        B = torch.einsum("kigto,kjgso->ijgts", g, g)
        return (A * B).sum((2, 3, 4))


class IndexOuterFactor(OuterFactor):
    """:class:`OuterFactor` whose activations are one-hot rows given by indices (embeddings).

    ``a`` holds indices (n, G, T) into ``num_embeddings`` rows; a_t·a_s = [idx_t = idx_s].
    """

    def __init__(self, a: Tensor, g: Tensor, num_embeddings: int):
        super().__init__(a, g)
        self.num_embeddings = num_embeddings

    def dims(self):
        k, n, G, T, O = self.g.shape
        return k, n, G, T, O, self.num_embeddings

    def gram_within(self) -> Tensor:
        return (self.a.unsqueeze(-1) == self.a.unsqueeze(-2)).to(self.g.dtype)

    def gram_across(self) -> Tensor:
        return (self.a[:, None, :, :, None] == self.a[None, :, :, None, :]).to(self.g.dtype)

    def materialize(self) -> Tensor:
        k, n, G, T, O = self.g.shape
        out = self.g.new_zeros(k, n, G, self.num_embeddings, O)
        idx = self.a.unsqueeze(0).unsqueeze(-1).expand(k, n, G, T, O)
        return out.scatter_add(3, idx, self.g).flatten(2)


class ConvFactor(OuterFactor):
    """Convolution weight: Σ_t g_t ⊗ patch_t over output positions t, for a (n, C_in, *spatial).

    ``a`` must already carry any non-zero or asymmetric padding; ``padding`` is the remaining
    symmetric zero padding. Materialised per-sample gradients (cost k·n·T·O·I, double-differentiable)
    come from one ``convolution_backward`` with the samples as groups (as Opacus and functorch do),
    on CUDA with several cotangents from the unfolded patches (1-D and 2-D); the ghost route unfolds too.
    """

    def __init__(self, a: Tensor, g: Tensor, kernel_size, stride, padding, dilation, groups: int):
        self.raw_a, self.raw_g = a, g
        self.kernel_size, self.stride, self.padding = tuple(kernel_size), tuple(stride), tuple(padding)
        self.dilation, self.groups = tuple(dilation), groups
        self._operands: tuple[Tensor, Tensor] | None = None

    def dims(self):
        k, n, C_out = self.raw_g.shape[:3]
        G = self.groups
        T = math.prod(self.raw_g.shape[3:])
        return k, n, G, T, C_out // G, self.raw_a.shape[1] // G * math.prod(self.kernel_size)

    def ghost_is_cheaper(self, quantity: str) -> bool:
        return len(self.kernel_size) <= 2 and super().ghost_is_cheaper(quantity)

    def ghost_operands(self):
        if self._operands is None:
            k, n, G, T, O, I = self.dims()
            a = self.raw_a
            ks, dil, pad, st = self.kernel_size, self.dilation, self.padding, self.stride
            if a.dim() == 3:  # 1-D as 2-D of height 1
                a, ks, dil, pad, st = a.unsqueeze(2), (1, *ks), (1, *dil), (0, *pad), (1, *st)
            U = F.unfold(a, ks, dilation=dil, padding=pad, stride=st)  # (n, C_in·Πk, T)
            self._operands = (
                U.reshape(n, G, I, T).transpose(2, 3),
                self.raw_g.reshape(k, n, G, O, T).transpose(3, 4),
            )
        return self._operands

    def materialize(self) -> Tensor:
        if self.raw_a.is_cuda and len(self.kernel_size) <= 2 and self.raw_g.shape[0] > 1:
            # cuDNN runs a convolution with n·k groups as hundreds of small launches: with k = q = 10
            # cotangents unfolded patches and one batched matmul were faster on an H200 (exact trace step
            # of the residual CNN 106 → 79 ms at n = 128); with k = 1 (Hutchinson) the grouped one was
            # faster and smaller, so it stays (benchmarks/RESULTS.md, GPU section)
            return self.materialize_unfolded()
        return self.materialize_grouped()

    def materialize_unfolded(self) -> Tensor:
        """Per-sample gradients from the unfolded patches: Σ_t g_t ⊗ patch_t as one batched matmul."""
        return super().materialize()

    def materialize_grouped(self) -> Tensor:
        """Per-sample gradients from one convolution_backward with the samples as groups."""
        k, n, G, T, O, I = self.dims()
        a, g = self.raw_a, self.raw_g
        C_in, spatial = a.shape[1], a.shape[2:]
        # samples become groups: output channels ordered (sample, group, cotangent, channel)
        grad_out = g.reshape(k, n, G, O, *g.shape[3:]).permute(1, 2, 0, 3, *range(4, g.dim() + 1))
        grad_out = grad_out.reshape(1, n * G * k * O, *g.shape[3:])
        weight = a.new_empty(()).expand(n * G * k * O, C_in // G, *self.kernel_size)
        _, gw, _ = torch.ops.aten.convolution_backward(
            grad_out, a.reshape(1, n * C_in, *spatial), weight, None, self.stride, self.padding,
            self.dilation, False, [0] * len(spatial), n * G, (False, True, False),
        )
        return gw.reshape(n, G, k, O * I).transpose(0, 2).transpose(1, 2).reshape(k, n, -1)
