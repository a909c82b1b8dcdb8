"""The command line keeps freed heap memory (glibc) so CPU network calls stop faulting their buffers in again."""

import json
import os
import subprocess
import sys

import pytest

from MRISuperResLib import allocator

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")

# After SETUP, frees a 256 MB tensor and reports whether its pages stayed in the process (glibc's mallinfo2).
_PROBE = r"""
import ctypes, json, runpy, sys
SETUP
import torch

class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
t = torch.ones(64 * 1024 * 1024)
mapped_while_used = libc.mallinfo2().hblkhd
del t
print(json.dumps({"mapped_while_used": mapped_while_used, "free_in_heap": libc.mallinfo2().fordblks}))
"""

_BIG = 256 << 20


def _probe(setup, opt_out=False):
    env = dict(os.environ)
    env.pop(allocator.OPT_OUT, None)
    if opt_out:
        env[allocator.OPT_OUT] = "0"
    out = subprocess.run([sys.executable, "-c", _PROBE.replace("SETUP", setup)], env=env, capture_output=True,
                         text=True, timeout=120)
    if "mallinfo2" in out.stderr:
        pytest.skip("glibc without mallinfo2")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _kept(report):
    # kept: the block comes from the heap and stays there, free, after the tensor is gone;
    # glibc's default: a 256 MB block is its own mapping, unmapped when freed
    if report["mapped_while_used"] < _BIG and report["free_in_heap"] >= _BIG:
        return True
    assert report["mapped_while_used"] >= _BIG and report["free_in_heap"] < _BIG, report
    return False


def test_freed_tensor_memory_stays_for_reuse_unless_opted_out():
    call = "from MRISuperResLib.allocator import keep_freed_memory; assert keep_freed_memory() is %s"
    assert _kept(_probe(call % True))
    assert not _kept(_probe(call % False, opt_out=True))


def test_the_command_line_keeps_it_and_a_library_import_does_not():
    # `python -m MRISuperResLib` (also how the Slicer worker runs) opts in...
    cli = ("sys.argv = ['MRISuperResLib', 'methods']\n"
           "try:\n    runpy.run_module('MRISuperResLib', run_name='__main__')\nexcept SystemExit:\n    pass")
    assert _kept(_probe(cli))
    # ...while importing the library, as Slicer's own Python does, leaves that process's allocator alone
    assert not _kept(_probe("import MRISuperResLib.cli, MRISuperResLib.pipeline"))
