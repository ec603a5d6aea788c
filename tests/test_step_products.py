"""benchmarks/step_products.py reads a compiled step's matrix products: every dot, counted as often as it runs."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from step_products import step_products  # noqa: E402

LAYERS, B, T, D, E = 3, 2, 16, 32, 8


def forward(x, weights, out_kernel):
    """A scan of LAYERS layers (attention-like batched products, then a projection), then an output head."""

    def layer(h, w):
        scores = jnp.einsum("btd,bsd->bts", h, h)  # batch dims: f[B, T, T]
        h = jnp.tanh(jnp.einsum("bts,bsd->btd", jax.nn.softmax(scores), h) @ w)
        return h, None

    h, _ = jax.lax.scan(layer, x, weights)
    return jnp.einsum("btd,de->bte", h, out_kernel)


def forward_flops() -> int:
    per_layer = 2 * B * T * T * D + 2 * B * T * T * D + 2 * B * T * D * D
    return LAYERS * per_layer + 2 * B * T * D * E


@pytest.fixture(scope="module")
def operands():
    keys = jax.random.split(jax.random.key(0), 3)
    return (
        jax.random.normal(keys[0], (B, T, D)),
        jax.random.normal(keys[1], (LAYERS, D, D)) / D,
        jax.random.normal(keys[2], (D, E)),
    )


def test_the_forward_products_are_counted_once_per_layer(operands):
    counts = step_products(jax.jit(forward).lower(*operands).compile().as_text())
    assert sum(counts.values()) == 3 * LAYERS + 1
    assert sum(p.flops() * n for p, n in counts.items()) == forward_flops()
    (head,) = [p for p in counts if p.label.endswith("fwd") and p.sizes()[3] == E]
    assert counts[head] == 1 and head.sizes() == (1, B * T, D, E)
    batched = [p for p in counts if p.sizes()[0] == B]
    assert len(batched) == 2 and all(counts[p] == LAYERS for p in batched)


def test_a_gradient_doubles_every_product_and_labels_it_backward(operands):
    loss = lambda *args: jnp.sum(forward(*args) ** 2)  # noqa: E731
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))  # every input: no transposed product is dead code
    counts = step_products(grad.lower(*operands).compile().as_text())
    flops = {direction: sum(p.flops() * n for p, n in counts.items() if p.label.endswith(direction))
             for direction in ("fwd", "bwd")}  # fmt: skip
    assert flops["fwd"] == forward_flops()
    assert flops["bwd"] == 2 * forward_flops()
