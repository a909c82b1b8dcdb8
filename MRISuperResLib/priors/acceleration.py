"""Faster UNet steps for the differentiable DDIM chain: CUDA graphs or torch.compile (setting `accelerate`).

Notation: one step's network call eps = f(x, t, c) with x = [z_t, c as channels] (1, C_in, l...), t the timestep
(a (1,) long tensor), c the cross-attention context (1, 1, n_c); g = dL/d eps the gradient arriving in backward.

Why: at the published size a UNet step on a 20 x 28 x 20 latent launches thousands of small kernels; 46 steps,
each run forward, recomputed and run backward, kept an H200 2.8% busy (docs/benchmarks.md). Replaying a captured
CUDA graph launches a whole step at once.

Modes: "off" eager (each step checkpointed, generator.py); "compile" torch.compile(f) (default mode, static shapes,
t a tensor so one graph serves every step), still checkpointed per step; "cuda-graphs" f forward and its
input-gradient backward captured as two CUDA graphs and replayed (below); "auto" is cuda-graphs on CUDA and off
elsewhere. A mode the device cannot run, a capture or compilation that fails, or one whose output differs from
eager beyond TOLERANCE at a second timestep, warns and falls back to eager: never a crash, never a silent error.

Replaying graphs safely. A captured graph owns static buffers: its inputs, its output, every activation its
backward needs, and the gradients it returns. One graph serves all N steps, so each forward replay overwrites the
previous step's output and activations. The chain therefore runs through `Replay` (an autograd Function), which
1. forward (step k): copies (x_k, t_k, c) into the static inputs, replays the forward graph, returns a *clone* of
   the static output (the next replay overwrites it), and saves only x_k and c (a latent each, like checkpointing);
2. backward (step k): copies x_k, t_k, c back and replays the forward graph again, which rewrites the activations
   of step k into the static buffers (the buffers hold step N's, or those of whichever replay ran last), then
   copies g into the static gradient buffer, replays the backward graph and returns clones of the gradients.
   The recomputation is skipped only when the latest forward replay was this very step (step N, whose backward
   comes first); a backward replay then invalidates that, since the backward graph may reuse the forward's memory.
So the activations a backward replay reads are always those of its own step, as with per-step checkpointing,
whose cost this matches (forward, recomputation, backward). `EmulatedGraphStep` reproduces these buffer semantics
without a GPU, which is how the tests check the reasoning on the CPU.
"""

import itertools
from typing import Callable, Optional

import torch

MODES = ("auto", "off", "cuda-graphs", "compile")
COMPILE_BACKEND = "inductor"  # tests may use a lighter backend
WARMUP = 3  # eager runs before capture (cuDNN autotuning and lazy initialisation must not be captured)
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}  # of the reference's largest magnitude


def resolve(mode: str, device: torch.device, warn: Optional[Callable[[str], None]] = None) -> str:
    """The mode that will run on `device`: "off", "cuda-graphs" or "compile"."""
    device = torch.device(device)
    if mode not in MODES:
        raise ValueError("accelerate must be one of %s, got %r" % (", ".join(MODES), mode))
    if mode == "auto":
        return "cuda-graphs" if device.type == "cuda" else "off"
    if mode == "cuda-graphs" and device.type != "cuda":
        _warn(warn, "accelerate=cuda-graphs needs a CUDA GPU and this run is on %s, so the DDIM steps run eagerly "
                    "(as accelerate=off)." % device.type)
        return "off"
    return mode


def _warn(warn, message):
    if warn is not None:
        warn(message)


def build(mode: str, fn: Callable, x: torch.Tensor, t: torch.Tensor, context: Optional[torch.Tensor],
          t_check: torch.Tensor, amp: bool, warn=None):
    """The step runner for a resolved `mode`, built on sample inputs and checked at timestep `t_check`; None means
    eager. `fn(x, t, context)` is the step's network call in float32 out; `amp`: it runs under bf16 autocast."""
    if mode == "off":
        return None
    tol = TOLERANCE[torch.bfloat16 if amp else torch.float32]
    try:
        if mode == "compile":
            runner = CompiledStep(torch.compile(fn, dynamic=False, backend=COMPILE_BACKEND))
        else:
            runner = ReplayedStep(CudaGraphStep(fn, x, t, context))
        diff = _check(runner, fn, x, t_check, context)
    except Exception as exc:  # noqa: BLE001 - any failure of an optional speed-up falls back to the eager path
        _warn(warn, "accelerate=%s could not be set up (%s: %s); the DDIM steps run eagerly."
              % (mode, type(exc).__name__, str(exc).split("\n")[0][:200]))
        return None
    if diff > tol:
        _warn(warn, "accelerate=%s gave a UNet step %.2g (relative) away from the eager one, more than %.0e; the DDIM "
                    "steps run eagerly." % (mode, diff, tol))
        return None
    return runner


def _check(runner, fn, x, t, context) -> float:
    """Largest relative difference between the runner and eager fn: output and input gradients at timestep t."""
    def grads(call):
        xs = x.detach().clone().requires_grad_(x.requires_grad)
        cs = None if context is None else context.detach().clone().requires_grad_(context.requires_grad)
        with torch.enable_grad():
            out = call(xs, t, cs)
            ins = [v for v in (xs, cs) if v is not None and v.requires_grad]
            g = torch.linspace(-1.0, 1.0, out.numel(), device=out.device).reshape(out.shape)
            return [out.detach()] + list(torch.autograd.grad(out, ins, g)) if ins else [out.detach()]

    want, got = grads(fn), grads(runner)
    return max(float((a - b).abs().max()) / max(float(b.abs().max()), 1e-12) for a, b in zip(got, want))


class CompiledStep:
    """torch.compile'd step; the caller checkpoints it like the eager one."""

    replays_itself = False

    def __init__(self, compiled: Callable):
        self.compiled = compiled

    def __call__(self, x, t, context):
        return self.compiled(x, t, context)


class _StaticStep:
    """Static buffers of a captured step: inputs x, t, c; output; gradient in; gradients out."""

    recompute_in_backward = True  # False only in the test that shows why it is needed

    def _allocate(self, fn, x, t, context):
        self.fn = fn
        self.x = x.detach().clone().requires_grad_(x.requires_grad)
        self.t = t.detach().clone()
        self.context = None if context is None else context.detach().clone().requires_grad_(context.requires_grad)
        self.inputs = [v for v in (self.x, self.context) if v is not None and v.requires_grad]
        self.signature = signature(x, t, context)
        self.token = None  # which forward the activations in the buffers belong to
        self._tokens = itertools.count()

    def load_and_replay(self, x, t, context) -> int:
        with torch.no_grad():
            self.x.copy_(x)
            self.t.copy_(t)
            if context is not None:
                self.context.copy_(context)
        self.replay_forward()
        self.token = next(self._tokens)
        return self.token

    def backward(self, grad):
        """Gradients w.r.t. (x, context), cloned; the activations must be the current step's (see `Replay`)."""
        with torch.no_grad():
            self.grad_out.copy_(grad)
        self.replay_backward()
        self.token = None
        grads = iter(self.grads)
        return tuple(next(grads).clone() if v is not None and v.requires_grad else None
                     for v in (self.x, self.context))


def signature(x, t, context):
    """What a captured step is specific to: shapes, dtypes, devices and which inputs need gradients."""
    return tuple(None if v is None else (tuple(v.shape), v.dtype, v.device, v.requires_grad) for v in (x, t, context))


class CudaGraphStep(_StaticStep):
    """fn's forward and input-gradient backward captured as two CUDA graphs sharing one memory pool (as
    torch.cuda.make_graphed_callables does; written out here because `Replay` needs the recomputation step)."""

    def __init__(self, fn, x, t, context):
        if x.device.type != "cuda":
            raise RuntimeError("CUDA graphs need CUDA tensors")
        self._allocate(fn, x, t, context)
        torch.cuda.synchronize(x.device)
        side = torch.cuda.Stream(x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side), torch.enable_grad():
            for _ in range(WARMUP):
                out = fn(self.x, self.t, self.context)
                torch.autograd.grad(out, self.inputs, torch.ones_like(out))
        torch.cuda.current_stream(x.device).wait_stream(side)
        torch.cuda.synchronize(x.device)
        del out
        self.fwd, self.bwd = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        pool = torch.cuda.graph_pool_handle()
        with torch.enable_grad():
            with torch.cuda.graph(self.fwd, pool=pool):
                self.out = fn(self.x, self.t, self.context)
            self.grad_out = torch.empty_like(self.out)
            with torch.cuda.graph(self.bwd, pool=pool):
                self.grads = torch.autograd.grad(self.out, self.inputs, self.grad_out)

    def replay_forward(self):
        self.fwd.replay()

    def replay_backward(self):
        self.bwd.replay()


class EmulatedGraphStep(_StaticStep):
    """CudaGraphStep's buffer semantics without a GPU: one set of activations, those of the latest forward replay
    (each replay overwrites them), read by every backward replay whatever its inputs were."""

    def __init__(self, fn, x, t, context):
        self._allocate(fn, x, t, context)
        with torch.no_grad():
            self.out = fn(self.x, self.t, self.context).detach().clone()
        self.grad_out = torch.empty_like(self.out)
        self.grads = [torch.empty_like(v) for v in self.inputs]
        self._live = None

    def replay_forward(self):
        with torch.enable_grad():
            live = self.fn(self.x, self.t, self.context)
        with torch.no_grad():
            self.out.copy_(live)
        self._live = live

    def replay_backward(self):
        if self._live is None:
            raise RuntimeError("backward replay without a forward replay: no activations in the buffers")
        grads = torch.autograd.grad(self._live, self.inputs, self.grad_out, retain_graph=True)
        with torch.no_grad():
            for buf, g in zip(self.grads, grads):
                buf.copy_(g)


class Replay(torch.autograd.Function):
    """One DDIM step's network call through a static (captured) step; see the module docstring, steps 1-2."""

    @staticmethod
    def forward(ctx, step, x, t, context):
        ctx.step = step
        ctx.token = step.load_and_replay(x, t, context)
        ctx.save_for_backward(x, t, context)
        return step.out.clone()

    @staticmethod
    def backward(ctx, grad):
        step = ctx.step
        x, t, context = ctx.saved_tensors
        if step.recompute_in_backward and step.token != ctx.token:
            step.load_and_replay(x, t, context)
        gx, gc = step.backward(grad)
        return None, gx, None, gc


class ReplayedStep:
    """A static step as a differentiable call; it does its own recomputation, so the caller must not checkpoint."""

    replays_itself = True

    def __init__(self, step: _StaticStep):
        self.step = step

    def __call__(self, x, t, context):
        if signature(x, t, context) != self.step.signature:
            raise RuntimeError("inputs %s differ from the captured %s" % (signature(x, t, context),
                                                                         self.step.signature))
        if not torch.is_grad_enabled():
            with torch.no_grad():
                self.step.load_and_replay(x, t, context)
                return self.step.out.clone()
        return Replay.apply(self.step, x, t, context)
