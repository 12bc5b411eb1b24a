"""A fixed sample of random architectures (tests/random_models.py) against the per-sample autograd loop.

Each seed composes 2–5 blocks from every layer family (convolutions with random stride, padding and
groups, normalisations, pooling, residual blocks, recurrent and attention layers, reused blocks) and
checks K, tr K and the trace and log-det penalty gradients for every strategy ("auto" too) in float64, plus one
of: the output-summed K, chunk_size=1, or J restricted to some parameters. What the search found is
pinned by name elsewhere (a module registered twice and a conv stem feeding tokens in model_zoo, a
penalty constant in θ in test_penalty), since a change of the grammar redraws every seed.
``python tests/random_models.py --seeds 0:3000`` searches wider (about 7 minutes on one core).
"""

from __future__ import annotations

import warnings

import pytest

from random_models import check, random_model

SAMPLE = list(range(60))


@pytest.mark.parametrize("seed", SAMPLE)
def test_random_architecture_matches_the_loop(seed):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # jitter notices for nearly singular K
        problems = check(seed)
    assert not problems, "\n".join(problems)


def test_the_generator_is_deterministic_and_varied():
    a, b = random_model(3), random_model(3)
    assert a[2] == b[2] and all((p - q).abs().max() == 0 for p, q in zip(a[0].parameters(), b[0].parameters()))
    layouts = {random_model(s)[2].split(" ")[1] for s in range(30)}
    assert layouts <= {"image", "sequence", "tokens", "vector", "volume"} and len(layouts) >= 4
