"""The structured engine: every layer rule, both Gram routes, and exact fallback for the rest."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import assert_close, reference_kernel
from model_zoo import Scale, ScaleRule
from reference import kernel_loop, relative_error
from mgs_torch import mgs_kernel, mgs_trace, register_layer_rule, verify
from mgs_torch._guards import preserved_state
from mgs_torch._problem import build_problem
from mgs_torch.engines import LAYER_RULES, factors, structured


def plan_of(model, x, **kw):
    with preserved_state(model, "eval"):
        return structured.plan(build_problem(model, x, **kw))


def check_both_outputs(model, x, **kw):
    for outputs in ("full", "sum"):
        assert_close(mgs_kernel(model, x, strategy="structured", outputs=outputs, **kw), reference_kernel(model, x, outputs=outputs))
    assert_close(mgs_trace(model, x, strategy="structured", **kw), reference_kernel(model, x).trace())


# --------------------------------------------------------------------------- covered layers


class Sequence(nn.Module):
    """Embedding (with padding_idx) -> Linear on (n, T, d) -> LayerNorm -> pooled head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4, padding_idx=0)
        self.lin = nn.Linear(4, 5)
        self.norm = nn.LayerNorm(5)
        self.head = nn.Linear(5, 2)

    def forward(self, idx):
        h = self.norm(torch.tanh(self.lin(self.emb(idx))))
        return self.head(h.mean(1))


class Convs(nn.Module):
    """Conv1d, Conv2d with 'same', reflect padding, dilation, stride and groups; GroupNorm, BatchNorm1d."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(2, 4, 3, padding="same", dilation=2)
        self.bn1 = nn.BatchNorm1d(4)
        self.c2 = nn.Conv2d(1, 4, (3, 2), padding=1, padding_mode="reflect", stride=(1, 2))
        self.gn = nn.GroupNorm(2, 4)
        self.c3 = nn.Conv2d(4, 4, 2, groups=4, bias=False)
        self.head = nn.Linear(4 * 6 + 4 * 7 * 3, 3)

    def forward(self, x1, x2):
        a = torch.tanh(self.bn1(self.c1(x1))).flatten(1)
        b = self.c3(torch.tanh(self.gn(self.c2(x2)))).flatten(1)
        return self.head(torch.cat([a, b], 1))


def _conv_inputs():
    return (torch.randn(3, 2, 6, dtype=torch.float64), torch.randn(3, 1, 8, 7, dtype=torch.float64))


def test_sequence_layers_are_covered_and_exact():
    torch.manual_seed(0)
    model = Sequence().double()
    idx = torch.tensor([[1, 2, 0, 2], [3, 3, 6, 0], [5, 0, 0, 1]])
    assert plan_of(model, idx).fallback == {}
    check_both_outputs(model, idx)


def test_convolution_variants_are_covered_and_exact():
    torch.manual_seed(0)
    model = Convs().double().eval()
    with torch.no_grad():
        model.bn1.running_mean.uniform_(-1, 1)
        model.bn1.running_var.uniform_(0.5, 2)
    x = _conv_inputs()
    assert plan_of(model, x).fallback == {}
    check_both_outputs(model, x)


@pytest.mark.parametrize("ghost", [True, False])
@pytest.mark.parametrize("model_name", ["sequence", "convs"])
def test_ghost_and_materialised_products_agree(monkeypatch, ghost, model_name):
    """Force each Gram route for every factor (T = 1 and T > 1, dense and index activations)."""
    monkeypatch.setattr(factors.OuterFactor, "ghost_is_cheaper", lambda self, quantity: ghost)
    if not ghost:
        monkeypatch.setattr(factors.ConvFactor, "ghost_is_cheaper", lambda self, quantity: False)
    torch.manual_seed(0)
    if model_name == "sequence":
        model, x = Sequence().double(), torch.tensor([[1, 2, 0, 2], [3, 3, 6, 0]])
    else:
        model, x = Convs().double().eval(), _conv_inputs()
    check_both_outputs(model, x)


# --------------------------------------------------------------------------- fallbacks


class Custom(nn.Module):
    """A layer no rule knows: y = x ⊙ w + x²·c."""

    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d))
        self.c = nn.Parameter(torch.randn(()))

    def forward(self, x):
        return x * self.w + x**2 * self.c


class WithCustom(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.custom, self.b = nn.Linear(3, 4), Custom(4), nn.Linear(4, 2)

    def forward(self, x):
        return self.b(torch.tanh(self.custom(self.a(x))))


class SharedLayer(nn.Module):
    """The same Linear applied twice: its per-sample gradient sums two uses."""

    def __init__(self):
        super().__init__()
        self.inp, self.shared, self.out = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.out(self.shared(torch.tanh(self.shared(self.inp(x)))))


class Tied(nn.Module):
    """Output projection tied to the embedding (weight used by two layers)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(6, 3)
        self.proj = nn.Linear(3, 6, bias=False)
        self.proj.weight = self.emb.weight

    def forward(self, idx):
        return self.proj(torch.tanh(self.emb(idx).sum(1)))


class ParentUsesChildWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        h = self.lin(x)
        return F.linear(torch.tanh(h), self.lin.weight)  # a second, foreign use


class MyLinear(nn.Linear):
    """A subclass with its own forward must not borrow nn.Linear's rule."""

    def forward(self, x):
        return super().forward(x) * 2.0 + self.bias


class InPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = self.a(x)
        h.relu_()  # modifies the covered layer's output in place
        return self.b(h)


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        y, _ = self.attn(x, x, x)
        return self.head(y.mean(1))


class CrossAttention(Attention):
    """Queries from one half of the sequence, keys and values from the other: no rule (self-attention only)."""

    def forward(self, x):
        y, _ = self.attn(x[:, :1], x[:, 1:], x[:, 1:])
        return self.head(y.mean(1))


class SeparateProjections(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, kdim=3, vdim=3, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        y, _ = self.attn(x, x[..., :3], x[..., :3])
        return self.head(y.mean(1))


@pytest.mark.parametrize(
    "make, x, expect_fallback",
    [
        (WithCustom, torch.randn(4, 3), {"custom.w", "custom.c"}),
        (SharedLayer, torch.randn(4, 3), {"shared.weight", "shared.bias"}),
        (Tied, torch.tensor([[0, 1], [2, 5], [3, 3]]), {"emb.weight"}),
        (ParentUsesChildWeight, torch.randn(4, 3), {"lin.weight", "lin.bias"}),
        (lambda: nn.Sequential(MyLinear(3, 3), nn.Tanh(), nn.Linear(3, 2)), torch.randn(4, 3), {"0.weight", "0.bias"}),
        (InPlace, torch.randn(4, 3), set()),
        (Attention, torch.randn(3, 2, 4), set()),  # self-attention: MultiheadAttentionRule
        (CrossAttention, torch.randn(3, 3, 4), {"attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias"}),
        (SeparateProjections, torch.randn(3, 2, 4), {"attn.q_proj_weight", "attn.k_proj_weight", "attn.v_proj_weight",
                                                     "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias"}),
    ],
    ids=["custom-layer", "layer-run-twice", "tied-weights", "foreign-use", "subclass", "in-place", "attention", "cross-attention",
         "separate-projections"],
)
def test_uncovered_parameters_fall_back_exactly(make, x, expect_fallback):
    torch.manual_seed(0)
    model = make().double()
    x = x.double() if x.is_floating_point() else x
    p = plan_of(model, x)
    assert set(p.fallback) == expect_fallback
    assert all(isinstance(reason, str) and reason for reason in p.fallback.values())
    check_both_outputs(model, x)


def test_register_layer_rule_covers_a_custom_layer():
    model = nn.Sequential(nn.Linear(3, 4), Scale(4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    assert "1.weight" in plan_of(model, x).fallback
    register_layer_rule(Scale, ScaleRule())
    try:
        assert plan_of(model, x).fallback == {}
        check_both_outputs(model, x)
    finally:
        del LAYER_RULES[Scale]
    with pytest.raises(TypeError, match="nn.Module subclass"):
        register_layer_rule(int, ScaleRule())
    with pytest.raises(TypeError, match="LayerRule instance"):
        register_layer_rule(Scale, object())
    from mgs_torch import layer_rule, unregister_layer_rule

    with pytest.raises(TypeError, match="nn.Module subclass"):
        unregister_layer_rule(int)
    with pytest.raises(TypeError, match="nn.Module subclass"):
        with layer_rule("Linear", None):
            pass


@pytest.mark.parametrize("removal", ["del", "pop"])
def test_removing_a_rule_replans_at_once(removal):
    """A cached plan that used a rule is not reused after the rule is removed (the registry's version changes)."""
    model = nn.Sequential(nn.Linear(3, 4), Scale(4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    routes = lambda: structured.cached_plan(build_problem(model, x))[0].routes()  # noqa: E731 - the plan mgs_kernel uses
    register_layer_rule(Scale, ScaleRule())
    try:
        mgs_kernel(model, x, strategy="structured")
        assert routes()["1.weight"] == "rule:Scale"
    finally:
        if removal == "del":
            del LAYER_RULES[Scale]
        else:
            LAYER_RULES.pop(Scale)
    assert Scale not in LAYER_RULES
    assert routes()["1.weight"] == "reference: no rule for Scale"


def test_layer_called_with_keyword_input():
    class Kw(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.b(input=torch.tanh(self.a(input=x)))

    model = Kw().double()
    x = torch.randn(3, 3, dtype=torch.float64)
    assert plan_of(model, x).fallback == {}
    check_both_outputs(model, x)


def test_conv3d_is_covered_through_materialised_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(2, 3, 2, stride=(1, 2, 1), padding=1, groups=1), nn.Tanh(), nn.Conv3d(3, 3, 2, groups=3), nn.Flatten(), nn.LazyLinear(2))
    x = torch.randn(3, 2, 3, 4, 3, dtype=torch.float64)
    model(x.float())  # materialise the lazy layer
    model = model.double()
    assert plan_of(model, x).fallback == {}
    check_both_outputs(model, x)


def test_plans_are_cached_per_signature_and_rebuilt_when_stale(monkeypatch):
    class Switch(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)
            self.use_b = True

        def forward(self, x):
            h = torch.tanh(self.a(x))
            return self.head(torch.tanh(self.b(h)) if self.use_b else h)

    calls = []
    real_plan = structured.plan
    monkeypatch.setattr(structured, "plan", lambda problem: calls.append(1) or real_plan(problem))
    model = Switch().double()
    x = torch.randn(4, 3, dtype=torch.float64)
    check_both_outputs(model, x)
    assert len(calls) == 1  # one discovery forward for four computations
    mgs_kernel(model, torch.randn(6, 3, dtype=torch.float64), strategy="structured")  # batch size is not in the key
    assert len(calls) == 1
    mgs_kernel(model, x, strategy="structured", params=["a"])  # a different selection is
    assert len(calls) == 2
    model.use_b = False  # same signature, different forward: the cached plan is stale
    check_both_outputs(model, x)
    assert len(calls) == 3
    with pytest.raises(ValueError, match="non-finite"):  # outputs are still validated on a cached plan
        with torch.no_grad():
            model.head.bias.fill_(float("nan"))
        mgs_trace(model, x, strategy="structured")


@pytest.mark.parametrize("outputs", ["full", "sum"])
def test_kernel_gradient_is_exact_for_an_asymmetric_use_of_k(outputs):
    """Inside a structured kernel each Gram's backward assumes a symmetric incoming gradient, and the
    kernel symmetrises its gradient once at the top. A loss that uses K asymmetrically (K[0, 1] and
    an upper triangle) must still get the loop's gradient."""
    from reference import kernel_loop, trainable

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4 * 4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(3, 1, 6, 6, dtype=torch.float64)
    weights = torch.randn(9 if outputs == "full" else 3, 9 if outputs == "full" else 3, dtype=torch.float64).triu()

    def loss(K):
        return K[0, 1] + (weights * K).sum()

    params = trainable(model)[:-1]  # the output bias does not move K

    def grads(K):
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss(K), params)])

    ours = grads(mgs_kernel(model, x, strategy="structured", outputs=outputs, create_graph=True))
    assert_close(ours, grads(kernel_loop(model, x, outputs=outputs, create_graph=True)), 1e-10)


class _Tokens(nn.Module):
    """A Linear over T tokens and a grouped convolution: outer-product factors with T = 1, 2, 3, G = 2."""

    def __init__(self, tokens: int):
        super().__init__()
        self.tokens = tokens
        self.conv = nn.Conv1d(4, 4, 1, groups=2)
        self.lin = nn.Linear(4, 3)
        self.head = nn.Linear(3 * tokens, 2)

    def forward(self, x):
        h = self.conv(x.transpose(1, 2)).transpose(1, 2)  # (n, T, 4)
        return self.head(torch.tanh(self.lin(torch.tanh(h))).flatten(1))


@pytest.mark.parametrize("ghost", [True, False])
@pytest.mark.parametrize("tokens", [1, 2, 3])
@pytest.mark.parametrize("outputs", ["full", "sum"])
def test_outer_factor_kernels_both_ways_for_every_token_count(tokens, outputs, ghost, monkeypatch):
    """Both ways an outer-product layer's Gram is formed (ghost: from activation and output-gradient
    Grams, with its own branch for T = 1; or from materialised per-sample gradients), forced either way,
    for T = 1, 2, 3 tokens and a grouped (G = 2) layer, against the loop."""
    monkeypatch.setattr(factors.OuterFactor, "ghost_is_cheaper", lambda self, quantity: ghost)
    torch.manual_seed(0)
    model = _Tokens(tokens).double()
    x = torch.randn(3, tokens, 4, dtype=torch.float64)
    K = mgs_kernel(model, x, strategy="structured", outputs=outputs)
    assert relative_error(K, kernel_loop(model, x, outputs=outputs).detach()) <= 1e-12
    assert relative_error(mgs_trace(model, x, strategy="structured"), kernel_loop(model, x).trace().detach()) <= 1e-12


class _AttentionCalledPositionally(nn.Module):
    """nn.MultiheadAttention called the way user code may: masks as positional arguments, and its averaged attention
    weights (returned by default) used as features beside its output."""

    def __init__(self, positional: bool, d: int = 4, heads: int = 2):
        super().__init__()
        self.attn, self.head = nn.MultiheadAttention(d, heads, batch_first=True), nn.Linear(d + 3, 2)
        self.positional = positional

    def forward(self, x, keep):
        causal = torch.ones(x.shape[1], x.shape[1]).triu(1).bool()
        if self.positional:
            y, w = self.attn(x, x, x, ~keep, True, causal)  # key_padding_mask, need_weights, attn_mask by position
        else:
            y, w = self.attn(x, x, x, key_padding_mask=~keep)  # need_weights and average_attn_weights left out
        return self.head(torch.cat([y.mean(1), w.mean(1)], -1))


@pytest.mark.parametrize("strategy", ["structured", "auto"])
@pytest.mark.parametrize("positional", [True, False], ids=["positional", "defaults"])
def test_multihead_attention_rule_reads_positional_masks_and_returns_default_weights(strategy, positional):
    torch.manual_seed(0)
    model = _AttentionCalledPositionally(positional).double()
    x = torch.randn(4, 3, 4, dtype=torch.float64)
    keep = torch.tensor([[True, True, True], [True, True, False], [True, False, False], [True, True, True]])
    K = mgs_kernel(model, (x, keep), strategy=strategy)
    assert relative_error(K, kernel_loop(model, (x, keep))) < 1e-10
    assert verify(model, (x, keep), strategy=strategy).routes["attn.in_proj_weight"] == "rule:MultiheadAttention"


class _TokenScores(nn.Module):
    """A score per token: the last Linear has one output and sees every sample as T rows (O = 1, T > 1)."""

    def __init__(self):
        super().__init__()
        self.a, self.score = nn.Linear(3, 4), nn.Linear(4, 1)

    def forward(self, x):
        return self.score(torch.tanh(self.a(x))).squeeze(-1)  # (n, T)


@pytest.mark.parametrize("strategy", ["structured", "auto"])
def test_one_output_per_token_trace_and_kernel(strategy):
    torch.manual_seed(0)
    model, x = _TokenScores().double(), torch.randn(3, 5, 3, dtype=torch.float64)
    expected = kernel_loop(model, x)
    assert relative_error(mgs_kernel(model, x, strategy=strategy), expected) < 1e-10
    assert relative_error(mgs_trace(model, x, strategy=strategy), expected.trace()) < 1e-10


class _SelfAttentionWithDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn, self.head = nn.MultiheadAttention(4, 2, dropout=1.0, batch_first=True), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.attn(x, x, x, need_weights=False)[0].mean(1) + x.mean(1)))


@pytest.mark.parametrize("strategy", ["structured", "auto"])
def test_multihead_attention_rule_applies_attention_dropout_in_training(strategy):
    """dropout = 1 zeroes every attention weight in training, deterministically: the rule's recomputation of the
    attention must drop them as the module does (in eval it keeps them)."""
    torch.manual_seed(0)
    x = torch.randn(3, 4, 4, dtype=torch.float64)
    for mode in (True, False):
        model = _SelfAttentionWithDropout().double().train(mode)
        assert relative_error(mgs_kernel(model, x, strategy=strategy), kernel_loop(model, x)) < 1e-10
