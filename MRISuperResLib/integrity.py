"""Does an image file hold what its header declares? Checked before reading, and after writing.

Why: the NIfTI library (niftilib, inside ITK) reads a short file as zeros and writes a short file with a warning
on stderr, raising nothing in either case, so a truncated download reads as a plausible volume and a full disk
leaves a corrupt output. ITK's NRRD and MetaImage (.mha) readers and writers already fail on short data.

1. `declared(path)`: the header alone (ITK's ReadImageInformation): size, pixel type, bytes the voxels take.
2. `check_complete(path, source)`: NIfTI only. NIfTI-1 (348-byte header) and NIfTI-2 (540) give dims, bitpix and
   vox_offset, so the data ends at vox_offset + prod(dims) * bitpix / 8. A .nii must be that long; a .nii.gz must
   decompress to that many bytes through to a valid end of stream (length and CRC-32 checked by gzip).
"""

import os
import struct
import zlib
from dataclasses import dataclass
from typing import Optional, Tuple

import SimpleITK as sitk

from .errors import InputError

_REDO = "Copy, download or export it again (an interrupted transfer or a full disk cuts files short)."
_NIFTI = {348: (40, "8h", 72, 108, "f", 352), 540: (16, "8q", 14, 168, "q", 544)}  # dim, bitpix, vox_offset, min


@dataclass(frozen=True)
class Declared:
    """What a header says the file holds."""

    size: Tuple[int, ...]
    pixel: str  # e.g. "32-bit float"
    bytes_per_voxel: int

    @property
    def voxels(self) -> int:
        n = 1
        for s in self.size:
            n *= int(s)
        return n

    @property
    def data_bytes(self) -> int:
        return self.voxels * self.bytes_per_voxel

    def describe(self) -> str:
        return "%s voxels of %s" % (" x ".join(str(s) for s in self.size), self.pixel)


def declared(path: str) -> Declared:
    """The header's size and pixel type; RuntimeError (from ITK) when it cannot be read."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.ReadImageInformation()
    pid, comps = reader.GetPixelID(), max(1, reader.GetNumberOfComponents())
    try:
        probe = sitk.Image([1] * reader.GetDimension(), pid, comps) if comps > 1 else sitk.Image(
            [1] * reader.GetDimension(), pid)
        itemsize = sitk.GetArrayViewFromImage(probe).dtype.itemsize
    except (RuntimeError, TypeError, ValueError):  # pixel types numpy has no view of: count the widest
        itemsize = 8
    return Declared(tuple(int(s) for s in reader.GetSize()), sitk.GetPixelIDValueAsString(pid), itemsize * comps)


def _nifti_data_end(head: bytes) -> Optional[int]:
    """Byte offset where a NIfTI file's voxel data end (-1: the header itself is cut short); None: not NIfTI."""
    if len(head) < 4:
        return None
    for order in "<>":
        layout = _NIFTI.get(struct.unpack_from(order + "i", head, 0)[0])
        if layout is not None:
            break
    else:
        return None
    dim_at, dim_fmt, bitpix_at, offset_at, offset_fmt, minimum = layout
    if len(head) < minimum - 4:
        return -1
    dims = struct.unpack_from(order + dim_fmt, head, dim_at)
    bitpix = struct.unpack_from(order + "h", head, bitpix_at)[0]
    offset = struct.unpack_from(order + offset_fmt, head, offset_at)[0]
    if not 1 <= dims[0] <= 7 or any(d < 1 for d in dims[1:dims[0] + 1]) or bitpix <= 0 or bitpix % 8:
        return None  # malformed: ITK's reader says so in its own words
    voxels = 1
    for d in dims[1:dims[0] + 1]:
        voxels *= int(d)
    # niftilib reads a single-file image from the end of the header when vox_offset points inside it
    return max(int(offset), minimum) + voxels * bitpix // 8


def _head(path: str, gz: bool, n: int = 544) -> bytes:
    """Up to n first (decompressed) bytes, as many as there are even when the file ends early."""
    try:
        with open(path, "rb") as f:
            if not gz:
                return f.read(n)
            d, head = zlib.decompressobj(31), b""
            while len(head) < n and not d.eof:
                data = f.read(1 << 16)
                if not data:
                    break
                head += d.decompress(data, n - len(head))
            return head
    except (OSError, zlib.error):
        return b""


def _gzip_length(path: str) -> Tuple[int, str]:
    """Bytes a gzip file decompresses to, and "" or "truncated"/"damaged" when its stream is broken.

    zlib in gzip mode checks each member's CRC-32 and length; members follow each other (multi-member files).
    """
    total, d, chunk_out = 0, zlib.decompressobj(31), 1 << 22
    try:
        with open(path, "rb") as f:
            while True:
                data = f.read(1 << 20)
                if not data:
                    break
                while data:
                    if d.eof:
                        if not data.strip(b"\0"):
                            break  # zero padding after the last member, which gzip tools accept
                        d = zlib.decompressobj(31)
                    total += len(d.decompress(data, chunk_out))
                    data = d.unused_data if d.eof else d.unconsumed_tail
        while not d.eof:  # output still held back by the chunk_out limit
            out = d.decompress(b"", chunk_out)
            if not out:
                return total, "truncated"
            total += len(out)
    except zlib.error:
        return total, "damaged"
    return total, ""


def check_complete(path: str, source: Optional[str] = None) -> None:
    """InputError naming the file when a NIfTI file holds less than its header declares; others pass."""
    low = path.lower()
    if not low.endswith((".nii", ".nii.gz")):
        return
    source = source or os.path.basename(path)
    try:
        with open(path, "rb") as f:
            gz = f.read(2) == b"\x1f\x8b"  # zlib, like niftilib, reads an uncompressed file named .nii.gz as is
    except OSError:
        return
    end = _nifti_data_end(_head(path, gz))
    have, broken = _gzip_length(path) if gz else (os.path.getsize(path), "")
    if broken == "damaged":
        raise InputError("%s is damaged: its compressed data fail gzip's checks." % source, _REDO)
    if end is not None and end < 0 or broken and end is None:
        raise InputError("%s is truncated: it ends inside its header." % source, _REDO)
    if end is not None and (broken or have < end):
        raise InputError("%s is truncated: its header declares %d bytes, but %s %d." % (
            source, end, "its compressed stream ends after" if broken else "it decompresses to only" if gz else
            "the file holds only", have), _REDO)
