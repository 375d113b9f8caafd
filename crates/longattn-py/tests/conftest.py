"""Shared fixtures and tolerances for the longattn package tests.

Run: ``/work/venv/bin/python -m pytest crates/longattn-py/tests -q`` (after installing the
package, see crates/longattn-py/README.md). ``-m "not slow"`` leaves out the few larger cases;
CI runs everything.
"""
import os
import random
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # `import reference` from any working directory

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
# dtypes the package supports per device (CUDA kernels are bf16/f16 only).
DEVICE_DTYPES = {
    "cpu": (torch.float32, torch.bfloat16, torch.float16),
    "cuda": (torch.bfloat16, torch.float16),
}


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a larger case (still run in CI)")


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same RNG state, so failures reproduce."""
    torch.manual_seed(1234)
    np.random.seed(1234)
    random.seed(1234)
    yield


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def require_cuda():
    if not HAS_CUDA:
        pytest.skip("needs CUDA: no CUDA device")


def skip_unsupported(device, dtype):
    """A (device, dtype) pair outside the package's support matrix is skipped, saying why."""
    if dtype not in DEVICE_DTYPES[device]:
        pytest.skip(f"{dtype} is not supported on {device} (by design)")


# ------------------------------------------------------------------------------------------
# Tolerances, stated once, as multiples of the dtype's machine epsilon
# (torch.finfo(dtype).eps: f32 1.19e-7, bf16 7.81e-3, f16 9.77e-4).
#
# The inputs are generated in the test dtype and the reference upcasts exactly those values to
# float64, so input rounding is not part of the error; what remains is the kernel's own
# rounding:
# * bf16 / f16: the output is rounded to the dtype (eps/2 relative) and, in flash-style kernels,
#   the probabilities P are rounded to the dtype before the P @ V product (eps/2 relative per
#   weight, averaging out over keys). |out| <= max|v| ~ 4 for randn inputs, so
#   atol = rtol = 3 eps (bf16 2.3e-2, f16 2.9e-3) bounds both with margin; an indexing or
#   masking error moves the output by O(0.1 .. 1), far outside it.
# * f32: no storage rounding beyond eps, but vectorized exp approximations (~1e-7 .. 1e-6
#   relative), a different summation order over up to 4k keys and the online-softmax rescaling
#   add up to ~1e-5; 2^10 eps = 1.2e-4 keeps a 10x margin and is still ~1000x below a masking
#   error.
# * lse is float32 in every dtype but its logits come from dtype inputs (a kernel may fold the
#   scale into q in the input dtype), so it gets the dtype's tolerance relative to |lse|.
# * gradients accumulate dS = P * (dP - delta) over Sq or Sk terms, with dS rounded to the dtype
#   on the bf16/f16 paths; they get 2x the output multiple, with atol relative to the largest
#   reference gradient magnitude (gradients of 1e-3 sitting next to gradients of 10 are judged
#   on the scale of 10, which is how the rounding behaves).
# Measured on the CPU kernels (Sk up to 4224, D up to 128): outputs reach ~0.1 of these bounds
# in bf16 / f16 and ~0.01 in f32, gradients ~0.1 in bf16 / f16.
# ------------------------------------------------------------------------------------------
EPS_MULTIPLE = {torch.float32: 2.0 ** 10, torch.bfloat16: 3.0, torch.float16: 3.0}
GRAD_FACTOR = 2.0


def tol(dtype):
    """(atol, rtol) for outputs in ``dtype``."""
    t = EPS_MULTIPLE[dtype] * torch.finfo(dtype).eps
    return t, t


def _fmt_err(actual, expected, what):
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    d = (a - e).abs()
    d = torch.where(torch.isnan(d), torch.full_like(d, float("inf")), d)
    idx = np.unravel_index(int(torch.argmax(d)), tuple(d.shape)) if d.numel() else ()
    return (f"{what}: max abs err {float(d.max()) if d.numel() else 0:.3g} at index "
            f"{tuple(int(i) for i in idx)} (got {float(a[idx]) if d.numel() else 0:.6g}, "
            f"want {float(e[idx]) if d.numel() else 0:.6g}), shape {tuple(a.shape)}")


def assert_close(actual, expected, dtype, what="out"):
    """Compare a kernel result (any dtype/device) with a float64 reference under tol(dtype).

    Infinities must match exactly (-inf lse on empty rows); NaN anywhere fails.
    """
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != " \
                                           f"{tuple(expected.shape)}"
    atol, rtol = tol(dtype)
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    assert not torch.isnan(a).any(), f"{what}: NaN in the result ({int(torch.isnan(a).sum())})"
    inf_e = torch.isinf(e)
    assert torch.equal(torch.isinf(a), inf_e) and torch.equal(a[inf_e], e[inf_e]), \
        f"{what}: infinities differ ({int(torch.isinf(a).sum())} vs {int(inf_e.sum())})"
    a, e = a[~inf_e], e[~inf_e]
    ok = (a - e).abs() <= atol + rtol * e.abs()
    assert bool(ok.all()), _fmt_err(actual.detach().to("cpu", torch.float64)[~inf_e],
                                    expected.detach().to("cpu", torch.float64)[~inf_e], what)


def assert_grad_close(actual, expected, dtype, what="grad"):
    """Gradients: tolerance GRAD_FACTOR x tol(dtype), relative to max |reference|."""
    assert actual is not None, f"{what}: no gradient"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != " \
                                           f"{tuple(expected.shape)}"
    atol, rtol = tol(dtype)
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    assert torch.isfinite(a).all(), f"{what}: non-finite gradient entries"
    scale = max(float(e.abs().max()), 1e-6)
    ok = (a - e).abs() <= GRAD_FACTOR * (atol * scale + rtol * e.abs())
    assert bool(ok.all()), _fmt_err(a, e, what) + f" (scale {scale:.3g})"


def randn(*shape, dtype=torch.float32, device="cpu", scale=1.0):
    """Standard-normal test data in ``dtype`` (never all zeros)."""
    x = torch.randn(*shape, dtype=torch.float32) * scale
    return x.to(dtype).to(device)


def leaf64(x):
    """A float64 CPU copy of ``x`` (exact upcast) that requires grad, for reference autograd."""
    return x.detach().to("cpu", torch.float64).requires_grad_(True)
