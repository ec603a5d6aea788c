"""Test session setup: 8 fake CPU devices (for mesh tests) and float32 matmuls at full precision."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# Compiled programs are shared between the test workers and across test files.
jax.config.update("jax_compilation_cache_dir", os.environ.get("AKI_JAX_TEST_JIT_CACHE", "/tmp/aki-jax-test-jit-cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

import pytest  # noqa: E402

import aki_jax  # noqa: E402
from aki_jax.processing import SYSTEM_MESSAGE  # noqa: E402

# Texts the shared tiny tokenizer is trained on: the chat template's system sentence and short questions.
TINY_TOKENIZER_TEXTS = [SYSTEM_MESSAGE, "What is in the picture? A cat on a mat.", "the cat sat on the mat"] * 20


@pytest.fixture(scope="session")
def tiny_params():
    """(aki_jax.tiny(), its params from key 0), built once per session and shared: a test that changes
    leaves works on a copy (`jax.tree.map(lambda x: x, params)` copies the dicts, arrays are immutable)."""
    config = aki_jax.tiny()
    return config, aki_jax.init_params(config, jax.random.key(0))


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    """A folder holding a 400-entry tokenizer (`aki_jax.processing.train_tokenizer`), built once per session."""
    from aki_jax.processing import train_tokenizer

    out = tmp_path_factory.mktemp("tiny_tokenizer")
    train_tokenizer(TINY_TOKENIZER_TEXTS, 400, out)
    return out
