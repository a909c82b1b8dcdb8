"""Volumes and their geometry, read and written through SimpleITK; and the one atomic writer every other file
(cards, weights, checkpoints, tables, figures) goes through, with the volumes' own temporary files.

Axis convention: arrays are indexed ``[i, j, k]`` in ITK/SimpleITK index order (the
transpose of ``sitk.GetArrayFromImage``). ``direction`` is a 3x3 matrix whose column ``a``
is the physical direction of index axis ``a``; ``origin`` is the centre of voxel (0, 0, 0).
"""

import hashlib
import os
import re
import secrets
import socket
import stat
import time
from dataclasses import dataclass, field, replace
from typing import List, Tuple

import numpy as np
import SimpleITK as sitk

from . import integrity, memory
from .errors import InputError, OutputError

GENERATED_DESCRIPTION = "AI-generated, research use only"
# Single-file formats only: a detached header (.nhdr, .mhd) cannot be renamed atomically.
SUPPORTED_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
SPACING_RANGE_MM = (1e-3, 1e3)  # wider than any MRI voxel (preclinical ~0.01 mm, thick slabs ~10 mm)


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
        return not self.differences(other, atol)

    def differences(self, other: "Grid", atol: float = 1e-6) -> List[str]:
        """What differs from `other`, one phrase per property: ["origin (0, 0, 0) vs (0, 0, 2)", ...]."""

        def fmt(values):
            return "(%s)" % ", ".join("%.6g" % v for v in values)

        out = []
        if self.shape != other.shape:
            out.append("size %s vs %s" % ("x".join(map(str, self.shape)), "x".join(map(str, other.shape))))
        for name in ("spacing", "origin", "direction"):
            a, b = getattr(self, name), getattr(other, name)
            if not np.allclose(a, b, rtol=0, atol=atol):
                out.append("%s %s vs %s" % (name, fmt(a), fmt(b)))
        return out


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
    spacing = img.GetSpacing()
    lo, hi = SPACING_RANGE_MM
    odd = [a for a in range(3) if not lo <= spacing[a] <= hi]
    if odd:
        raise InputError("%s has an implausible voxel spacing of %s mm (axis %s); MRI voxels are %g to %g mm."
                         % (source, " x ".join("%g" % v for v in spacing), ", ".join(map(str, odd)), lo, hi),
                         "Its header is probably damaged or in the wrong units: set the spacing in mm (e.g. in "
                         "Slicer's Volumes module) and save it again.")
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
    """Read one 3D volume, checking the file against its header before anything is allocated."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError("Input file not found: %s." % path, "Check the path.")
    if os.path.isdir(path):
        raise InputError("Input %s is a folder, not an image file." % path, "Give a .nii, .nii.gz, .nrrd or .mha file.")
    if not os.access(path, os.R_OK):
        raise InputError("Input file is not readable: %s." % path, "Check its permissions.")
    name = os.path.basename(path)
    try:
        head = integrity.declared(path)
    except RuntimeError as exc:
        raise _unreadable(path, exc) from None
    # ITK's buffer, its numpy copy, then float32 twice (the cast and the i, j, k-contiguous copy)
    memory.check_host(2 * head.data_bytes + 8 * head.voxels, "Reading %s (%s)" % (name, head.describe()),
                      "Check the file (is its header damaged?), or use a machine with more memory.")
    integrity.check_complete(path, name)
    try:
        img = sitk.ReadImage(path)
    except RuntimeError as exc:
        raise _unreadable(path, exc) from None
    return from_sitk(img, source=name)


def _unreadable(path, exc) -> InputError:
    first = str(exc).strip().splitlines()
    detail = next((ln.strip() for ln in first if "ERROR" in ln or "Could not" in ln or "Unable" in ln), "")
    return InputError("Cannot read %s as an image%s." % (path, (" (" + detail[:160] + ")") if detail else ""),
                      "Give a NIfTI (.nii/.nii.gz), NRRD or MHA volume.")


def check_volume_file(path) -> None:
    """InputError when an existing volume file is unreadable, cut short or empty (a batch redoes such outputs)."""
    path = os.fspath(path)
    if os.path.getsize(path) == 0:
        raise InputError("%s is empty (0 bytes)." % os.path.basename(path), "Write it again.")
    try:
        integrity.declared(path)
    except RuntimeError as exc:
        raise _unreadable(path, exc) from None
    integrity.check_complete(path)


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


# ---- writing: verified temporary files, renamed into place together ----
#
# A temporary file is named .mrisr-partial-<pid>-<host>-<random><suffix>, beside its target (a rename within a
# folder is atomic). A process killed with SIGKILL cannot remove its own; the next write into that folder removes
# those whose process is gone (same host), and any older than STALE_AFTER_S (other hosts sharing the folder).

PARTIAL_PREFIX = ".mrisr-partial-"
STALE_AFTER_S = 3600.0
HOST_TAG = hashlib.sha1(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]
_PARTIAL_NAME = re.compile(r"^%s(?:(\d+)-([0-9a-f]{8})-)?" % re.escape(PARTIAL_PREFIX))
_ACTIVE = set()  # this process's temporary files, never stale


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # ours but not in _ACTIVE: left by an earlier process that had our PID
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists, owned by someone else (or cannot tell: keep it)
    return True


def clean_stale_partials(folder: str, now: float = None) -> List[str]:
    """Remove temporary files that killed runs left in `folder`; the paths removed."""
    now = time.time() if now is None else now
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        m = _PARTIAL_NAME.match(name)
        path = os.path.join(folder, name)
        if not m or path in _ACTIVE:
            continue
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        old = now - st.st_mtime > STALE_AFTER_S
        dead = m.group(1) is not None and m.group(2) == HOST_TAG and not _pid_alive(int(m.group(1)))
        if old or dead:
            try:
                os.remove(path)
                removed.append(path)
            except OSError:
                pass
    return removed


def _new_partial(folder: str, suffix: str) -> str:
    # Registered before it exists, so that a signal arriving at any point leaves no file remove_own_partials misses.
    while True:
        tmp = os.path.join(folder, "%s%d-%s-%s%s" % (PARTIAL_PREFIX, os.getpid(), HOST_TAG, secrets.token_hex(5),
                                                      suffix))
        _ACTIVE.add(tmp)
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            return tmp
        except FileExistsError:
            _ACTIVE.discard(tmp)
        except BaseException:
            _ACTIVE.discard(tmp)
            raise


def remove_own_partials() -> None:
    """Remove every temporary file this process still holds (the command line calls it on its way out)."""
    for tmp in list(_ACTIVE):
        _discard(tmp)


def _discard(tmp: str):
    try:
        os.remove(tmp)
    except FileNotFoundError:
        pass
    _ACTIVE.discard(tmp)


def _to_writable(vol: Volume, description, pixel_type: str) -> sitk.Image:
    img = to_sitk(vol)
    if pixel_type == "uint8":
        img = sitk.Cast(sitk.Clamp(sitk.Round(img), sitk.sitkFloat32, 0, 255), sitk.sitkUInt8)
    elif pixel_type != "float32":
        raise ValueError("pixel_type must be float32 or uint8")
    desc = vol.description if description is None else description
    if desc:
        # ITK maps ITK_FileNotes to NIfTI's 'descrip' (80 chars) and keeps it as a field in NRRD and MHA.
        img.SetMetaData("ITK_FileNotes", desc[:79])
    return img


def _verify_written(tmp: str, path: str, shape) -> None:
    """Raise OutputError unless `tmp` holds a whole volume of `shape`: niftilib reports a short write only on stderr."""
    try:
        size = integrity.declared(tmp).size
        integrity.check_complete(tmp, os.path.basename(path))
    except (RuntimeError, InputError) as exc:
        detail = (exc.problem if isinstance(exc, InputError) else str(exc).strip().splitlines()[-1][:160]).rstrip(".")
        raise OutputError("Could not write %s (disk full?): what reached the disk is incomplete (%s)." % (path, detail),
                          "Free disk space or choose another folder; nothing was replaced.") from None
    if tuple(size[:3]) != tuple(shape):
        raise OutputError("Could not write %s: the file written holds %s voxels instead of %s." % (
            path, "x".join(map(str, size)), "x".join(map(str, shape))), "Report this with the log.")


class OutputSet:
    """Every output of one run, all or nothing: each is written to a temporary file beside its target and read back
    (`add`); only once all are written does `commit` rename them into place. A file that existed before is replaced
    only by a commit, and a commit that fails half way puts back the files it had replaced.

        with OutputSet() as outs:
            outs.add(volume, "sr.nii.gz")
            outs.add(residual, "res.nii.gz")
            outs.commit()
    """

    def __init__(self):
        self.staged = []  # (temporary path, target path)

    def add(self, vol: Volume, path, description=None, pixel_type: str = "float32") -> str:
        path = check_output_path(path)
        folder = os.path.dirname(os.path.abspath(path))
        suffix = _suffix(path)
        clean_stale_partials(folder)
        img = _to_writable(vol, description, pixel_type)
        try:
            tmp = _new_partial(folder, suffix)
        except OSError as exc:
            raise OutputError("Could not write %s (%s)." % (path, exc.strerror or exc),
                              "Free disk space or check the folder's permissions; nothing was replaced.") from None
        try:
            sitk.WriteImage(img, tmp, useCompression=suffix in (".nii.gz", ".nrrd", ".mha"))
            _verify_written(tmp, path, vol.grid.shape)
            os.chmod(tmp, 0o666 & ~_umask())  # created 0600 while partial; outputs get the usual permissions
        except RuntimeError as exc:
            _discard(tmp)
            raise OutputError("Could not write %s (%s; disk full?)." % (path, str(exc).strip().splitlines()[-1][:160]),
                              "Free disk space or check the folder's permissions; nothing was replaced.") from None
        except BaseException:
            _discard(tmp)
            raise
        self.staged.append((tmp, path))
        return path

    def commit(self) -> List[str]:
        """Rename every staged file into place; the target paths."""
        done = []  # (target, hard link to what it replaced or None, whether it existed)
        try:
            for tmp, path in self.staged:
                existed, backup = os.path.exists(path), None
                if existed:  # a second name for the old file: the target is never missing, even if killed here
                    backup = _new_partial(os.path.dirname(os.path.abspath(path)), _suffix(path))
                    try:
                        os.remove(backup)
                        os.link(path, backup)
                    except OSError:  # no hard links on this file system: a failed rename cannot be undone
                        _ACTIVE.discard(backup)
                        backup = None
                done.append((path, backup, existed))
                os.replace(tmp, path)
                _ACTIVE.discard(tmp)
        except BaseException as exc:
            for path, backup, existed in reversed(done):
                try:
                    if backup is not None:
                        os.replace(backup, path)
                        _ACTIVE.discard(backup)
                    elif not existed and os.path.exists(path):
                        os.remove(path)
                except OSError:
                    pass
            self.discard()
            if isinstance(exc, OSError):
                raise OutputError("Could not move the outputs into place (%s)." % (exc.strerror or exc),
                                  "Check the folders' permissions; nothing was replaced.") from None
            raise
        for _, backup, _ in done:
            if backup is not None:
                _discard(backup)
        self.staged = []
        return [path for path, _, _ in done]

    def discard(self):
        for tmp, _ in self.staged:
            _discard(tmp)
        self.staged = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.discard()  # nothing left after a commit; on an error, what was staged goes
        return False


def atomic_write(path, write, suffix: str = "") -> str:
    """Any other file, all or nothing: `write(tmp)` fills a temporary file beside `path`, which then replaces it.

    The same temporary files as the volumes', so a killed run's leftovers are removed the same way; `suffix` keeps
    the ending for writers that choose their format by it (e.g. ".png"). Permissions as for a plain new file.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    clean_stale_partials(folder)
    tmp = _new_partial(folder, suffix)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
        _ACTIVE.discard(tmp)
    except BaseException:
        _discard(tmp)
        raise
    return path


def atomic_write_text(path, text: str) -> str:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    return atomic_write(path, write)


def write_volume(vol: Volume, path, description=None, pixel_type: str = "float32") -> str:
    """Write float32 (or, for small auxiliary images, uint8) voxels atomically: a verified temp file, then rename."""
    with OutputSet() as outs:
        outs.add(vol, path, description, pixel_type)
        return outs.commit()[0]
