"""Test session setup: 8 simulated CPU devices and no hub access, set before jax is imported."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

# One persistent XLA compilation cache for the whole test run: the pytest-xdist workers and every `jrlhf` subprocess a
# test starts inherit this variable, so a program that several tests compile (the same tiny model's train step,
# sampler or evaluation) is compiled once. Entries are keyed by the program, jax version and flags, so a hit is the
# same executable. JRLHF_TEST_JAX_CACHE=0 turns it off; the directory is removed when the creating process exits.
if os.environ.get("JRLHF_TEST_JAX_CACHE", "1") != "0" and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _cache_dir = tempfile.mkdtemp(prefix="jrlhf-test-xla-cache-")
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import importlib.util  # noqa: E402

import pytest  # noqa: E402

# Optional test dependencies. The suite runs without them (the second CI leg: newest JAX on Python 3.12, no
# PyTorch); tests marked with one of these markers then skip with a reason naming the extra that brings it.
_OPTIONAL = {
    "torch": ("torch", "needs PyTorch (torch): install the `test` extra, pip install -e '.[test]'"),
    "trl": ("trl", "needs TRL (trl, with PyTorch): install the `test` extra, pip install -e '.[test]'"),
}


def _missing(module: str) -> bool:
    return importlib.util.find_spec(module) is None


def pytest_configure(config):
    for marker, (module, reason) in _OPTIONAL.items():
        config.addinivalue_line("markers", f"{marker}: {reason}; skipped when `{module}` is not installed")


def pytest_collection_modifyitems(config, items):
    for item in items:
        for marker, (module, reason) in _OPTIONAL.items():
            if item.get_closest_marker(marker) is not None and _missing(module):
                item.add_marker(pytest.mark.skip(reason=reason))
                break



@pytest.fixture
def require():
    """``require("torch")`` skips the rest of a test, with the reason naming the extra, when that optional package
    is missing: for a test whose last check needs it after checks that do not (they have passed by then)."""

    def check(marker: str) -> None:
        module, reason = _OPTIONAL[marker]
        if _missing(module):
            pytest.skip(f"{reason} (the checks before this point passed)")

    return check
