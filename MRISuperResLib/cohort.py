"""Cohorts: every volume of a folder as one task on a Dask cluster, resumable through a manifest.

1. The driver (the `run --engine dask` process) lists the inputs and starts a local cluster (one worker process
   per GPU, otherwise the CPU threads split between the workers) or connects to `--scheduler`.
2. One probe task resolves, where the tasks run, what a run would use: device, prior (name and the sha256 of its
   card, which pins the sha256 of every weight file) and settings (schema, the card's defaults for that device,
   --set, --seed).
3. An input is skipped when its latest manifest entry is "ok" for the same input sha256, method, settings,
   prior and degradation request, and its output passes the integrity check (SimpleITK reads a header of the
   recorded size, and the file's sha256 is the recorded one).
4. The rest are submitted, one task each. A worker keeps its prior loaded between tasks (`_PRIORS`). A file
   that fails comes back as a failed record and the others go on. When a worker dies mid-task the scheduler
   runs the task again on another worker (Dask's allowed-failures); an unexpected exception gets `retries`.
   write_volume renames a finished temp file into place, and the driver removes temp files that a killed
   worker left, so no partial output remains.
5. As each task finishes the driver, and only the driver, appends its manifest line (flush + fsync) and
   reports progress: files done, failed and left, with an ETA.
6. A final `summary` event; the exit code is EXIT_SOME_FAILED when any file failed.

Dask is optional (`pip install MRISuperResLib[cluster]`): it is imported only when a cohort runs.
"""

import datetime
import json
import os
import time
from dataclasses import dataclass, field
from typing import Dict, Optional

from . import __version__
from .errors import EXIT_SOME_FAILED, InputError, UserError
from .physics import OperatorSpec

MANIFEST = "manifest.jsonl"
PARTIAL_PREFIX = ".mrisr-partial-"  # volume.write_volume's temp files
RETRIES = 1  # reruns of a task that raised an unexpected exception (a dead worker is handled by allowed-failures)
# Test hook, not a user option: a task whose input NAME has DIR/NAME.hold writes its worker's pid to DIR/NAME.pid
# and waits while the hold file exists, so a test can kill that worker mid-task.
HOLD_ENV = "MRISR_TEST_HOLD_DIR"
# Torch threads of a worker: its share of the CPU. Dask sets OMP_NUM_THREADS=1 in workers, so without this a
# worker on a remote cluster would run torch on one thread.
THREADS_ENV = "MRISR_WORKER_THREADS"

_PRIORS: Dict[tuple, tuple] = {}  # in each worker process: (model, kind, device) -> (prior, identity)


@dataclass(frozen=True)
class CohortJob:
    """What to do with every file: the request, the same for all tasks (sent to the workers, so picklable)."""

    method: str
    settings: dict = field(default_factory=dict)  # the user's --set overrides, as given
    spec: Optional[OperatorSpec] = None  # None: inferred from each file's voxel spacing
    model: Optional[str] = None
    device: str = "auto"
    seed: Optional[int] = None
    registration: str = "auto"

    def request(self) -> dict:
        """The parts of the request a manifest entry must match, besides settings and prior."""
        return {"method": self.method, "degradation_request": self.spec.describe() if self.spec else None,
                "registration": self.registration}


# ---- on the workers ----

def _prior_identity(method, model, device_type):
    """(name, sha256 of model.json, folder) of the prior a run would load, without loading weights."""
    if not method.needs_prior:
        return None, None, None
    from .priors.folder import CARD_FILE, file_digest, read_card
    from .priors.store import default_prior_folder, find_prior

    folder = find_prior(model) if model else default_prior_folder(method.needs_prior, device_type)
    return read_card(folder)["name"], file_digest(os.path.join(folder, CARD_FILE)), folder


def plan_on_worker(job: CohortJob) -> dict:
    """Device, prior and resolved settings a task of `job` would use on this worker (the manifest's key)."""
    from .devices import resolve_device
    from .methods import get_method
    from .pipeline import run_settings
    from .priors.folder import read_card

    method = get_method(job.method)
    dev = resolve_device(job.device)
    name, sha, folder = _prior_identity(method, job.model, dev.type)
    card = read_card(folder) if folder else None
    settings = run_settings(method, job.settings, card, dev.type, job.seed)
    return _jsonable({"device": str(dev), "prior": name, "prior_sha256": sha, "settings": settings})


def _worker_prior(method, model, dev):
    """(prior, (name, sha256), seconds spent loading it now): loaded on this worker's first task, then kept."""
    if not method.needs_prior:
        return None, (None, None), 0.0
    key = (model, method.needs_prior, str(dev))
    if key in _PRIORS:
        return _PRIORS[key] + (0.0,)
    from .priors.store import load_prior

    t0 = time.monotonic()
    name, sha, folder = _prior_identity(method, model, dev.type)
    _PRIORS[key] = (load_prior(folder, dev, kind=method.needs_prior), (name, sha))
    return _PRIORS[key] + (time.monotonic() - t0,)


def _worker_address():
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):  # called outside a Dask worker (a test, or a plain function call)
        return None


def _hold_for_tests(input_path):
    folder = os.environ.get(HOLD_ENV)
    if not folder:
        return
    name = os.path.basename(input_path)
    hold = os.path.join(folder, name + ".hold")
    if os.path.exists(hold):
        with open(os.path.join(folder, name + ".pid"), "w") as fh:
            fh.write(str(os.getpid()))
        while os.path.exists(hold):
            time.sleep(0.05)


def run_file(job: CohortJob, input_path: str, output_path: str) -> dict:
    """The task: super-resolve one file and write it; a manifest record, "failed" for a problem with this file."""
    from .devices import resolve_device
    from .methods import get_method
    from .pipeline import infer_degradation, super_resolve
    from .priors.folder import file_digest
    from .progress import Progress
    from .volume import read_volume, write_volume

    threads = os.environ.get(THREADS_ENV)
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    t0 = time.monotonic()
    notes = []
    progress = Progress(lambda e: notes.append(e["message"]) if e.get("event") == "warning" else None)
    rec = {"input": input_path, "output": output_path, "worker": _worker_address()}
    try:
        _hold_for_tests(input_path)
        lr = read_volume(input_path)  # first: a missing or unreadable file is an InputError, not a crash
        rec["input_sha256"] = file_digest(input_path)
        method = get_method(job.method)
        dev = resolve_device(job.device)
        prior, (rec["prior"], rec["prior_sha256"]), load_s = _worker_prior(method, job.model, dev)
        rec["prior_load_s"] = round(load_s, 3)  # > 0 only on a worker's first task: why that one took longer
        spec = job.spec
        if spec is None:
            spec = infer_degradation(lr.grid)
            progress.warning("degradation inferred from the voxel spacing: %s" % json.dumps(spec.describe()))
        result = super_resolve(lr, method.name, spec, job.settings, prior, job.device, job.seed, progress,
                               registration=job.registration)
        write_volume(result.volume, output_path)
        rec.update(status="ok", error=None, output_sha256=file_digest(output_path),
                   shape=list(result.volume.grid.shape), settings=result.info["settings"],
                   degradation=result.info["degradation"], device=result.info["device"])
    except UserError as exc:
        rec.update(status="failed", error=str(exc))
    rec["seconds"] = round(time.monotonic() - t0, 3)
    rec["warnings"] = notes
    return _jsonable(rec)


# ---- the manifest (written by the driver only) ----

class Manifest:
    """manifest.jsonl of an output folder: read the latest entry per input, append one line per finished task.

    The driver holds an exclusive lock on it while it runs, so two runs never write one folder.
    """

    def __init__(self, folder):
        self.path = os.path.join(folder, MANIFEST)
        self.latest = read_manifest(self.path)
        self.fh = open(self.path, "a+", encoding="utf-8")
        try:
            import fcntl

            fcntl.flock(self.fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:
            pass  # Windows: no advisory lock; one run per folder is up to the user
        except OSError:
            self.fh.close()
            raise InputError("Another run is writing %s." % self.path,
                             "Wait for it to finish, or write to another --output folder.") from None
        self.fh.seek(0, os.SEEK_END)
        if self.fh.tell():  # a run killed mid-line left no newline: start a fresh line rather than extend it
            self.fh.seek(self.fh.tell() - 1)
            last = self.fh.read(1)
            if last != "\n":
                self.fh.write("\n")

    def append(self, rec: dict):
        self.fh.write(json.dumps(rec, sort_keys=True, default=str) + "\n")
        self.fh.flush()
        os.fsync(self.fh.fileno())  # a line the driver reported stays reported after a crash or power loss
        self.latest[os.path.basename(rec["input"])] = rec

    def close(self):
        empty = self.fh.tell() == 0  # a run refused before any task (an unknown prior): no file left behind
        self.fh.close()  # releases the lock
        if empty:
            os.remove(self.path)


def read_manifest(path) -> Dict[str, dict]:
    """Latest entry per input file name; unreadable lines (a torn last line) are ignored."""
    latest = {}
    if not os.path.exists(path):
        return latest
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("input"), str):
                latest[os.path.basename(rec["input"])] = rec
    return latest


def output_intact(path, entry) -> bool:
    """The output SimpleITK reads with the recorded size, and its sha256 is the recorded one."""
    import SimpleITK as sitk

    from .priors.folder import file_digest

    if not os.path.isfile(path):
        return False
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return False
    return list(reader.GetSize()) == entry.get("shape") and file_digest(path) == entry.get("output_sha256")


def redo_reason(entry, job: CohortJob, plan: dict, input_path, output_path) -> Optional[str]:
    """Why an input must run again (None: its output is current)."""
    from .priors.folder import file_digest

    if not entry or entry.get("status") != "ok":
        return "not done"
    for key, want in dict(job.request(), prior_sha256=plan["prior_sha256"], settings=plan["settings"]).items():
        if entry.get(key) != want:
            return "%s changed" % key.replace("_", " ")
    if entry.get("input_sha256") != file_digest(input_path):
        return "input changed"
    if not output_intact(output_path, entry):
        return "output missing or damaged"
    return None


def remove_partials(folder):
    """Temp files of write_volume left by a worker killed while writing (the lock says no run of ours writes)."""
    for name in os.listdir(folder):
        if name.startswith(PARTIAL_PREFIX):
            try:
                os.remove(os.path.join(folder, name))
            except OSError:
                pass


def _jsonable(obj):
    """Round trip through JSON, so a fresh record compares equal to one read back from the manifest."""
    return json.loads(json.dumps(obj, default=str))


def _utc_now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ---- the driver ----

def _import_distributed():
    # Fewer log lines: a cohort's stderr should show its own lines and Dask's warnings (a worker died), not
    # every connection. Set before the import, which reads it; spawned workers inherit it.
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    try:
        import distributed
    except ImportError:
        raise InputError("--engine dask needs Dask's distributed scheduler, which is not installed.",
                         "Install it with: pip install MRISuperResLib[cluster]") from None
    return distributed


def local_worker_envs(workers: Optional[int], device: str) -> list:
    """The environment of each local worker process: its own GPU where there are GPUs, else a share of the CPU.

    `--device auto` or `cuda` with GPUs: one worker per GPU by default, each seeing one GPU as cuda:0 through
    CUDA_VISIBLE_DEVICES (several workers share GPUs round-robin when --workers exceeds them). `cuda:N` keeps
    every worker on GPU N. Without GPUs, one worker per 4 cores by default. The CPU threads are split evenly.
    """
    import torch

    # The cores this process may use (a container or a Slurm allocation may offer fewer than the machine has).
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    gpu_ids = []
    if device.strip().lower() in ("auto", "cuda") and torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
        gpu_ids = [g.strip() for g in visible.split(",") if g.strip()] if visible else [
            str(i) for i in range(torch.cuda.device_count())]
    n = workers or len(gpu_ids) or max(1, cores // 4)
    threads = str(max(1, cores // n))
    envs = []
    for i in range(n):
        env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads,
               THREADS_ENV: threads}
        if gpu_ids:
            env["CUDA_VISIBLE_DEVICES"] = gpu_ids[i % len(gpu_ids)]
        envs.append(env)
    return envs


def connect(distributed, scheduler: Optional[str], workers: Optional[int], device: str):
    """(cluster or None, client): a new local cluster, or a client of the cluster at `scheduler`."""
    if scheduler:
        try:
            return None, distributed.Client(scheduler, timeout="30s")
        except (OSError, TimeoutError) as exc:
            raise InputError("Cannot reach the Dask scheduler at %s (%s)." % (scheduler, exc),
                             "Check the address (tcp://HOST:8786) and that the scheduler is running.") from None
    from distributed.system import MEMORY_LIMIT

    envs = local_worker_envs(workers, device)
    # One task at a time per worker (nthreads 1): a task uses all of the worker's torch threads or its GPU.
    specs = {i: {"cls": distributed.Nanny,
                 "options": {"nthreads": 1, "env": env, "host": "127.0.0.1", "memory_limit": MEMORY_LIMIT // len(envs)}}
             for i, env in enumerate(envs)}
    cluster = distributed.SpecCluster(
        workers=specs, scheduler={"cls": distributed.Scheduler,
                                  "options": {"host": "127.0.0.1", "dashboard_address": ":8787"}}, name="mrisr")
    return cluster, distributed.Client(cluster)


def _outcome(distributed, fut, input_path, output_path) -> dict:
    try:
        return fut.result()
    except distributed.KilledWorker:
        error = ("Every worker that ran it died (out of memory, or a crash in a library); Dask gave up after "
                 "its allowed failures.")
    except Exception as exc:  # a bug in a task, after its retries: keep the run going, record the message
        error = "Internal error (%s: %s)." % (type(exc).__name__, exc)
    return {"input": input_path, "output": output_path, "status": "failed", "error": error, "warnings": []}


def run_cohort(job: CohortJob, input_dir, output_dir, sink, progress, workers=None, scheduler=None, log=None) -> int:
    """Super-resolve every volume of `input_dir` into `output_dir` on Dask; the exit code (see module docstring)."""
    from .volume import list_volumes

    log = log or (lambda msg: None)
    inputs = list_volumes(input_dir)
    if not inputs:
        raise InputError("No volumes in folder %s." % input_dir, "Put .nii.gz, .nii, .nrrd or .mha files there.")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise InputError("With a folder as --input, --output must be a folder too (%s is a file)." % output_dir,
                         "Give a folder for the results.")
    if os.path.abspath(output_dir) == os.path.abspath(input_dir):
        raise InputError("--output is the input folder.", "Write results to another folder; inputs are never touched.")
    if scheduler and workers:
        raise InputError("--workers sizes the local cluster; it does not apply with --scheduler.",
                         "Size an existing cluster where it was started (e.g. dask-jobqueue's cluster.scale).")
    distributed = _import_distributed()
    os.makedirs(output_dir, exist_ok=True)
    manifest = Manifest(output_dir)
    cluster = client = None
    t0 = time.monotonic()
    try:
        remove_partials(output_dir)
        cluster, client = connect(distributed, scheduler, workers, job.device)
        n_workers = len(client.scheduler_info().get("workers", {}))
        log("dask: %d workers, scheduler %s, dashboard %s" % (n_workers, client.scheduler.address,
                                                             client.dashboard_link))
        sink({"event": "start", "engine": "dask", "method": job.method, "input": os.path.abspath(input_dir),
              "output": os.path.abspath(output_dir), "device": job.device, "files": len(inputs),
              "workers": n_workers, "scheduler": client.scheduler.address, "dashboard": client.dashboard_link,
              "manifest": manifest.path, "version": __version__})
        plan = client.submit(plan_on_worker, job, pure=False).result()
        todo, reasons = [], {}
        for path in inputs:
            out = os.path.join(output_dir, os.path.basename(path))
            reason = redo_reason(manifest.latest.get(os.path.basename(path)), job, plan, path, out)
            if reason:
                todo.append((os.path.abspath(path), os.path.abspath(out)))
                reasons[reason] = reasons.get(reason, 0) + 1
        skipped = len(inputs) - len(todo)
        log("cohort: %d files, %d up to date (skipped), %d to run%s" % (
            len(inputs), skipped, len(todo), "".join(", %d %s" % (n, r) for r, n in sorted(reasons.items()))))
        progress.restart_clock()
        futures = {client.submit(run_file, job, p, o, retries=RETRIES, pure=False): (p, o) for p, o in todo}
        done, failures = 0, []
        for fut in distributed.as_completed(list(futures)):
            p, o = futures.pop(fut)
            rec = _outcome(distributed, fut, p, o)
            fut.release()  # thousands of finished futures need not stay in the scheduler's memory
            name = os.path.basename(p)
            full = dict(plan, **job.request())
            full.update({k: v for k, v in rec.items() if v is not None or k == "error"})
            full["finished"] = _utc_now()
            full["version"] = __version__
            notes = full.pop("warnings", [])
            manifest.append(full)
            for note in notes:
                sink({"event": "warning", "message": "%s: %s" % (name, note), "input": p})
            if full["status"] == "ok":
                done += 1
                sink({"event": "result", "input": p, "output": o, "seconds": full.get("seconds"),
                      "worker": full.get("worker"), "device": full.get("device"), "grid": {"shape": full.get("shape")}})
            else:
                failures.append({"input": p, "error": full["error"]})
                sink({"event": "warning", "message": "%s: failed: %s" % (name, full["error"]), "input": p})
            finished = done + len(failures)
            progress(finished, len(todo), "%d of %d files: %d done, %d failed, %d left" % (
                finished, len(todo), done, len(failures), len(todo) - finished),
                done=done, failed=len(failures), left=len(todo) - finished, skipped=skipped)
    finally:
        # With --scheduler, closing the client cancels queued tasks; a task already running finishes on its worker
        # and its output, without a manifest entry, is redone by the next run.
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
        remove_partials(output_dir)
        manifest.close()
    code = EXIT_SOME_FAILED if failures else 0
    log("cohort: %d done, %d skipped (up to date), %d failed; manifest %s" % (
        done, skipped, len(failures), manifest.path))
    sink({"event": "summary", "total": len(inputs), "done": done, "skipped": skipped, "failed": len(failures),
          "failures": failures, "manifest": manifest.path, "seconds": round(time.monotonic() - t0, 3),
          "exit_code": code})
    return code
