"""Speed and memory levers of the InverseSR generator: low-memory GroupNorm, nested checkpointing, captured (CUDA
graph) and compiled UNet steps. Each must change how the work runs, never what it computes."""

import weakref

import pytest
import torch
from conftest import assert_same_to_float32_rounding
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from MRISuperResLib.methods.inversesr import budget
from MRISuperResLib.priors import acceleration, lowmem_norm, revolve, synthetic
from MRISuperResLib.priors.ddim import ddim_timesteps
from MRISuperResLib.priors.generator import LatentGenerator

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def prior():
    return synthetic.random_prior(synthetic.tiny_card(), seed=0)


def _chain_grads(gen, steps=3, seed=0, device="cpu"):
    """x = G(z_T, c) and the gradients of a fixed linear loss w.r.t. z_T and c."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn((1,) + gen.latent_shape, generator=g).to(device).requires_grad_(True)
    c = torch.tensor([0.2, 0.7, 0.5, 0.4], device=device, requires_grad=True)
    x = gen(z, c, ddim_timesteps(steps))
    w = torch.linspace(-1, 1, x.numel(), device=device).reshape(x.shape)
    loss = (x * w).sum()
    loss.backward()
    return loss.detach(), z.grad, c.grad


class LiveBytes(TorchDispatchMode):
    """Peak bytes of live tensor storages on the CPU (each storage counted once, until it is freed)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.seen = set()

    def _free(self, key, n):
        self.seen.discard(key)
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                st = t.untyped_storage()
                if id(st) not in self.seen:
                    self.seen.add(id(st))
                    self.live += st.nbytes()
                    weakref.finalize(st, self._free, id(st), st.nbytes())
                    self.peak = max(self.peak, self.live)
        return out


# ---- low-memory GroupNorm + SiLU ----

@pytest.mark.parametrize("silu,layout", [(True, torch.contiguous_format), (False, torch.contiguous_format),
                                         (True, torch.channels_last_3d)])
def test_low_memory_norm_equals_eager(silu, layout, monkeypatch):
    # channels-last: what a convolution with the CPU's channels-last weights (priors/folder.py) hands the norm
    monkeypatch.setattr(lowmem_norm, "WHOLE_ELEMENTS", 0)  # several chunks (one group each), as at full size
    norm = torch.nn.GroupNorm(4, 8, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(1, 8, 6, 5, 4, generator=g) * 3 + 1).to(memory_format=layout).requires_grad_(True)
    w = torch.randn(1, 8, 6, 5, 4, generator=g)
    want = torch.nn.functional.silu(norm(x)) if silu else norm(x)
    want_grads = torch.autograd.grad((want * w).sum(), [x, norm.weight, norm.bias])
    got = lowmem_norm.group_norm_silu(x, norm, silu=silu)
    got_grads = torch.autograd.grad((got * w).sum(), [x, norm.weight, norm.bias])
    assert got.dtype == torch.float32
    assert_same_to_float32_rounding(got.detach(), want.detach())
    for a, b in zip(got_grads, want_grads):
        assert_same_to_float32_rounding(a, b)


def test_low_memory_norm_under_bf16_autocast_gives_the_convolution_the_same_values():
    norm, conv = torch.nn.GroupNorm(2, 4), torch.nn.Conv3d(4, 4, 3, padding=1)
    x = torch.randn(1, 4, 6, 6, 6, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = conv(torch.nn.functional.silu(norm(x)))
        got = conv(lowmem_norm.group_norm_silu(x, norm))
    assert got.dtype == want.dtype == torch.bfloat16
    gw, = torch.autograd.grad(want.float().sum(), [x])
    gg, = torch.autograd.grad(got.float().sum(), [x])
    got, want = got.detach().float(), want.detach().float()
    assert float((got - want).abs().max()) <= 2 ** -7 * float(want.abs().max())
    assert float((gg - gw).abs().max()) <= 2 ** -6 * float(gw.abs().max())


def test_low_memory_norm_saves_only_its_input():
    norm = torch.nn.GroupNorm(4, 8).to("meta")
    x = torch.zeros(1, 8, 16, 16, 16, device="meta", requires_grad=True)
    eager, _, _ = revolve.meta_pass(lambda: torch.nn.functional.silu(norm(x)), list(norm.parameters()))
    low, _, _ = revolve.meta_pass(lambda: lowmem_norm.group_norm_silu(x, norm), list(norm.parameters()))
    assert low == x.numel() * 4 and eager >= 2 * low


def test_decoder_with_low_memory_norm_has_the_plain_gradients(prior):
    z = torch.randn((1,) + tuple(prior.card["latent"]["shape"]), generator=torch.Generator().manual_seed(2))
    grads = []
    for low in (False, True):
        gen = LatentGenerator(prior)
        gen.low_memory_norm = low
        zz = z.clone().requires_grad_(True)
        x = gen.decode(zz)
        (x * x).sum().backward()
        grads.append((x.detach(), zz.grad))
    assert_same_to_float32_rounding(grads[1][0], grads[0][0])
    assert_same_to_float32_rounding(grads[1][1], grads[0][1])


# ---- nested checkpointing ----

def _medium_prior():
    return synthetic.random_prior(synthetic.tiny_card(image=(32, 32, 32), channels=(8, 16, 16)), seed=0)


def test_nested_checkpointing_has_the_plain_gradients_and_a_lower_peak(monkeypatch):
    monkeypatch.setattr(lowmem_norm, "WHOLE_ELEMENTS", 0)  # chunks of 1/16 of a tensor, as at the published size
    prior = _medium_prior()
    z = torch.randn((1,) + tuple(prior.card["latent"]["shape"]), generator=torch.Generator().manual_seed(3))
    out = {}
    for nested in (False, True):
        gen = LatentGenerator(prior, nested_checkpointing=nested)
        units = gen.decoder_plan(tuple(z.shape))  # on the meta device, outside the measurement
        zz = z.clone().requires_grad_(True)
        with LiveBytes() as mem:
            x = gen.decode(zz)
            (x * x).sum().backward()
            del x
        est = budget.estimate(prior.card, "cpu", 1, nested_checkpointing=nested)
        out[nested] = (zz.grad, mem.peak, est.parts["decoder"], units)
    assert any(u0 < u1 for u0, u1 in out[True][3])  # the plan has groups
    assert torch.equal(out[True][0], out[False][0])  # same functions on the same inputs: same bits
    assert out[True][1] < out[False][1]  # measured peak of live tensors
    assert out[True][2] < out[False][2]  # and the estimate
    for _, measured, estimated, _ in out.values():
        assert measured <= estimated  # the estimate bounds the measurement


def test_published_decoder_estimates_fall_with_low_memory_norm_and_nesting():
    from MRISuperResLib.priors import ukbb

    card = ukbb.card()
    budget._THROUGHPUT.setdefault("cuda", 1e15)  # estimate() for CUDA without a GPU: only the memory is checked
    plain = budget.estimate(card, "cuda", 1, profile=budget.network_profile(card, False, False))
    p = budget.network_profile(card, False)
    low = budget.estimate(card, "cuda", 1, profile=p)
    nested = budget.estimate(card, "cuda", 1, profile=p, nested_checkpointing=True)
    gb = 1e9
    assert 19 * gb < plain.memory_bytes < 22 * gb  # 20.3 GB, the estimate beside the 18.1 GB measured on an H200
    assert low.memory_bytes < 0.65 * plain.memory_bytes
    assert nested.memory_bytes < low.memory_bytes - 2 * gb
    assert nested.seconds_per_iteration > low.seconds_per_iteration  # the price: one more partial forward pass


def test_plan_keeps_fewer_states_and_prefers_the_cheaper_of_equal_plans():
    # five segments, each outputting one new 1-byte state: plain checkpointing keeps 5; pairs keep 3 + 1 inner
    prof = {"out": [1] * 5, "saved": [1] * 5, "flops": [5, 1, 1, 1, 1], "kept": [[1] * 5 for _ in range(6)]}
    units = revolve.plan(prof)
    assert revolve.boundary_bytes(prof, revolve.flat_plan(5)) == 5 and revolve.boundary_bytes(prof, units) == 4
    # (0,1),(2,3),(4,4) and (0,0),(1,2),(3,4) both keep 4; the second recomputes 2 FLOPs instead of 6
    assert units == [(0, 0), (1, 2), (3, 4)] and revolve.extra_flops(prof, units) == 2


# ---- accelerate: modes, fallbacks, captured and compiled steps ----

def test_auto_is_cuda_graphs_on_cuda_and_off_elsewhere():
    assert acceleration.resolve("auto", "cpu") == "off"
    assert acceleration.resolve("auto", "cuda") == "cuda-graphs"
    assert acceleration.resolve("compile", "cpu") == "compile"
    with pytest.raises(ValueError):
        acceleration.resolve("fast", "cpu")


def test_cuda_graphs_on_the_cpu_warn_once_and_run_eagerly(prior):
    warnings = []
    want = _chain_grads(LatentGenerator(prior))
    gen = LatentGenerator(prior, accelerate="cuda-graphs", warn=warnings.append)
    got = _chain_grads(gen)
    _chain_grads(gen)
    assert len(warnings) == 1 and "needs a CUDA GPU" in warnings[0] and "cpu" in warnings[0]
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_a_failed_capture_warns_and_falls_back():
    warnings = []
    x, t = torch.zeros(1, 2, 3, 3, 3), torch.tensor([5])
    runner = acceleration.build("cuda-graphs", lambda x, t, c: x * 2, x, t, None, t, False, warnings.append)
    assert runner is None and "could not be set up" in warnings[0] and "CUDA" in warnings[0]


def _emulated(monkeypatch, step_class=acceleration.EmulatedGraphStep):
    """accelerate=cuda-graphs on the CPU, with the graphs' buffer semantics emulated."""
    monkeypatch.setattr(acceleration, "resolve", lambda mode, device, warn=None: mode)
    monkeypatch.setattr(acceleration, "CudaGraphStep", step_class)


def test_replayed_steps_equal_eager_ones(prior, monkeypatch):
    _emulated(monkeypatch)
    warnings = []
    want = _chain_grads(LatentGenerator(prior), steps=4)
    gen = LatentGenerator(prior, accelerate="cuda-graphs", warn=warnings.append)
    got = _chain_grads(gen, steps=4)
    assert not warnings
    assert any(isinstance(r, acceleration.ReplayedStep) for r in gen._steps.values())
    for a, b in zip(got, want):
        assert_same_to_float32_rounding(a, b)
    again = _chain_grads(gen, steps=4)  # the same captured step serves the next iteration
    for a, b in zip(again, want):
        assert_same_to_float32_rounding(a, b)


def test_replaying_backward_without_recomputing_gives_wrong_gradients(prior, monkeypatch):
    """Why `Replay` recomputes: every forward replay overwrites the static activations, so without it each
    step's backward would read the last step's activations."""
    class NoRecompute(acceleration.EmulatedGraphStep):
        recompute_in_backward = False

    _emulated(monkeypatch, NoRecompute)
    _, gz_want, _ = _chain_grads(LatentGenerator(prior), steps=3)
    gen = LatentGenerator(prior, accelerate="cuda-graphs")
    # the capture check uses one step only, so it passes; the chain of three is wrong
    _, gz, _ = _chain_grads(gen, steps=3)
    assert float((gz - gz_want).abs().max()) > 1e-3 * float(gz_want.abs().max())


def test_channels_last_changes_nothing_but_the_layout():
    prior = synthetic.random_prior(synthetic.tiny_card(), seed=0)  # converted in place: not the shared fixture
    want = _chain_grads(LatentGenerator(synthetic.random_prior(synthetic.tiny_card(), seed=0)))
    got = _chain_grads(LatentGenerator(prior, channels_last=True))
    conv = next(m for m in prior.autoencoder.modules() if isinstance(m, torch.nn.Conv3d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
    for a, b in zip(got, want):
        assert_same_to_float32_rounding(a, b)


class _SmallEps(torch.nn.Module):
    """A stand-in UNet, (x, t, context) -> eps, small enough for inductor to compile in seconds."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv = torch.nn.Conv3d(c_in, c_out, 3, padding=1)
        self.ctx = torch.nn.Linear(4, c_out)
        self.requires_grad_(False)

    def forward(self, x, timesteps, context=None):
        h = self.conv(torch.nn.functional.silu(x)) * torch.cos(timesteps.float() / 100.0).view(-1, 1, 1, 1, 1)
        return h + self.ctx(context[:, 0]).view(1, -1, 1, 1, 1)


def test_compiled_steps_equal_eager_ones(monkeypatch):
    """torch.compile (inductor, on the CPU) inside the checkpointed chain: same loss and gradients, one compilation
    for every timestep (t is a tensor input). The real UNet: test_compiled_tiny_ldm_equals_eager (slow)."""
    def gen_with_small_unet(accelerate, warn=None):
        gen = LatentGenerator(synthetic.random_prior(synthetic.tiny_card(), seed=0), accelerate=accelerate, warn=warn)
        torch.manual_seed(0)
        gen.unet = _SmallEps(7, 3)
        return gen

    warnings = []
    want = _chain_grads(gen_with_small_unet("off"), steps=3)
    gen = gen_with_small_unet("compile", warnings.append)
    got = _chain_grads(gen, steps=3)
    assert not warnings
    assert any(isinstance(r, acceleration.CompiledStep) for r in gen._steps.values())
    for a, b in zip(got, want):
        assert_same_to_float32_rounding(a, b)


@pytest.mark.slow
def test_compiled_tiny_ldm_equals_eager(prior):
    """The MONAI UNet of the tiny LDM prior through torch.compile (minutes on 2 CPU cores: tracing MONAI's UNet)."""
    warnings = []
    want = _chain_grads(LatentGenerator(prior), steps=2)
    got = _chain_grads(LatentGenerator(prior, accelerate="compile", warn=warnings.append), steps=2)
    assert not warnings
    for a, b in zip(got, want):
        assert_same_to_float32_rounding(a, b)


# ---- on a GPU (pytest -m gpu) ----

def _bf16_close(a, b):
    assert float((a - b).abs().max()) <= 5e-2 * max(float(b.abs().max()), 1e-6)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("mode", ["cuda-graphs", "compile"])
def test_accelerated_chain_equals_eager_on_cuda(mode):
    prior = synthetic.random_prior(synthetic.tiny_card(), seed=0, device="cuda")
    warnings = []
    want = _chain_grads(LatentGenerator(prior), steps=4, device="cuda")
    gen = LatentGenerator(prior, accelerate=mode, warn=warnings.append)
    got = _chain_grads(gen, steps=4, device="cuda")
    assert not warnings, warnings
    assert any(r is not None for r in gen._steps.values())
    for a, b in zip(got, want):
        _bf16_close(a, b)


@pytest.mark.gpu
@needs_cuda
def test_nested_checkpointing_and_channels_last_on_cuda():
    prior = synthetic.random_prior(synthetic.tiny_card(image=(32, 32, 32), channels=(8, 16, 16)), seed=0,
                                   device="cuda")
    want = _chain_grads(LatentGenerator(prior), steps=2, device="cuda")
    got = _chain_grads(LatentGenerator(prior, nested_checkpointing=True, channels_last=True,
                                       accelerate="cuda-graphs"), steps=2, device="cuda")
    for a, b in zip(got, want):
        _bf16_close(a, b)


@pytest.mark.gpu
@needs_cuda
def test_profile_rows_per_accelerate_mode_on_cuda():
    from MRISuperResLib.bench import profile

    for mode in ("off", "cuda-graphs"):
        row = profile.profile("inversesr-ldm", "cuda", shape=(16, 16, 16), iterations=3, card=synthetic.tiny_card(),
                              ddim_steps=4, settings={"accelerate": mode})
        assert row["seconds_per_iteration"] > 0 and not row["warnings"], row["warnings"]
