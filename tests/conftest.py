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
