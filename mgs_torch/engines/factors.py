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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def _gram_rows(G: Tensor, outputs: str) -> Tensor:
    """Gram of per-sample gradients G (k, n, P): (n·k)² ordered (sample, output), or n×n summed over k."""
    k, n, _ = G.shape
    if outputs == "full":
        flat = G.transpose(0, 1).reshape(n * k, -1)
        return flat @ flat.T
    return torch.einsum("kip,kjp->ij", G, G)


@dataclass
class DirectFactor:
    """Per-sample gradients (k, n, P) given explicitly (biases, normalisation affines)."""

    grads: Tensor

    def row_sq_norms(self) -> Tensor:
        return (self.grads**2).flatten(2).sum(-1)

    def kernel(self, outputs: str) -> Tensor:
        return _gram_rows(self.grads.flatten(2), outputs)


@dataclass
class OuterFactor:
    """Per-sample gradient Σ_t g_t ⊗ a_t for a (n, G, T, I) and g (k, n, G, T, O)."""

    a: Tensor
    g: Tensor

    # ---- cost model (multiply-adds), used to pick ghost or materialised products
    def _dims(self):
        k, n, G, T, O = self.g.shape
        return k, n, G, T, O, self.a.shape[-1]

    def _ghost_is_cheaper(self, quantity: str) -> bool:
        k, n, G, T, O, I = self._dims()
        make = k * n * G * T * O * I
        if quantity == "rows":
            return n * G * T * T * (I + k * O) < make
        if quantity == "full":
            return n * n * G * T * T * (I + k * k * O) < make + (k * n) ** 2 * G * O * I
        return n * n * G * T * T * (I + k * O) < make + k * n * n * G * O * I

    # ---- the two routes; subclasses with implicit activations override these three
    def gram_within(self) -> Tensor:
        """(n, G, T, T): a_igt · a_igs."""
        return torch.einsum("ngtc,ngsc->ngts", self.a, self.a)

    def gram_across(self) -> Tensor:
        """(n, n, G, T, T): a_igt · a_jgs."""
        return torch.einsum("igtc,jgsc->ijgts", self.a, self.a)

    def materialize(self) -> Tensor:
        """Per-sample gradients (k, n, G·O·I)."""
        return torch.einsum("kngto,ngtc->kngoc", self.g, self.a).flatten(2)

    # ---- contributions
    def row_sq_norms(self) -> Tensor:
        k, n, G, T, O, I = self._dims()
        if not self._ghost_is_cheaper("rows"):
            return DirectFactor(self.materialize()).row_sq_norms()
        if T == 1 and type(self) is OuterFactor:
            return torch.einsum("kng,ng->kn", (self.g**2).sum(-1)[..., 0], (self.a**2).sum(-1)[..., 0])
        B = torch.einsum("kngto,kngso->kngts", self.g, self.g)
        return (B * self.gram_within()).sum((2, 3, 4))

    def kernel(self, outputs: str) -> Tensor:
        k, n, G, T, O, I = self._dims()
        if not self._ghost_is_cheaper(outputs):
            return _gram_rows(self.materialize(), outputs)
        A = self.gram_across()  # (n, n, G, T, T)
        if outputs == "full":
            if T == 1:
                g0 = self.g[:, :, :, 0]
                K = torch.einsum("kigo,ljgo,ijg->ikjl", g0, g0, A[..., 0, 0])
            else:
                K = torch.einsum("kigto,ljgso,ijgts->ikjl", self.g, self.g, A)
            return K.reshape(n * k, n * k)
        B = torch.einsum("kigto,kjgso->ijgts", self.g, self.g)
        return (A * B).sum((2, 3, 4))


@dataclass
class IndexOuterFactor(OuterFactor):
    """:class:`OuterFactor` whose activations are one-hot rows given by indices (embeddings).

    ``a`` holds indices (n, G, T) into ``num_embeddings`` rows; a_t·a_s = [idx_t = idx_s].
    """

    num_embeddings: int = 0

    def _dims(self):
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
