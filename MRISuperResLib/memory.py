"""Host memory this process can still allocate, asked before a large allocation instead of dying in it.

Why: past the limit the kernel kills the process without a word (exit 137) or Python raises MemoryError half way
through; asked first, the user gets a `ResourceError` with the numbers. The bound is the smallest of:
1. MemAvailable (Linux; physical free pages elsewhere);
2. the cgroup's limit minus what the cgroup uses and cannot reclaim (containers, systemd slices);
3. the process's own limits (`ulimit -v`, `prlimit --as`; `ulimit -d`) minus what it already maps.
"""

import math
import os

from .errors import ResourceError

GB = 1e9
MARGIN = 0.9  # leave a tenth for what the estimate does not count (Python objects, libraries' buffers)
_NO_LIMIT = 2 ** 60  # cgroup v1 writes a huge number for "unlimited"


def host_available() -> float:
    """Bytes this process can still allocate on the host (math.inf when nothing is known)."""
    bounds = [b for b in (_meminfo(), _cgroup(), _rlimit("RLIMIT_AS", "VmSize"), _rlimit("RLIMIT_DATA", "VmData"))
              if b is not None]
    return max(0.0, min(bounds)) if bounds else math.inf


def describe_bytes(n: float) -> str:
    if n >= GB:
        return "%.1f GB" % (n / GB)
    return "%.0f MB" % math.ceil(n / 1e6)


def check_host(need: float, what: str, fix: str, available: float = None) -> None:
    """Raise ResourceError (exit 3) when `need` bytes exceed MARGIN of what the host can still give."""
    avail = host_available() if available is None else available
    if need > MARGIN * avail:
        raise ResourceError("%s needs about %s of memory, but only %s are available to this process."
                            % (what, describe_bytes(need), describe_bytes(avail)), fix)


def _meminfo():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def _read_number(path):
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    try:
        return float(text)
    except ValueError:  # "max": no limit
        return None


def _cgroup():
    for limit, usage, stat in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current",
                                "/sys/fs/cgroup/memory.stat"),
                               ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                "/sys/fs/cgroup/memory/memory.usage_in_bytes", "/sys/fs/cgroup/memory/memory.stat")):
        lim, used = _read_number(limit), _read_number(usage)
        if lim is None or used is None or lim >= _NO_LIMIT:
            continue
        reclaimable = 0.0  # page cache the kernel drops before it kills anyone
        try:
            with open(stat) as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key in ("inactive_file", "total_inactive_file"):
                        reclaimable = float(value)
                        break
        except (OSError, ValueError):
            pass
        return lim - max(0.0, used - reclaimable)
    return None


def _rlimit(name, status_key):
    try:
        import resource
    except ImportError:  # Windows
        return None
    soft, _ = resource.getrlimit(getattr(resource, name))
    if soft == resource.RLIM_INFINITY:
        return None
    used = 0.0
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(status_key + ":"):
                    used = float(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    return float(soft) - used
