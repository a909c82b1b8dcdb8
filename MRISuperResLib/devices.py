"""Compute devices: listing them and resolving a user's choice."""

import torch

from .errors import InputError


def list_devices() -> list:
    """[{"name": "cpu", ...}, {"name": "cuda:0", "title": ..., "free_mb": ..., "total_mb": ...}, ...]."""
    out = [{"name": "cpu", "title": "CPU (%d threads)" % torch.get_num_threads(), "type": "cpu"}]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            out.append({"name": "cuda:%d" % i, "title": torch.cuda.get_device_name(i), "type": "cuda",
                        "free_mb": round(free / 2**20), "total_mb": round(total / 2**20)})
    return out


def resolve_device(name: str = "auto") -> torch.device:
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError("Device '%s' was requested but no CUDA GPU is available to this PyTorch." % name,
                             "Use --device cpu (or auto), or install a CUDA build of PyTorch.")
        idx = 0
        if ":" in name:
            try:
                idx = int(name.split(":", 1)[1])
            except ValueError:
                raise InputError("Device '%s' is not valid." % name, "Use cpu, cuda or cuda:N.") from None
        if not 0 <= idx < torch.cuda.device_count():
            raise InputError("GPU %d does not exist (%d available)." % (idx, torch.cuda.device_count()),
                             "Use one of: %s." % ", ".join(d["name"] for d in list_devices()))
        return torch.device("cuda:%d" % idx)
    raise InputError("Device '%s' is not valid." % name, "Use auto, cpu, cuda or cuda:N.")
