"""The CPU greedy argmax (sampling.cpp) gives torch.argmax's indices exactly, ties and NaN
included; the fused silu(gate) * up (activation.cpp) matches the torch ops."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine_worker.engine.models.layers import layer_ops_for
from jetserve_kernels.cpu.ops import greedy_argmax_cpu, silu_and_mul_cpu, silu_and_mul_ref


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 9),
    vocab=st.integers(1, 300),
    levels=st.integers(1, 5),  # few distinct values: many ties for the maximum
    nan_at=st.one_of(st.none(), st.integers(0, 299)),
    seed=st.integers(0, 2**16),
)
def test_argmax_equals_torch(
    rows: int, vocab: int, levels: int, nan_at: int | None, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randint(0, levels, (rows, vocab), generator=g).float() - 2.0
    if nan_at is not None:
        logits[0, nan_at % vocab] = float("nan")
    assert torch.equal(greedy_argmax_cpu(logits), logits.argmax(dim=-1))


def test_argmax_edge_rows() -> None:
    inf = float("inf")
    logits = torch.tensor([[-inf, -inf, -inf], [1.0, inf, inf], [-0.0, 0.0, -1.0]])
    assert torch.equal(greedy_argmax_cpu(logits), logits.argmax(dim=-1))
    big = torch.randn(64, 32000)
    strided = torch.randn(64, 32010)[:, :32000]
    for x in (big, strided):
        assert torch.equal(greedy_argmax_cpu(x), x.argmax(dim=-1))
    half = big.to(torch.bfloat16)  # other dtypes go to torch
    assert torch.equal(greedy_argmax_cpu(half), half.argmax(dim=-1))


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 20),
    inter=st.integers(1, 200),
    spread=st.sampled_from([1.0, 10.0, 200.0]),  # large |gate| reaches exp's clamp
    seed=st.integers(0, 2**16),
)
def test_silu_and_mul_matches_torch(rows: int, inter: int, spread: float, seed: int) -> None:
    gate_up = torch.randn(rows, 2 * inter, generator=torch.Generator().manual_seed(seed)) * spread
    out = silu_and_mul_cpu(gate_up)
    assert out.shape == (rows, inter)
    # the polynomial exp is within a few ulp of torch's (3e-6 relative seen), as far as two
    # fp32 matmuls' reduction orders differ
    torch.testing.assert_close(out, silu_and_mul_ref(gate_up), rtol=1e-5, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 20),
    inter=st.integers(1, 200),
    spread=st.sampled_from([1.0, 10.0, 200.0]),
    seed=st.integers(0, 2**16),
)
def test_silu_and_mul_bf16_rounds_as_torch(rows: int, inter: int, spread: float, seed: int) -> None:
    """bf16: the reference's silu rounded to bf16, times up rounded again. The exp
    polynomial can land silu on the other side of a rounding edge, so an element may be
    one bf16 step off; almost all are equal."""
    g = torch.Generator().manual_seed(seed)
    gate_up = (torch.randn(rows, 2 * inter, generator=g) * spread).to(torch.bfloat16)
    out = silu_and_mul_cpu(gate_up)
    ref = silu_and_mul_ref(gate_up)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, inter)
    # one bf16 step off in silu, times up and rounded again: at most two steps of the output
    torch.testing.assert_close(out.float(), ref.float(), rtol=2**-6, atol=1e-6)
    # where exp(-gate) overflows torch's silu is -0.0, the clamped polynomial's ~1e-34
    tiny = (out.float().abs() < 1e-30) & (ref.float().abs() < 1e-30)
    assert ((out == ref) | tiny).float().mean() >= 0.98


def test_silu_and_mul_shapes_and_fallbacks() -> None:
    gate_up = torch.randn(2, 3, 64)
    torch.testing.assert_close(silu_and_mul_cpu(gate_up), silu_and_mul_ref(gate_up))
    wide = torch.randn(4, 80)[:, :64]  # rows not contiguous with each other
    torch.testing.assert_close(silu_and_mul_cpu(wide), silu_and_mul_ref(wide))
    grad = torch.randn(3, 8, requires_grad=True)
    silu_and_mul_cpu(grad).sum().backward()
    assert grad.grad is not None
    ops = layer_ops_for("cpu")
    assert ops.silu_and_mul is silu_and_mul_cpu and ops.argmax is greedy_argmax_cpu
    assert layer_ops_for("torch").silu_and_mul is silu_and_mul_ref
