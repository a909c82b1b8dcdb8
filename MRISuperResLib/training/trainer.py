"""One resumable, chunked training loop shared by every `train ...` command.

A run lives in a folder:
    run.json        task name, task options, training options (written once; a resume reads it back)
    checkpoint.pt   modules, optimiser, step, RNG state, task state, weight average (atomic replace;
                    weights_only loadable)
    log.jsonl       one line per logged step: step, loss and its parts, lr, seconds per step

Loop (per invocation):
    1. load checkpoint if resuming, else start at step 0
    2. for step in [start, target): draw the step's generator from (seed, step), loss, backward, clip, Adam
    3. stop at the target, after `chunk_steps` steps, or when `max_minutes` are used up; checkpoint
With `ema` > 0 an exponential moving average of the weights, avg <- ema * avg + (1 - ema) * w after every step,
is kept beside them and is what export writes: it averages out the last steps' gradient noise, which a
diffusion loss (one random timestep per sample) has plenty of. Turned on at a resume, it starts from the
current weights.
Every random draw of step s comes from a generator seeded by (seed, s), so a run split into chunks
gives the same weights as one uninterrupted run (on the same device and thread count).

A task (autoencoder.py, ldm.py; later vdm, paired) is a small object with: `name`, `options`,
`modules()` (dict of nn.Module saved in the checkpoint), `parameters()` (what the optimiser trains),
`loss(step, generator) -> (loss, {part: float})`, `state()` / `load_state(d)` (extra tensors to keep),
`evaluate(seeds) -> {metric: float}`, `networks()` (for export: {role: (module, kwargs)}), `card()`.
A task whose data needs no network may also split its loss into `draw(generator) -> batch` (CPU tensors) and
`loss_on(batch, generator)`; `workers` > 0 then draws the coming steps' batches in separate processes, which is
what keeps a GPU busy: rendering synthetic brains is CPU work, and one core cannot feed a GPU.
"""

import json
import math
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch

from ..errors import InputError, UserError
from ..volume import atomic_write, atomic_write_text

CHECKPOINT = "checkpoint.pt"
RUN_FILE = "run.json"
LOG_FILE = "log.jsonl"


@dataclass
class TrainConfig:
    steps: int = 1000              # target total steps of the run
    chunk_steps: int = 0           # stop after this many steps in this invocation (0: no limit)
    max_minutes: float = 9.0       # stop (and checkpoint) once this much wall time is used (0: no limit)
    checkpoint_every: int = 100
    log_every: int = 1
    lr: float = 1e-4
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    ema: float = 0.0               # decay of the weight average that export writes (0: export the weights)

    def __post_init__(self):
        for name in ("steps", "chunk_steps", "checkpoint_every", "log_every", "warmup_steps"):
            if int(getattr(self, name)) < 0:
                raise InputError("--%s must not be negative." % name.replace("_", "-"), "Give 0 or more.")
        if self.lr <= 0:
            raise InputError("--lr must be positive.", "Give a learning rate such as 1e-4.")
        if not 0.0 <= self.ema < 1.0:
            raise InputError("--ema must be in [0, 1).", "Give a decay such as 0.999 (about the last 1000 steps), or 0.")


@dataclass
class TrainResult:
    step: int
    target: int
    reason: str                    # "done", "chunk", "time"
    seconds: float
    last_loss: Optional[float]

    @property
    def finished(self) -> bool:
        return self.step >= self.target


def step_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator of one step: independent of how the run was chunked."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(step) * 7_919 + 17) % (2 ** 63 - 1))


def read_run(run_dir) -> dict:
    path = os.path.join(run_dir, RUN_FILE)
    if not os.path.exists(path):
        raise InputError("%s is not a training run folder (no %s)." % (run_dir, RUN_FILE),
                         "Give the --run-dir of an earlier `train` command, or start a new run without --resume.")
    with open(path) as f:
        return json.load(f)


def write_run(run_dir, task_name, task_options, config: TrainConfig, command=""):
    os.makedirs(run_dir, exist_ok=True)
    atomic_write_text(os.path.join(run_dir, RUN_FILE), json.dumps(
        {"task": task_name, "options": task_options, "train": asdict(config), "command": command}, indent=1))


def load_checkpoint(run_dir, device="cpu") -> Optional[dict]:
    path = os.path.join(run_dir, CHECKPOINT)
    if not os.path.exists(path):
        return None
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:
        raise InputError("Checkpoint %s cannot be read (%s)." % (path, str(exc).splitlines()[0][:160]),
                         "Delete it to restart from the previous state, or start a new run folder.") from None


def _truncate_log(path, last_step):
    """Drop log lines past the checkpoint: they belong to steps that will be run again."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line).get("step", 0) <= last_step:
                    keep.append(line)
            except ValueError:
                continue
    atomic_write_text(path, "".join(keep))


_WORKER_TASK = None


def _worker_start(task_class, options):
    global _WORKER_TASK
    torch.set_num_threads(1)  # one core per worker: the workers together are the parallelism
    _WORKER_TASK = task_class(options, "cpu")


def _worker_draw(seed: int, step: int):
    gen = step_generator(seed, step)
    batch = _WORKER_TASK.draw(gen)
    return batch, gen.get_state()


class InProcessFeed:
    """Each step's loss from the task itself, in the training process."""

    def __init__(self, task, seed: int):
        self.task, self.seed = task, seed

    def loss(self, step: int, last: int):
        return self.task.loss(step, step_generator(self.seed, step))

    def close(self):
        pass


class WorkerFeed:
    """The batches of the coming steps drawn in worker processes while the training process runs the current one.

    A worker draws step s's batch from step s's generator and sends the generator's state back with it, so the
    loss continues from the very draws it would have made in-process: --workers changes the speed, not the run.
    """

    def __init__(self, task, seed: int, workers: int):
        self.task, self.seed, self.depth = task, seed, 2 * workers
        self.pending = {}
        self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_worker_start, initargs=(type(task), task.options))

    def loss(self, step: int, last: int):
        for s in range(step, min(step + self.depth, last)):
            if s not in self.pending:
                self.pending[s] = self.pool.submit(_worker_draw, self.seed, s)
        try:
            batch, state = self.pending.pop(step).result()
        except BrokenProcessPool:
            raise UserError("A data worker process stopped unexpectedly (often: out of memory).",
                            "Resume with fewer --workers, or without --workers.") from None
        gen = torch.Generator()
        gen.set_state(state)
        return self.task.loss_on(batch, gen)

    def close(self):
        self.pool.shutdown(wait=True, cancel_futures=True)


class Trainer:
    def __init__(self, task, config: TrainConfig, run_dir: str, device=torch.device("cpu"),
                 report: Optional[Callable[[dict], None]] = None, clock=time.monotonic, workers: int = 0):
        if int(workers) < 0:
            raise InputError("--workers must not be negative.", "Give 0 (draw in the training process) or more.")
        if workers and not (hasattr(task, "draw") and hasattr(task, "loss_on")):
            raise InputError("train %s cannot draw its batches in worker processes: its data needs the network."
                             % task.name, "Run it without --workers.")
        self.workers = int(workers)
        self.task = task
        self.config = config
        self.run_dir = run_dir
        self.device = torch.device(device)
        self.report = report or (lambda event: None)
        self.clock = clock
        params = list(task.parameters())
        if not params:
            raise UserError("The %s task has nothing to train." % task.name, "Check its options.")
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        self.step = 0
        self.average = None  # {module: {key: tensor}} when config.ema > 0
        self._pairs = None   # (average tensors, live tensors, non-float pairs), made once per train()

    # ---- weight average --------------------------------------------------------------------------
    def _start_average(self):
        self.average = {name: {k: v.detach().clone() for k, v in m.state_dict().items()}
                        for name, m in self.task.modules().items()}

    def _pair_average(self):
        # state_dict() tensors share storage with the live parameters and buffers, so one lookup serves every step
        avg, live, other = [], [], []
        for name, m in self.task.modules().items():
            for k, v in m.state_dict().items():
                if v.is_floating_point():
                    avg.append(self.average[name][k])
                    live.append(v)
                else:
                    other.append((self.average[name][k], v))
        self._pairs = (avg, live, other)

    @torch.no_grad()
    def _update_average(self):
        avg, live, other = self._pairs
        torch._foreach_lerp_(avg, live, 1.0 - self.config.ema)
        for a, v in other:
            a.copy_(v)

    # ---- state -------------------------------------------------------------------------------------
    def save(self):
        state = {
            "step": self.step,
            "modules": {k: m.state_dict() for k, m in self.task.modules().items()},
            "optimizer": self.optimizer.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "task_state": self.task.state(),
        }
        if self.average is not None:
            state["average"] = {"decay": self.config.ema, "modules": self.average}
        if self.device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        atomic_write(os.path.join(self.run_dir, CHECKPOINT), lambda tmp: torch.save(state, tmp), ".pt")

    def restore(self) -> bool:
        ckpt = load_checkpoint(self.run_dir, self.device)
        if ckpt is None:
            return False
        for name, module in self.task.modules().items():
            if name not in ckpt["modules"]:
                raise InputError("Checkpoint has no '%s' network." % name, "Resume with the run's own task.")
            module.load_state_dict(ckpt["modules"][name])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng_cpu"].cpu())
        if "rng_cuda" in ckpt and self.device.type == "cuda":
            torch.cuda.set_rng_state(ckpt["rng_cuda"].cpu(), self.device)
        self.task.load_state(ckpt.get("task_state") or {})
        self.step = int(ckpt["step"])
        if self.config.ema > 0 and "average" in ckpt:
            self.average = ckpt["average"]["modules"]
        _truncate_log(os.path.join(self.run_dir, LOG_FILE), self.step)
        return True

    def lr_at(self, step: int) -> float:
        w = self.config.warmup_steps
        return self.config.lr * (min(1.0, (step + 1) / w) if w else 1.0)

    # ---- loop --------------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        cfg = self.config
        t0 = self.clock()
        start = self.step
        target = cfg.steps
        log_path = os.path.join(self.run_dir, LOG_FILE)
        for m in self.task.modules().values():
            m.train()
        if self.config.ema > 0:
            if self.average is None:
                self._start_average()
            self._pair_average()
        feed = WorkerFeed(self.task, cfg.seed, self.workers) if self.workers else InProcessFeed(self.task, cfg.seed)
        try:
            reason, last = self._loop(feed, log_path, t0, start, target)
        finally:
            feed.close()
        self.save()
        return TrainResult(self.step, target, reason, self.clock() - t0, last)

    def _loop(self, feed, log_path, t0, start, target):
        cfg = self.config
        reason, last = "done", None
        with open(log_path, "a") as log:
            while self.step < target:
                if cfg.chunk_steps and self.step - start >= cfg.chunk_steps:
                    reason = "chunk"
                    break
                if cfg.max_minutes and self.step > start and self.clock() - t0 >= 60.0 * cfg.max_minutes:
                    reason = "time"
                    break
                ts = self.clock()
                for group in self.optimizer.param_groups:
                    group["lr"] = self.lr_at(self.step)
                self.optimizer.zero_grad(set_to_none=True)
                loss, parts = feed.loss(self.step, target)
                if not torch.isfinite(loss):
                    self.save()
                    raise UserError("The loss became %s at step %d." % (float(loss), self.step),
                                    "Lower --lr (or raise --warmup-steps) and resume from the last checkpoint.")
                loss.backward()
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(list(self.task.parameters()), cfg.grad_clip)
                self.optimizer.step()
                if self.average is not None:
                    self._update_average()
                self.step += 1
                last = float(loss.detach())
                dt = self.clock() - ts
                if cfg.log_every and (self.step % cfg.log_every == 0 or self.step == target):
                    row = {"step": self.step, "loss": last, "lr": self.lr_at(self.step - 1), "seconds": round(dt, 4)}
                    row.update({k: float(v) for k, v in parts.items()})
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                self.report({"step": self.step, "total": target, "loss": last, "seconds": dt,
                             "elapsed": self.clock() - t0, "start": start})
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save()
        return reason, last


def exported_weights(ckpt: dict) -> dict:
    """{module: state_dict} that export writes: the weight average when the run keeps one, else the weights."""
    if "average" in ckpt:
        return ckpt["average"]["modules"]
    return ckpt["modules"]


def count_parameters(module) -> int:
    return int(sum(p.numel() for p in module.parameters()))


def command_line_of(run: dict) -> str:
    """The commands that made a run (first start and every resume), as one shell line."""
    return " && ".join(c for c in run.get("commands", [run.get("command", "")]) if c)


def psnr(x, ref, data_range=1.0) -> float:
    mse = float(torch.mean((x.float() - ref.float()) ** 2))
    return float("inf") if mse == 0 else 10.0 * math.log10(data_range ** 2 / mse)
