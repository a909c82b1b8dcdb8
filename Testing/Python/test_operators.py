"""Forward operators: adjointness, pseudo-inverses, intensity conventions, argument errors."""

import itertools
import warnings

import numpy as np
import pytest
import torch
from conftest import smooth_volume

from MRISuperResLib.errors import InputError
from MRISuperResLib.physics import KINDS, OperatorSpec, PartialBlockWarning

SPECS = [("slice-removal", 0, 3), ("slice-removal", 2, 4), ("thick-slice", 1, 4), ("thick-slice", 2, 2.5),
         ("downsample", 0, 2), ("downsample", (0, 1, 2), (2, 3, 1.5)), ("kspace", 2, 4), ("kspace", (0, 1), 2)]
SHAPES = [(12, 12, 16), (13, 11, 17)]  # dividing and non-dividing


def _bind(kind, axis, factor, shape, profile="gaussian"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PartialBlockWarning)
        return OperatorSpec.make(kind, axis, factor, profile).bind_hr(shape)


@pytest.mark.parametrize("spec, shape", list(itertools.product(SPECS, SHAPES)))
def test_adjoint_dot_product(spec, shape, device):
    op = _bind(*spec, shape)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(device)
    y = torch.randn(op.lr_shape, generator=g, dtype=torch.float64).to(device)
    lhs = float((op.forward(x) * y).sum())
    rhs = float((x * op.adjoint(y)).sum())
    assert abs(lhs - rhs) <= 1e-5 * max(1.0, abs(lhs))


@pytest.mark.parametrize("spec, shape", list(itertools.product(SPECS, SHAPES)))
def test_dagger_is_right_inverse_and_projection(spec, shape):
    op = _bind(*spec, shape)
    g = torch.Generator().manual_seed(1)
    y = torch.randn(op.lr_shape, generator=g, dtype=torch.float64)
    torch.testing.assert_close(op.forward(op.dagger(y)), y, atol=1e-8, rtol=1e-8)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    torch.testing.assert_close(op.forward(op.data_consistency(x, y)), y, atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("spec, shape", list(itertools.product(SPECS, SHAPES)))
def test_spread_consistency_is_exact(spec, shape):
    op = _bind(*spec, shape)
    g = torch.Generator().manual_seed(2)
    y = torch.randn(op.lr_shape, generator=g, dtype=torch.float64)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    for spread in ("linear", "cubic"):
        torch.testing.assert_close(op.forward(op.data_consistency(x, y, spread)), y, atol=1e-8, rtol=1e-8)


def test_spread_consistency_carries_a_smooth_error_between_slices():
    """A generator's smooth bias seen on the kept slices is removed everywhere, not only on those slices."""
    op = _bind("slice-removal", 2, 4, (6, 6, 32))
    k = torch.arange(32, dtype=torch.float64)
    truth = torch.sin(k / 5.0).expand(6, 6, 32)
    biased = truth + 0.3 + 0.01 * k  # smooth (linear) error
    y = op.forward(truth)
    pasted = op.data_consistency(biased, y)
    spread = op.data_consistency(biased, y, "linear")
    inner = slice(8, 24)  # away from the ends, where the boundary rule of the interpolator matters
    assert float((pasted - truth)[..., inner].abs().max()) > 0.25  # the unobserved slices keep the bias
    assert float((spread - truth)[..., inner].abs().max()) < 1e-3
    with pytest.raises(ValueError, match="spread"):
        op.data_consistency(biased, y, "nearest")


@pytest.mark.parametrize("kind", KINDS)
def test_constants_keep_their_intensity(kind):
    """LR and HR intensities agree: a constant image degrades to the same constant."""
    op = _bind(kind, 2, 4, (8, 8, 24))
    y = op.forward(torch.full((8, 8, 24), 7.5, dtype=torch.float64))
    torch.testing.assert_close(y, torch.full(op.lr_shape, 7.5, dtype=torch.float64))


def test_kspace_keeps_mean_and_is_real_and_band_limited():
    x = torch.as_tensor(smooth_volume((6, 6, 32), seed=3, scale=1.0), dtype=torch.float64) * 100
    op = _bind("kspace", 2, 4, tuple(x.shape))
    y = op.forward(x)
    assert y.dtype == torch.float64  # real-valued result
    assert abs(float(y.mean()) - float(x.mean())) < 1e-9 * float(x.mean().abs())
    # Zero-filled upsampling of y is band-limited: its spectrum beyond the LR band is zero.
    up = op.upsample(y, "sinc")
    spec = torch.fft.fft(up, dim=-1).abs()
    m = op.lr_shape[2]
    freqs = torch.fft.fftfreq(32) * 32
    assert float(spec[..., freqs.abs() > m / 2].max()) < 1e-8 * float(spec.max())


def test_kspace_matches_centred_fft_crop():
    """For odd factor the LR samples fall on HR voxels j*f + (f-1)/2: equal to FFT-crop after a shift."""
    n, f = 30, 3
    x = torch.randn(1, 1, n, dtype=torch.float64)
    op = _bind("kspace", 2, f, (1, 1, n))
    shifted = torch.roll(x, -(f - 1) // 2, dims=-1)  # sample 0 at HR index (f-1)/2 = 1
    X = torch.fft.fftshift(torch.fft.fft(shifted, dim=-1), dim=-1)
    m = n // f
    c = n // 2
    crop = X[..., c - m // 2: c - m // 2 + m]
    ref = torch.fft.ifft(torch.fft.ifftshift(crop, dim=-1), dim=-1).real * m / n
    torch.testing.assert_close(op.forward(x), ref, atol=1e-10, rtol=1e-10)


def test_slice_removal_keeps_every_kth_slice_for_odd_factor():
    x = torch.randn(4, 5, 15, dtype=torch.float64)
    op = _bind("slice-removal", 2, 3, (4, 5, 15))
    torch.testing.assert_close(op.forward(x), x[..., 1::3])  # LR sample j at HR index 3j + 1


def test_slice_removal_even_factor_samples_between_slices():
    x = torch.randn(2, 2, 16, dtype=torch.float64)
    op = _bind("slice-removal", 2, 4, (2, 2, 16))
    torch.testing.assert_close(op.forward(x), 0.5 * (x[..., 1::4] + x[..., 2::4]))


def test_thick_slice_profiles():
    n, f = 40, 4
    box = _bind("thick-slice", 2, f, (1, 1, n), "box").matrices()[2]
    np.testing.assert_allclose(box[3, 12:16], 0.25)  # interior block: exactly the 4 covered slices
    assert box[3].sum() == pytest.approx(1.0)
    gauss = _bind("thick-slice", 2, f, (1, 1, n)).matrices()[2]
    row = gauss[5]
    centre = 5 * f + (f - 1) / 2
    idx = np.arange(n)
    assert (row * idx).sum() == pytest.approx(centre, abs=1e-9)
    # FWHM = f HR voxels: variance of the (voxel-integrated) profile ~ sigma^2 + 1/12
    sigma = f / 2.3548200450309493
    assert (row * (idx - centre) ** 2).sum() == pytest.approx(sigma ** 2 + 1 / 12, rel=0.02)


def test_non_dividing_size_warns_and_covers_partial_block():
    with pytest.warns(PartialBlockWarning, match="partial"):
        op = OperatorSpec.make("thick-slice", 2, 4, "box").bind_hr((3, 3, 18))
    assert op.lr_shape == (3, 3, 5)
    last = op.matrices()[2][-1]
    np.testing.assert_allclose(last[16:], 0.5)  # last block covers HR slices 16-17 only


def test_gradients_flow(device):
    op = _bind("thick-slice", 2, 4, (4, 4, 16))
    x = torch.randn(4, 4, 16, device=device, requires_grad=True)
    op.forward(x).square().sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0


def test_batch_dimensions():
    op = _bind("downsample", (0, 1), 2, (8, 8, 8))
    x = torch.randn(2, 3, 8, 8, 8)
    y = op.forward(x)
    assert y.shape == (2, 3, 4, 4, 8)
    torch.testing.assert_close(y[1, 2], op.forward(x[1, 2]))


@pytest.mark.parametrize("args, words", [
    (("thick-slice", 2, 1.0), "greater than 1"),
    (("thick-slice", 2, 0.5), "greater than 1"),
    (("thick-slice", 3, 2), "out of range"),
    (("thick-slice", -1, 2), "out of range"),
    (("slice-removal", 2, 2.5), "integer"),
    (("thick-slice", (0, 1), 2), "one axis"),
    (("blur", 2, 2), "Unknown operator"),
    (("thick-slice", 2, float("nan")), "not a finite number"),
    (("thick-slice", 2, float("inf")), "not a finite number"),
    (("thick-slice", 2, 1e308), "too large"),
])
def test_bad_arguments(args, words):
    with pytest.raises(InputError, match=words):
        OperatorSpec.make(*args)


def test_hr_grid_too_large_for_an_index_is_a_bad_request():
    spec = OperatorSpec.make("thick-slice", 2, 1e8)
    with pytest.raises(InputError, match="at most"):
        spec.bind_lr((4, 4, 30))
