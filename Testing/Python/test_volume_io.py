"""Volume I/O: exact voxels, geometry to 1e-6, float32 outputs, clear errors, atomic writes."""

import os

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import rotation

from MRISuperResLib.errors import InputError
from MRISuperResLib.volume import GENERATED_DESCRIPTION, Volume, read_volume, write_volume


def oblique_volume():
    rng = np.random.default_rng(1)
    arr = (rng.random((7, 9, 5)) * 1000 - 200).astype(np.float32)
    # Origins and spacings exactly representable in float32: NIfTI stores them as float32.
    return Volume.from_array(arr, spacing=(0.75, 1.25, 4.5), origin=(-90.5, 12.25, 33.0),
                             direction=rotation(0.3, -0.2, 0.5))


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_round_trip_keeps_voxels_and_geometry(tmp_path, suffix):
    vol = oblique_volume()
    path = str(tmp_path / ("v" + suffix))
    write_volume(vol, path)
    back = read_volume(path)
    assert back.array.dtype == np.float32
    np.testing.assert_array_equal(back.array, vol.array)
    assert back.grid.shape == vol.grid.shape
    np.testing.assert_allclose(back.grid.spacing, vol.grid.spacing, atol=1e-6)
    np.testing.assert_allclose(back.grid.origin, vol.grid.origin, atol=1e-6)
    np.testing.assert_allclose(back.grid.direction, vol.grid.direction, atol=1e-6)


def test_axes_are_itk_order(tmp_path):
    """array[i, j, k] is the voxel SimpleITK calls (i, j, k)."""
    arr = np.arange(3 * 4 * 5, dtype=np.float32).reshape(3, 4, 5)
    write_volume(Volume.from_array(arr, spacing=(1, 2, 3)), str(tmp_path / "a.nrrd"))
    img = sitk.ReadImage(str(tmp_path / "a.nrrd"))
    assert img.GetSize() == (3, 4, 5)
    assert img.GetPixel(2, 1, 4) == arr[2, 1, 4]
    assert img.GetSpacing() == (1.0, 2.0, 3.0)


def test_integer_input_becomes_float32_in_same_units(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.int16).reshape(4, 3, 2) * 100 - 300
    img = sitk.GetImageFromArray(arr)
    sitk.WriteImage(img, str(tmp_path / "i.nii.gz"))
    vol = read_volume(str(tmp_path / "i.nii.gz"))
    assert vol.array.dtype == np.float32
    np.testing.assert_array_equal(vol.array, arr.transpose(2, 1, 0).astype(np.float32))


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_description_is_stored(tmp_path, suffix):
    path = str(tmp_path / ("d" + suffix))
    write_volume(oblique_volume(), path, description=GENERATED_DESCRIPTION)
    assert read_volume(path).description == GENERATED_DESCRIPTION


def _write_raw(tmp_path, arr, name="x.nrrd", **kw):
    img = sitk.GetImageFromArray(arr, **kw)
    path = str(tmp_path / name)
    sitk.WriteImage(img, path)
    return path


def _write_bytes(path, data):
    path.write_bytes(data)
    return str(path)


def _write_4d(tmp_path):
    frames = [sitk.GetImageFromArray(np.random.rand(3, 4, 5).astype(np.float32)) for _ in range(2)]
    path = str(tmp_path / "series.nii.gz")
    sitk.WriteImage(sitk.JoinSeries(frames), path)
    return path


@pytest.mark.parametrize("make, words", [
    (lambda t: str(t / "missing.nii.gz"), "not found"),
    (lambda t: _write_bytes(t / "junk.nii.gz", b"not an image"), "Cannot read"),
    (lambda t: _write_raw(t, np.ones((4, 5), np.float32) * np.arange(5)), "2D"),
    (lambda t: _write_4d(t), "4D"),
    (lambda t: _write_raw(t, np.random.rand(3, 4, 5, 3).astype(np.float32), isVector=True), "components"),
    (lambda t: _write_raw(t, np.where(np.eye(4)[None].repeat(3, 0) > 0, np.nan, 1.0).astype(np.float32)), "NaN"),
    (lambda t: _write_raw(t, np.zeros((3, 4, 5), np.float32)), "empty"),
    (lambda t: _write_raw(t, np.random.rand(1, 4, 5).astype(np.float32)), "2D"),
    (lambda t: str(t), "folder"),
])
def test_bad_inputs_have_clear_errors(tmp_path, make, words):
    with pytest.raises(InputError) as exc:
        read_volume(make(tmp_path))
    assert words.lower() in str(exc.value).lower()
    assert exc.value.fix


def test_write_is_atomic_and_refuses_bad_paths(tmp_path):
    vol = oblique_volume()
    with pytest.raises(InputError, match="extension"):
        write_volume(vol, str(tmp_path / "out.png"))
    with pytest.raises(InputError, match="does not exist"):
        write_volume(vol, str(tmp_path / "nope" / "out.nii.gz"))
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    try:
        if os.access(ro, os.W_OK):  # root ignores permissions
            pytest.skip("running as a user who can write anywhere")
        with pytest.raises(InputError, match="not writable"):
            write_volume(vol, str(ro / "out.nii.gz"))
    finally:
        os.chmod(ro, 0o700)


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(sitk, "WriteImage", boom)
    with pytest.raises(InputError, match="Could not write"):
        write_volume(oblique_volume(), str(tmp_path / "out.nii.gz"))
    assert os.listdir(tmp_path) == []
