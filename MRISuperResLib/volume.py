"""Volumes and their geometry, read and written through SimpleITK.

Axis convention: arrays are indexed ``[i, j, k]`` in ITK/SimpleITK index order (the
transpose of ``sitk.GetArrayFromImage``). ``direction`` is a 3x3 matrix whose column ``a``
is the physical direction of index axis ``a``; ``origin`` is the centre of voxel (0, 0, 0).
"""

import os
import tempfile
from dataclasses import dataclass, field, replace
from typing import Tuple

import numpy as np
import SimpleITK as sitk

from .errors import InputError

GENERATED_DESCRIPTION = "AI-generated, research use only"
# Single-file formats only: a detached header (.nhdr, .mhd) cannot be renamed atomically.
SUPPORTED_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")


@dataclass(frozen=True)
class Grid:
    """A regular 3D sampling grid in physical (LPS) space."""

    shape: Tuple[int, int, int]
    spacing: Tuple[float, float, float]
    origin: Tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: Tuple[float, ...] = (1, 0, 0, 0, 1, 0, 0, 0, 1)  # row-major 3x3

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(n) for n in self.shape))
        object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
        object.__setattr__(self, "origin", tuple(float(o) for o in self.origin))
        object.__setattr__(self, "direction", tuple(float(d) for d in np.asarray(self.direction).ravel()))

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    def index_to_physical(self, ijk) -> np.ndarray:
        """Physical point(s) of continuous index(es) ``ijk`` (shape (..., 3))."""
        ijk = np.asarray(ijk, dtype=np.float64)
        return np.asarray(self.origin) + (ijk * np.asarray(self.spacing)) @ self.direction_matrix.T

    def physical_to_index(self, xyz) -> np.ndarray:
        xyz = np.asarray(xyz, dtype=np.float64) - np.asarray(self.origin)
        return (xyz @ np.linalg.inv(self.direction_matrix).T) / np.asarray(self.spacing)

    def bounds(self) -> np.ndarray:
        """Outer corners (voxel edges, not centres) as index-space min/max mapped to physical space, (2, 3)."""
        lo = self.index_to_physical([-0.5, -0.5, -0.5])
        hi = self.index_to_physical(np.asarray(self.shape) - 0.5)
        return np.stack([lo, hi])

    def ijk_to_ras(self) -> np.ndarray:
        """4x4 IJK-to-RAS matrix, as Slicer's volume nodes use it (LPS -> RAS flips x and y)."""
        m = np.eye(4)
        m[:3, :3] = self.direction_matrix * np.asarray(self.spacing)
        m[:3, 3] = self.origin
        return np.diag([-1.0, -1.0, 1.0, 1.0]) @ m

    def allclose(self, other: "Grid", atol: float = 1e-6) -> bool:
        return (
            self.shape == other.shape
            and np.allclose(self.spacing, other.spacing, rtol=0, atol=atol)
            and np.allclose(self.origin, other.origin, rtol=0, atol=atol)
            and np.allclose(self.direction, other.direction, rtol=0, atol=atol)
        )


@dataclass
class Volume:
    """A scalar 3D image: float32 voxels indexed [i, j, k] on a `Grid`."""

    array: np.ndarray
    grid: Grid
    description: str = ""
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        if tuple(self.array.shape) != tuple(self.grid.shape):
            raise ValueError("array shape %s does not match grid shape %s" % (self.array.shape, self.grid.shape))

    @classmethod
    def from_array(cls, array, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=None, **kw):
        array = np.asarray(array, dtype=np.float32)
        grid = Grid(array.shape, spacing, origin, np.eye(3) if direction is None else direction)
        return cls(array, grid, **kw)

    def with_array(self, array, description=None) -> "Volume":
        """Same geometry, new voxels."""
        return replace(self, array=np.asarray(array, dtype=np.float32),
                       description=self.description if description is None else description)


def _suffix(path: str) -> str:
    low = str(path).lower()
    for s in SUPPORTED_SUFFIXES:
        if low.endswith(s):
            return s
    return ""


def to_sitk(vol: Volume) -> sitk.Image:
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(vol.array, dtype=np.float32).transpose(2, 1, 0)))
    img.SetSpacing(vol.grid.spacing)
    img.SetOrigin(vol.grid.origin)
    img.SetDirection(vol.grid.direction)
    return img


def from_sitk(img: sitk.Image, source: str = "image") -> Volume:
    """Convert and validate; every problem becomes an `InputError` naming the fix."""
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise InputError("%s has %d components per voxel (vector or RGB image)." % (source, img.GetNumberOfComponentsPerPixel()),
                         "Give a scalar (single-channel) MRI volume.")
    pixel = img.GetPixelIDTypeAsString()
    if "complex" in pixel.lower() or "label" in pixel.lower():
        raise InputError("%s has non-numeric voxels (%s)." % (source, pixel), "Give a real-valued scalar MRI volume.")
    dim = img.GetDimension()
    if dim == 4 and img.GetSize()[3] == 1:
        img = img[:, :, :, 0]
        dim = 3
    if dim != 3:
        raise InputError("%s is %dD (size %s); a 3D volume is needed." % (source, dim, "x".join(map(str, img.GetSize()))),
                         "Give a single 3D volume (split 4D series first; 2D slices cannot be super-resolved here).")
    size = img.GetSize()
    if min(size) < 2:
        raise InputError("%s is effectively 2D (size %s)." % (source, "x".join(map(str, size))),
                         "Give a 3D volume with at least 2 voxels along every axis.")
    array = sitk.GetArrayFromImage(img).transpose(2, 1, 0)
    if array.size == 0:
        raise InputError("%s is empty (no voxels)." % source, "Check that the file was exported completely.")
    array = array.astype(np.float32)
    if not np.all(np.isfinite(array)):
        n = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise InputError("%s has %d NaN or infinite voxels." % (source, n),
                         "Replace them (for example with 0) before super-resolution.")
    if float(array.max()) == float(array.min()):
        raise InputError("%s is empty: every voxel equals %g." % (source, float(array.max())),
                         "Check that the right file was chosen.")
    d = np.asarray(img.GetDirection(), dtype=np.float64).reshape(3, 3)
    grid = Grid(size, img.GetSpacing(), img.GetOrigin(), d)
    desc = next((img.GetMetaData(k) for k in ("ITK_FileNotes", "descrip") if img.HasMetaDataKey(k)), "")
    return Volume(np.ascontiguousarray(array), grid, description=desc)


def read_volume(path) -> Volume:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError("Input file not found: %s." % path, "Check the path.")
    if os.path.isdir(path):
        raise InputError("Input %s is a folder, not an image file." % path, "Give a .nii, .nii.gz, .nrrd or .mha file.")
    if not os.access(path, os.R_OK):
        raise InputError("Input file is not readable: %s." % path, "Check its permissions.")
    try:
        img = sitk.ReadImage(path)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = next((ln.strip() for ln in first if "ERROR" in ln or "Could not" in ln or "Unable" in ln), "")
        raise InputError("Cannot read %s as an image%s." % (path, (" (" + detail[:160] + ")") if detail else ""),
                         "Give a NIfTI (.nii/.nii.gz), NRRD or MHA volume.") from None
    return from_sitk(img, source=os.path.basename(path))


def list_volumes(folder) -> list:
    """The volumes of a folder (supported suffixes, no hidden files), sorted by name: what a batch or cohort runs."""
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(SUPPORTED_SUFFIXES) and not n.startswith("."))
    return [os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))]


def check_output_path(path, input_paths=()) -> str:
    """Validate an output path before any work is done."""
    path = os.fspath(path)
    if not _suffix(path):
        raise InputError("Output %s has an unsupported extension." % path,
                         "Use one of: %s." % ", ".join(SUPPORTED_SUFFIXES))
    for inp in input_paths:
        if inp and os.path.exists(inp) and os.path.abspath(inp) == os.path.abspath(path):
            raise InputError("Output path %s is the input path." % path,
                             "Choose a different output file; inputs are never overwritten.")
        if inp and os.path.exists(inp) and os.path.exists(path) and os.path.samefile(inp, path):
            raise InputError("Output path %s is the input file (same file)." % path,
                             "Choose a different output file; inputs are never overwritten.")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise InputError("Output folder does not exist: %s." % folder, "Create it first or choose another path.")
    if not os.access(folder, os.W_OK):
        raise InputError("Output folder is not writable: %s." % folder, "Choose a folder you can write to.")
    if os.path.isdir(path):
        raise InputError("Output %s is a folder." % path, "Give a file name such as out.nii.gz.")
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_volume(vol: Volume, path, description=None, pixel_type: str = "float32") -> str:
    """Write float32 (or, for small auxiliary images, uint8) voxels atomically: a temp file, then rename."""
    path = check_output_path(path)
    img = to_sitk(vol)
    if pixel_type == "uint8":
        img = sitk.Cast(sitk.Clamp(sitk.Round(img), sitk.sitkFloat32, 0, 255), sitk.sitkUInt8)
    elif pixel_type != "float32":
        raise ValueError("pixel_type must be float32 or uint8")
    desc = vol.description if description is None else description
    if desc:
        # ITK maps ITK_FileNotes to NIfTI's 'descrip' (80 chars) and keeps it as a field in NRRD and MHA.
        img.SetMetaData("ITK_FileNotes", desc[:79])
    folder = os.path.dirname(os.path.abspath(path))
    suffix = _suffix(path)
    fd, tmp = tempfile.mkstemp(prefix=".mrisr-partial-", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        sitk.WriteImage(img, tmp, useCompression=suffix in (".nii.gz", ".nrrd", ".mha"))
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
        os.replace(tmp, path)
    except RuntimeError as exc:
        raise InputError("Could not write %s (%s)." % (path, str(exc).strip().splitlines()[-1][:160]),
                         "Check free disk space and permissions.") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
