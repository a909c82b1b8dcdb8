"""Volume I/O: exact voxels, geometry to 1e-6, float32 outputs, clear errors, atomic writes."""

import os
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import rotation

from MRISuperResLib.errors import InputError, ResourceError
from MRISuperResLib.volume import GENERATED_DESCRIPTION, HOST_TAG, OutputSet, Volume, check_volume_file, read_volume, write_volume


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


def _write_spaced(tmp_path, spacing):
    img = sitk.GetImageFromArray(np.random.rand(5, 4, 3).astype(np.float32))
    img.SetSpacing(spacing)
    path = str(tmp_path / "spaced.nii.gz")
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
    (lambda t: _write_spaced(t, (1e-30, 1.0, 1.0)), "implausible voxel spacing of 1e-30"),
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


# ---- files checked against their headers, outputs all or nothing ----

def _noise_volume(shape=(16, 18, 20), seed=3):
    return Volume.from_array(np.random.default_rng(seed).random(shape).astype(np.float32) * 1000)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("keep", [0.3, 0.7, 0.999])
def test_truncated_nifti_is_refused(tmp_path, suffix, keep):
    path = tmp_path / ("v" + suffix)
    write_volume(_noise_volume(), str(path))
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(InputError, match="truncated") as exc:
        read_volume(str(path))
    assert exc.value.fix and "v" + suffix in str(exc.value)
    with pytest.raises(InputError, match="truncated"):
        check_volume_file(str(path))


def test_damaged_gzip_and_empty_files_are_refused(tmp_path):
    path = tmp_path / "v.nii.gz"
    write_volume(_noise_volume(), str(path))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: the deflate data or gzip's CRC-32 give it away
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match="damaged|truncated"):
        read_volume(str(path))
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        check_volume_file(str(tmp_path / "empty.nii.gz"))


def test_uncompressed_file_named_nii_gz_still_reads(tmp_path):
    """niftilib reads a plain .nii named .nii.gz; the gzip check must not refuse it."""
    write_volume(_noise_volume(), str(tmp_path / "v.nii"))
    os.rename(tmp_path / "v.nii", tmp_path / "plain.nii.gz")
    np.testing.assert_array_equal(read_volume(str(tmp_path / "plain.nii.gz")).array, _noise_volume().array)


def test_huge_header_is_refused_before_allocating(tmp_path):
    """A header declaring 30000^3 voxels (108 TB) in a small file: ResourceError with the numbers, no allocation."""
    write_volume(_noise_volume(), str(tmp_path / "v.nii"))
    data = bytearray((tmp_path / "v.nii").read_bytes())
    struct.pack_into("<8h", data, 40, 3, 30000, 30000, 30000, 1, 1, 1, 1)
    (tmp_path / "huge.nii").write_bytes(bytes(data))
    with pytest.raises(ResourceError, match="30000 x 30000 x 30000") as exc:
        read_volume(str(tmp_path / "huge.nii"))
    assert exc.value.exit_code == 3 and "GB" in str(exc.value)


def test_output_set_is_all_or_nothing(tmp_path):
    """The second output fails: the first target keeps its old bytes and no temporary file is left."""
    first, second = tmp_path / "a.nii.gz", tmp_path / "b.nrrd"
    write_volume(_noise_volume(seed=1), str(first))
    before = first.read_bytes()
    with pytest.raises(InputError, match="does not exist"):
        with OutputSet() as outs:
            outs.add(_noise_volume(seed=2), str(first))
            outs.add(_noise_volume(seed=2), str(tmp_path / "missing" / "b.nrrd"))
            outs.commit()
    assert first.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["a.nii.gz"]
    with OutputSet() as outs:
        outs.add(_noise_volume(seed=2), str(first))
        outs.add(_noise_volume(seed=3), str(second))
        assert first.read_bytes() == before and not second.exists()  # staged, not yet in place
        assert outs.commit() == [str(first), str(second)]
    np.testing.assert_array_equal(read_volume(str(first)).array, _noise_volume(seed=2).array)
    assert sorted(os.listdir(tmp_path)) == ["a.nii.gz", "b.nrrd"]


def test_stale_partial_files_are_cleaned(tmp_path):
    """Left by killed runs: removed when their process is gone (same host) or when over an hour old."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = HOST_TAG
    names = {
        ".mrisr-partial-%d-%s-dead.nii.gz" % (dead.pid, host): False,  # its process is gone
        ".mrisr-partial-1-%s-alive.nii.gz" % host: True,  # PID 1 lives: a write in progress
        ".mrisr-partial-1-%s-ancient.nii.gz" % host: False,  # alive but a day old: a reused PID
        ".mrisr-partial-%d-00000000-otherhost.nii" % dead.pid: True,  # another host's PID says nothing here
        ".mrisr-partial-legacy.nii.gz": True,  # no PID in the name, fresh
        ".mrisr-partial-legacy-old.nii.gz": False,  # no PID, two hours old
        "keep.nii.gz": True,
    }
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    old = time.time() - 2 * 3600
    for name in (".mrisr-partial-1-%s-ancient.nii.gz" % host, ".mrisr-partial-legacy-old.nii.gz"):
        os.utime(tmp_path / name, (old, old))
    write_volume(_noise_volume(), str(tmp_path / "out.nii.gz"))  # any write into the folder cleans it
    left = set(os.listdir(tmp_path))
    assert left == {n for n, keep in names.items() if keep} | {"out.nii.gz"}
