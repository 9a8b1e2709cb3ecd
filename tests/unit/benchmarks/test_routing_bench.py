"""The routing benchmark's scheduled arrivals: the same instants in every arm, and with
jitter no fixed user order within a burst (which a shared queue turns into stickiness);
its two kinds of worker."""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import pytest

from benchmarks.routing_bench import engine_args, model_info, parse_args, send_offsets


def schedule(**kw: float) -> argparse.Namespace:
    base = dict(users=24, turns=6, stagger_ms=20.0, think_s=8.0, think_jitter=0.0, seed=0)
    return argparse.Namespace(**{**base, **kw})


def test_without_jitter_turn_k_of_user_u_is_due_at_u_stagger_plus_k_think() -> None:
    offsets = send_offsets(schedule())
    for u, row in enumerate(offsets):
        assert row == pytest.approx([u * 0.02 + k * 8.0 for k in range(6)])


def test_jittered_think_times_repeat_stay_in_range_and_mix_the_order() -> None:
    args = schedule(think_jitter=0.5)
    offsets = send_offsets(args)
    assert offsets == send_offsets(args)  # seeded: every arm gets these arrivals
    for u, row in enumerate(offsets):
        assert row[0] == pytest.approx(u * 0.02)
        assert all(4.0 <= b - a <= 12.0 for a, b in itertools.pairwise(row))
    in_order = list(range(args.users))
    later_bursts = [sorted(in_order, key=lambda u: offsets[u][t]) for t in range(1, args.turns)]
    assert all(order != in_order for order in later_bursts)
    assert send_offsets(schedule(think_jitter=0.5, seed=1)) != offsets


def test_cpu_workers_run_the_engine_on_weights_and_simulated_ones_the_device() -> None:
    cpu = parse_args(["--engine", "cpu", "--engine-threads", "2"])
    assert engine_args(cpu) == ["--engine-threads", "2"]
    sim = parse_args([])
    assert engine_args(sim) == ["--load-format", "simulated", "--simulate-profile", sim.profile]


def test_model_info_counts_the_checkpoints_parameters(tiny_llama: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    info = model_info(str(tiny_llama))
    assert info["name"] == tiny_llama.name
    assert info["params"] == sum(p.numel() for p in model.parameters())
