"""aki-jax's recomputing attention against `jax.nn.dot_product_attention` (an independent implementation)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aki_jax.config import AKIConfig
from aki_jax.layers import dot_product_attention, recomputing_attention
from aki_jax.mask import IMAGE, PAD, QUERY, TEXT, attention_mask


def _inputs(dtype, seed=0, b=2, t=24, n=3, h=8):
    keys = jax.random.split(jax.random.key(seed), 4)
    q, k, v, d_out = (jax.random.normal(key, (b, t, n, h), jnp.float32).astype(dtype) for key in keys)
    # An MMA layout with left padding in row 1: its PAD queries see no key at all.
    modality = np.array(
        [[TEXT] * 4 + [IMAGE] * 8 + [QUERY] * 6 + [TEXT] * 6, [PAD] * 5 + [TEXT] * 3 + [IMAGE] * 8 + [QUERY] * 8]
    )
    mask = attention_mask(jnp.asarray(modality))
    assert not bool(mask[1, 0].any()), "row 1 should start with fully masked queries"
    return q, k, v, d_out, mask


def _value_and_grads(fn, q, k, v, d_out, mask):
    def loss(q, k, v):
        out = fn(q, k, v, mask)
        return jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32)), out

    (_, out), grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v)
    return out, grads


@pytest.mark.parametrize("with_mask", [True, False])
def test_matches_jax_nn_forward_and_backward_fp32(with_mask):
    q, k, v, d_out, mask = _inputs(jnp.float32)
    mask = mask if with_mask else None
    ours = _value_and_grads(recomputing_attention, q, k, v, d_out, mask)
    ref = _value_and_grads(
        lambda q, k, v, m: dot_product_attention(q, k, v, m, implementation="xla"), q, k, v, d_out, mask
    )
    np.testing.assert_allclose(ours[0], ref[0], atol=2e-6, rtol=1e-5)
    for name, a, b in zip("qkv", ours[1], ref[1], strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4, err_msg=f"d{name}")


def test_fully_masked_query_averages_values_and_gets_no_gradient():
    q, k, v, d_out, mask = _inputs(jnp.float32)
    out, (dq, _, _) = _value_and_grads(recomputing_attention, q, k, v, d_out, mask)
    np.testing.assert_allclose(out[1, :5], np.broadcast_to(v[1].mean(0), (5,) + v.shape[2:]), atol=1e-6)
    assert np.all(np.asarray(dq[1, :5]) == 0)
    assert np.all(np.isfinite(np.asarray(dq)))


def test_bfloat16_close_to_fp32_reference():
    q, k, v, d_out, mask = _inputs(jnp.bfloat16)
    out, grads = _value_and_grads(recomputing_attention, q, k, v, d_out, mask)
    f32 = [x.astype(jnp.float32) for x in (q, k, v, d_out)]
    ref_out, ref_grads = _value_and_grads(recomputing_attention, *f32, mask)
    assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
    np.testing.assert_allclose(out.astype(jnp.float32), ref_out, atol=3e-2)
    for a, b in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(a.astype(jnp.float32), b, atol=6e-2)


def test_unknown_implementation_is_refused():
    q, k, v, _, mask = _inputs(jnp.float32)
    with pytest.raises(ValueError, match="attention implementation must be one of"):
        dot_product_attention(q, k, v, mask, implementation="flash")
    with pytest.raises(ValueError, match="AKIConfig.attention_impl must be"):
        AKIConfig(attention_impl="flash")
