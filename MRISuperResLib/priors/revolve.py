"""Nested ("revolve") checkpointing of a chain of segments, and the memory model that chooses its groups.

Notation: segments s_0 .. s_{n-1} (generator.decoder_segments), state_b the tuple of tensors after s_b; per segment,
measured on the meta device: S_b bytes s_b saves for backward, O_b bytes of the new tensors it outputs, F_b its
forward FLOPs. A plan cuts the chain into units; a unit is one segment or a group of consecutive segments.

Plain per-segment checkpointing keeps every state_b from the forward pass until the backward pass reaches it:
    peak ~ sum_b O_b + max_b S_b + 2 max_b O_b                (budget.py)
Nested checkpointing keeps only the units' outputs. When the backward pass reaches a group, the group is recomputed
with each of its segments but the last checkpointed again, so its inner states exist only during that group's
backward pass:
    peak ~ sum_units K_u + max_groups I_g + max_b S_b + 2 max_b O_b
with K_u the bytes of the unit's output state not kept already, I_g = sum of O_b over the group's segments but its
last. Gradients are those of plain checkpointing exactly: the same functions run on the same inputs, only more often.
The price is one more forward pass of each group's inner segments: extra = sum_g sum_{inner b} F_b.

1. profile(segments, state, params): S_b, O_b, F_b and the pairwise kept bytes, on meta tensors.
2. plan(profile): for each bound B on I_g, the units minimising sum K_u (dynamic programming over cut points);
   keep the B with the lowest sum K_u + B, preferring the fewest recomputed FLOPs among plans within 2% of it.
3. units(segments, plan, checkpoint): one callable per unit; a group checkpoints its inner segments.
"""

from typing import Callable, Dict, List, Sequence, Tuple

import torch

TIE = 0.02  # plans whose boundary memory is within 2% of the best count as equal; then fewer recomputed FLOPs win


def meta_pass(fn, params) -> Tuple[int, object, int]:
    """(bytes saved for backward excluding `params`, output, forward FLOPs) of fn() on meta tensors."""
    from torch.utils.flop_counter import FlopCounterMode

    skip = {id(p) for p in params}
    saved = [0]

    def pack(t):
        if id(t) not in skip:
            saved[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), FlopCounterMode(display=False) as fc:
        out = fn()
    return saved[0], out, fc.get_total_flops()


def _bytes(ts) -> int:
    return sum(t.numel() * 4 for t in ts)  # fp32 bytes; budget.py scales for bf16


def profile(segments: Sequence[Callable], state: tuple, params) -> Dict[str, list]:
    """Per segment: "saved" S_b, "out" O_b (new tensors, fp32 bytes), "flops" F_b; "kept"[a + 1][b]: bytes of
    state_b not in state_a (a = -1: the chain's input)."""
    saved, outs, flops, states = [], [], [], [state]
    for seg in segments:
        s, out, f = meta_pass(lambda g=seg, st=states[-1]: g(*st), params)
        out = out if isinstance(out, tuple) else (out,)
        known = {id(t) for t in states[-1]}
        saved.append(s)
        outs.append(_bytes(t for t in out if id(t) not in known))
        flops.append(f)
        states.append(out)
    n = len(segments)
    kept = [[0] * n for _ in range(n + 1)]
    for a in range(-1, n):
        before = {id(t) for t in states[a + 1]}
        for b in range(a + 1, n):
            kept[a + 1][b] = _bytes(t for t in states[b + 1] if id(t) not in before)
    return {"saved": saved, "out": outs, "flops": flops, "kept": kept}


def flat_plan(n: int) -> List[Tuple[int, int]]:
    """Every segment its own unit: [(b, b)]."""
    return [(b, b) for b in range(n)]


def plan(prof: Dict[str, list]) -> List[Tuple[int, int]]:
    """Units [(first, last)] covering the chain (step 2 of the module docstring)."""
    outs, flops, kept = prof["out"], prof["flops"], prof["kept"]
    n = len(outs)

    cum_o, cum_f = [0], [0]
    for o, f in zip(outs, flops):
        cum_o.append(cum_o[-1] + o)
        cum_f.append(cum_f[-1] + f)

    def inner(a, b):  # unit a+1 .. b: its segments but the last
        return cum_o[b] - cum_o[a + 1] if b > a + 1 else 0

    def extra(a, b):
        return cum_f[b] - cum_f[a + 1] if b > a + 1 else 0

    bounds = sorted({inner(a, b) for a in range(-1, n) for b in range(a + 1, n)})
    candidates = []
    for bound in bounds:
        # best[b + 1] = (kept bytes, recomputed FLOPs, cut) of the best plan of segments 0..b
        best = [(0, 0, None)] + [None] * n
        for b in range(n):
            for a in range(-1, b):
                if best[a + 1] is None or inner(a, b) > bound:
                    continue
                k, f, _ = best[a + 1]
                cand = (k + kept[a + 1][b], f + extra(a, b), a)
                if best[b + 1] is None or cand[:2] < best[b + 1][:2]:
                    best[b + 1] = cand
        units, b = [], n - 1
        while b >= 0:
            a = best[b + 1][2]
            units.append((a + 1, b))
            b = a
        units.reverse()
        total = best[n][0] + max(inner(u0 - 1, u1) for u0, u1 in units)
        candidates.append((total, best[n][1], units))
    lowest = min(c[0] for c in candidates)
    return min((c for c in candidates if c[0] <= lowest * (1 + TIE)), key=lambda c: (c[1], c[0]))[2]


def boundary_bytes(prof: Dict[str, list], units: Sequence[Tuple[int, int]]) -> float:
    """sum_units K_u + max_groups I_g (fp32 bytes) of a plan."""
    outs, kept = prof["out"], prof["kept"]
    return float(sum(kept[u0][u1] for u0, u1 in units) + max(sum(outs[u0:u1]) for u0, u1 in units))


def extra_flops(prof: Dict[str, list], units: Sequence[Tuple[int, int]]) -> float:
    """Forward FLOPs the plan recomputes on top of plain checkpointing."""
    return float(sum(sum(prof["flops"][u0:u1]) for u0, u1 in units))


def units(segments: Sequence[Callable], plan_: Sequence[Tuple[int, int]], checkpoint: Callable) -> List[Callable]:
    """One callable per unit (step 3); `checkpoint(fn, *args)` checkpoints a group's inner segments."""
    out = []
    for u0, u1 in plan_:
        if u0 == u1:
            out.append(segments[u0])
            continue

        def group(*state, segs=tuple(segments[u0:u1 + 1])):
            for i, seg in enumerate(segs):
                # the last segment's backward runs right after the group's recomputation: nothing to save by
                # checkpointing it again
                state = seg(*state) if i == len(segs) - 1 else checkpoint(seg, *state)
                state = state if isinstance(state, tuple) else (state,)
            return state if len(state) > 1 else state[0]

        out.append(group)
    return out
