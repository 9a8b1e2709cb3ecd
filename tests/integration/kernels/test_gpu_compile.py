"""Every kernel variant a GPU launch uses compiles to a CUDA binary, without a GPU.

The interpreter accepts code the GPU compiler rejects (dot shapes, layouts, types), so
this compiles the Llama-3-8B-shaped launches ahead of time for sm_90 and sm_80 with
Triton's own compiler and ptxas. It needs a process where TRITON_INTERPRET=0.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

COMPILE_ALL = textwrap.dedent(
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from jetserve_kernels import kv_cache_write, paged_attention, rms_norm, rotary

    # Runtime ints and pointers the JIT would see as multiples of 16 (as in real launches).
    NOT_ALIGNED = {"seq_offset", "stride_bt", "num_partitions", "eps", "scale_log2e"}

    def build(kernel, types, constants, arch, num_warps=4):
        fn = triton.runtime.jit.JITFunction(kernel.fn)
        sig = {}
        for name in fn.arg_names:
            sig[name] = "constexpr" if name in constants else types.get(name, "i32")
        attrs = {
            (i,): [["tt.divisibility", 16]]
            for i, name in enumerate(fn.arg_names)
            if sig[name].startswith("*") or (sig[name] == "i32" and name not in NOT_ALIGNED)
        }
        src = ASTSource(fn=fn, signature=sig, constexprs=constants, attrs=attrs)
        compiled = triton.compile(
            src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps}
        )
        assert compiled.asm["cubin"], kernel.fn.__name__
        print(kernel.fn.__name__, arch, constants, "ok", flush=True)

    def attention_types(dt):
        types = {n: "*" + dt for n in ("q_ptr", "k_cache_ptr", "v_cache_ptr", "out_ptr")}
        types.update(
            part_acc_ptr="*fp32", part_max_ptr="*fp32", part_sum_ptr="*fp32",
            query_start_loc_ptr="*i32", seq_lens_ptr="*i32", block_tables_ptr="*i32",
            scale_log2e="fp32",
        )
        return types

    for arch in (90, 80):
        for dt, precision in (("bf16", "tf32"), ("fp32", "ieee")):
            # Llama-3-8B: 32 q heads over 8 kv heads (group 4), head dim 128
            for split, block_q, warps in ((True, 4, 4), (False, 4, 4), (False, 16, 8)):
                if dt == "fp32" and block_q == 16:
                    continue  # fp32 is a test dtype; its prefill tile is the slowest to build
                build(
                    paged_attention._paged_attention_kernel,
                    attention_types(dt),
                    dict(GROUP=4, GROUP_P2=4, BLOCK_Q=block_q, BLOCK_N=64, BLOCK_D=128,
                         SPLIT=split, UPCAST=False, DOT_PRECISION=precision),
                    arch,
                    warps,
                )
        # multi-head attention with head dim 64, a group of 7 (Qwen2-0.5B), prefill tiles
        for group, group_p2, block_q in ((1, 1, 64), (7, 8, 8)):
            build(
                paged_attention._paged_attention_kernel,
                attention_types("fp16"),
                dict(GROUP=group, GROUP_P2=group_p2, BLOCK_Q=block_q, BLOCK_N=64, BLOCK_D=64,
                     SPLIT=False, UPCAST=False, DOT_PRECISION="tf32"),
                arch,
                8,
            )
        build(
            paged_attention._reduce_partitions_kernel,
            {"out_ptr": "*bf16", "part_acc_ptr": "*fp32", "part_max_ptr": "*fp32",
             "part_sum_ptr": "*fp32", "query_start_loc_ptr": "*i32", "seq_lens_ptr": "*i32"},
            dict(BLOCK_P=32, BLOCK_D=128),
            arch,
        )
        norm_types = {n: "*bf16" for n in ("x_ptr", "residual_ptr", "weight_ptr", "out_ptr",
                                           "residual_out_ptr")}
        norm_types["eps"] = "fp32"
        build(rms_norm._rms_norm_kernel, norm_types, dict(HAS_RESIDUAL=True, BLOCK=4096), arch, 8)
        build(rms_norm._rms_norm_kernel, norm_types, dict(HAS_RESIDUAL=False, BLOCK=128), arch, 1)
        build(
            rotary._rotary_kernel,
            {"positions_ptr": "*i64", "q_ptr": "*bf16", "k_ptr": "*bf16", "cos_sin_ptr": "*fp32",
             "q_out_ptr": "*bf16", "k_out_ptr": "*bf16"},
            dict(BLOCK_HQ=32, BLOCK_HK=8, BLOCK_HALF=64),
            arch,
        )
        build(
            kv_cache_write._write_kv_cache_kernel,
            {"key_ptr": "*bf16", "value_ptr": "*bf16", "k_cache_ptr": "*bf16",
             "v_cache_ptr": "*bf16", "slot_mapping_ptr": "*i64"},
            dict(BLOCK_H=8, BLOCK_D=128),
            arch,
        )
    """
)


def test_kernels_compile_for_sm90_and_sm80() -> None:
    pytest.importorskip("triton.backends.nvidia")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run(
        [sys.executable, "-c", COMPILE_ALL], capture_output=True, text=True, timeout=600, env=env
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count(" ok") == 2 * 12, done.stdout  # 12 variants per arch
