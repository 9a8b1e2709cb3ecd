"""jetserve against llama.cpp (the engine inside Ollama) on the same weights, same machine,
2 threads each, measured side by side in one run (arms interleaved round by round).

The issue-16 model (random Llama, hidden 512, 8 layers, GQA 8/2, vocab 32000, fp32) is
saved as a Hugging Face checkpoint, converted to GGUF F32/F16/Q8_0 with
benchmarks/gguf_export.py, and run through llama-cpp-python (`pip install -e .[bench]`):
- batch-1 decode: a 64-token prompt, 128 new tokens, greedy; medians of 3 rounds, each
  round with fresh prompts (no prefix-cache hits). Decode tok/s counts the 127 tokens
  after the first (the first comes out of the prefill); end-to-end tok/s counts all 128
  over prefill + decode.
- 64 concurrent: 64 prompts of 64 tokens, 64 new tokens each; jetserve's engine with
  64 running sequences vs llama.cpp's batched API (one llama_decode per step over all 64
  sequences, as its `batched` example and server do). Output tok/s.
Greedy tokens of llama.cpp F32 are checked against jetserve on the first prompt and the
agreement recorded. jetserve int8 runs too when the engine has `--quantization int8`, and
jetserve bf16 (`--dtype bfloat16`) against llama.cpp F16, the other 16-bit weights (on a
CPU with AMX, bf16 matmuls run on its tiles).

    python benchmarks/llamacpp_bench.py          # benchmarks/results/llamacpp.{json,png}
    python benchmarks/llamacpp_bench.py --quick  # tiny model, seconds
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.gguf_export import write_gguf
from benchmarks.issue16_model import make_model
from engine_worker.engine.config import EngineConfig, cpu_has_amx
from engine_worker.engine.llm_engine import LLMEngine
from shared.sampling_params import SamplingParams
from shared.settings.engine import EngineSettings

RESULTS = Path(__file__).parent / "results"
THREADS = 2
GGML_LOG_LEVEL_ERROR = 4  # ggml.h: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5


# -- llama.cpp, through llama-cpp-python's C API bindings --------------------------------
_QUIET: list = []  # keeps the no-op log callback alive while llama.cpp holds it


def _silence_llama_cpp() -> None:
    """llama.cpp logs every model load and graph at length to stderr; keep errors only."""
    import llama_cpp as lc

    if _QUIET:
        return

    @lc.llama_log_callback
    def quiet(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        if level == GGML_LOG_LEVEL_ERROR:
            sys.stderr.write(text.decode(errors="replace"))

    _QUIET.append(quiet)
    lc.llama_log_set(quiet, ctypes.c_void_p())


EXTRA_BUFFERS_OFF = cpu_has_amx()


@dataclass
class LlamaCpp:
    """One GGUF model and a context with room for `n_seqs` sequences of `seq_len`."""

    model: object
    ctx: object
    n_vocab: int
    n_seqs: int

    @classmethod
    def load(cls, path: Path, n_seqs: int, seq_len: int) -> LlamaCpp:
        import llama_cpp as lc

        _silence_llama_cpp()
        lc.llama_backend_init()
        mparams = lc.llama_model_default_params()
        # llama.cpp 0.3.36 built for an AMX CPU segfaults in llama_decode with its extra
        # (repacked / AMX) weight buffers; plain buffers run. Off only there, and recorded.
        mparams.use_extra_bufts = not EXTRA_BUFFERS_OFF
        model = lc.llama_model_load_from_file(str(path).encode(), mparams)
        if not model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        cparams = lc.llama_context_default_params()
        cparams.n_ctx = n_seqs * seq_len
        cparams.n_batch = max(512, n_seqs)
        cparams.n_ubatch = max(512, n_seqs)
        cparams.n_seq_max = n_seqs
        cparams.n_threads = THREADS
        cparams.n_threads_batch = THREADS
        ctx = lc.llama_init_from_model(model, cparams)
        if not ctx:
            raise RuntimeError("llama.cpp could not create a context")
        n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model))
        return cls(model, ctx, n_vocab, n_seqs)

    def clear(self) -> None:
        import llama_cpp as lc

        lc.llama_memory_clear(lc.llama_get_memory(self.ctx), True)

    def _decode(self, rows: list[tuple[int, int, int, bool]]) -> list[int]:
        """One llama_decode of (token, position, sequence, wants logits) rows, in chunks of
        n_batch; the greedy next token of each row that wanted logits, in order."""
        import llama_cpp as lc

        n_batch = max(512, self.n_seqs)
        picked: list[int] = []
        for start in range(0, len(rows), n_batch):
            chunk = rows[start : start + n_batch]
            batch = lc.llama_batch_init(len(chunk), 0, 1)
            try:
                batch.n_tokens = len(chunk)
                want: list[int] = []
                for i, (tok, pos, seq, logits) in enumerate(chunk):
                    batch.token[i] = tok
                    batch.pos[i] = pos
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = seq
                    batch.logits[i] = logits
                    if logits:
                        want.append(i)
                if lc.llama_decode(self.ctx, batch) != 0:
                    raise RuntimeError("llama_decode failed")
                for i in want:
                    ptr = lc.llama_get_logits_ith(self.ctx, i)
                    row = np.ctypeslib.as_array(
                        ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(self.n_vocab,)
                    )
                    picked.append(int(row.argmax()))
            finally:
                lc.llama_batch_free(batch)
        return picked

    def generate(self, prompts: list[list[int]], new: int) -> tuple[list[list[int]], float, float]:
        """Greedy; (tokens per prompt, prefill seconds, decode seconds)."""
        self.clear()
        t0 = time.perf_counter()
        rows = [
            (tok, pos, seq, pos == len(p) - 1)
            for seq, p in enumerate(prompts)
            for pos, tok in enumerate(p)
        ]
        last = self._decode(rows)
        t1 = time.perf_counter()
        out = [[t] for t in last]
        for step in range(new - 1):
            rows = [(out[s][-1], len(p) + step, s, True) for s, p in enumerate(prompts)]
            for s, tok in enumerate(self._decode(rows)):
                out[s].append(tok)
        return out, t1 - t0, time.perf_counter() - t1


# -- jetserve ----------------------------------------------------------------------------
def jetserve_engine(path: Path, n_seqs: int, extra: dict) -> LLMEngine:
    """`extra`: the variant's engine settings (a quantization, a dtype)."""
    return LLMEngine(
        EngineConfig(
            model=str(path),
            max_num_seqs=n_seqs,
            max_num_batched_tokens=max(2048, 64 * n_seqs),
            kv_cache_memory=1 << 29,
            **extra,
        )
    )


def jetserve_generate(
    engine: LLMEngine, prompts: list[list[int]], new: int
) -> tuple[list[list[int]], float, float]:
    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{time.monotonic_ns()}-{i}", p, params)
    out: dict[str, list[int]] = {}
    order: list[str] = list(engine.requests)
    t0 = time.perf_counter()
    first_done = None
    while engine.has_unfinished_requests():
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(t for d in o.deltas for t in d.token_ids)
        if first_done is None and len(out) == len(prompts):
            first_done = time.perf_counter()  # every prompt prefilled, first tokens out
    end = time.perf_counter()
    first_done = first_done or end
    return [out[r] for r in order], first_done - t0, end - first_done


# -- the run -----------------------------------------------------------------------------
def rates(new: int, n: int, prefill_s: float, decode_s: float) -> dict:
    return {
        "prefill_s": round(prefill_s, 4),
        "decode_s": round(decode_s, 4),
        "decode_tok_per_s": round(n * (new - 1) / decode_s, 2) if decode_s else None,
        "e2e_tok_per_s": round(n * new / (prefill_s + decode_s), 2),
    }


def median_of(rows: list[dict]) -> dict:
    keys = ("decode_tok_per_s", "e2e_tok_per_s", "prefill_s", "decode_s")
    return {k: statistics.median(r[k] for r in rows) for k in keys} | {"rounds": rows}


def first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def bars(ax, rows: dict, key: str) -> None:
        """One bar per engine (llama.cpp's grey), its value on top."""
        names = list(rows)
        vals = [rows[n][key] for n in names]
        colors = ["tab:gray" if n.startswith("llama.cpp") else "tab:blue" for n in names]
        ax.bar(names, vals, color=colors)
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.0f}", ha="center", va="bottom", fontsize=8)
        ax.tick_params(axis="x", rotation=25)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.4))
    bars(ax1, results["batch1"], "decode_tok_per_s")
    ax1.set_ylabel("decode tokens/s (median of rounds)")
    wl = results["workload"]["batch1"]
    ax1.set_title(
        f"batch 1: {wl['prompt_tokens']}-token prompt, {wl['new_tokens']} new", fontsize=9
    )
    bars(ax2, results["concurrent"], "e2e_tok_per_s")
    wl2 = results["workload"]["concurrent"]
    ax2.set_ylabel("output tokens/s (median of rounds)")
    ax2.set_title(
        f"{wl2['requests']} concurrent: {wl2['prompt_tokens']}-token prompts, "
        f"{wl2['new_tokens']} new each",
        fontsize=9,
    )
    fig.suptitle(
        f"{results['model']['params_millions']}M-param Llama, {results['machine']}, "
        f"{THREADS} threads each; shared machine, load {results['load_average']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS / "llamacpp.json")
    args = ap.parse_args()
    torch.set_num_threads(THREADS)
    prompt_len, new1, n_conc, new_conc = (8, 8, 4, 4) if args.quick else (64, 128, 64, 64)
    # jetserve's variants: fp32 (the reference), int8 weights, and bf16 (weights,
    # activations and KV cache; against llama.cpp F16, the other 16-bit weights)
    variants: dict[str, dict] = {"fp32": {}}
    if "quantization" in EngineSettings.model_fields:
        variants["int8"] = {"quantization": "int8"}
    variants["bf16"] = {"dtype": "bfloat16"}
    rng = random.Random(0)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "issue16-llama"
        info = make_model(ckpt, quick=args.quick)
        vocab = info["vocab_size"]

        def prompts(n: int) -> list[list[int]]:
            return [[rng.randrange(3, vocab) for _ in range(prompt_len)] for _ in range(n)]

        ggufs = {
            t: write_gguf(ckpt, Path(tmp) / f"model-{t}.gguf", t) for t in ("f32", "f16", "q8_0")
        }
        seq_len = prompt_len + max(new1, new_conc) + 16
        cpp1 = {t: LlamaCpp.load(p, 1, seq_len) for t, p in ggufs.items()}
        cpp64 = {t: LlamaCpp.load(ggufs[t], n_conc, seq_len) for t in ("f32", "f16", "q8_0")}
        js1 = {v: jetserve_engine(ckpt, 1, kw) for v, kw in variants.items()}
        js64 = {v: jetserve_engine(ckpt, n_conc, kw) for v, kw in variants.items()}

        def js_name(v: str) -> str:
            return f"jetserve {v}"

        # Warm-up (kernels built, pages touched) and the greedy check, on one prompt.
        check = prompts(1)
        ref = jetserve_generate(js1["fp32"], check, new1)[0][0]
        agreement = {}
        for t, m in cpp1.items():
            got = m.generate(check, new1)[0][0]
            agreement[f"llama.cpp {t.upper()}"] = {
                "first_divergence": first_divergence(ref, got),
                "same_tokens": sum(a == b for a, b in zip(ref, got, strict=True)),
                "of": len(ref),
            }
        for q in list(variants)[1:]:
            got = jetserve_generate(js1[q], check, new1)[0][0]
            agreement[js_name(q)] = {
                "first_divergence": first_divergence(ref, got),
                "same_tokens": sum(a == b for a, b in zip(ref, got, strict=True)),
                "of": len(ref),
            }
        for m in cpp64.values():
            m.generate(prompts(2), 2)
        for e in js64.values():
            jetserve_generate(e, prompts(2), 2)
        print("greedy agreement with jetserve fp32:", json.dumps(agreement), flush=True)

        batch1: dict[str, list[dict]] = {}
        conc: dict[str, list[dict]] = {}

        def report(rounds_done: int) -> dict:
            """Medians over the rounds so far, written out (a cut-short run still leaves them)."""
            b1 = {k: median_of(v) for k, v in batch1.items()}
            cc = {k: median_of(v) for k, v in conc.items()}

            def ratio(a: dict, b: dict, key: str) -> float:
                return round(a[key] / b[key], 3)

            goals = {
                "batch1 fp32 / llama.cpp F32 (goal >= 0.9)": ratio(
                    b1["jetserve fp32"], b1["llama.cpp F32"], "decode_tok_per_s"
                ),
                "64 concurrent fp32 / llama.cpp batched F32 (goal >= 1.5)": ratio(
                    cc["jetserve fp32"], cc["llama.cpp batched F32"], "e2e_tok_per_s"
                ),
            }
            if "jetserve int8" in b1:
                goals["batch1 int8 / llama.cpp F16 (goal >= 1.0)"] = ratio(
                    b1["jetserve int8"], b1["llama.cpp F16"], "decode_tok_per_s"
                )
                goals["batch1 int8 / llama.cpp Q8_0 (how far)"] = ratio(
                    b1["jetserve int8"], b1["llama.cpp Q8_0"], "decode_tok_per_s"
                )
            goals["batch1 bf16 / llama.cpp F16 (16-bit weights both)"] = ratio(
                b1["jetserve bf16"], b1["llama.cpp F16"], "decode_tok_per_s"
            )
            goals["64 concurrent bf16 / llama.cpp batched F16"] = ratio(
                cc["jetserve bf16"], cc["llama.cpp batched F16"], "e2e_tok_per_s"
            )
            import llama_cpp

            results = {
                "model": {**info, "dtype": "float32"},
                "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores",
                "shared_machine": True,
                "load_average": [round(x, 2) for x in (*load_before, *os.getloadavg())],
                "load_average_note": "1/5/15-minute load before, then after the run",
                "threads": THREADS,
                "llama_cpp_python": llama_cpp.__version__,
                "llama_cpp_extra_buffers": "off (AMX CPU: they segfault in llama_decode)"
                if EXTRA_BUFFERS_OFF
                else "on",
                "torch": torch.__version__,
                "workload": {
                    "batch1": {
                        "prompt_tokens": prompt_len,
                        "new_tokens": new1,
                        "rounds": rounds_done,
                    },
                    "concurrent": {
                        "requests": n_conc,
                        "prompt_tokens": prompt_len,
                        "new_tokens": new_conc,
                        "rounds": rounds_done,
                    },
                    "fresh_prompts_each_round": True,
                },
                "greedy_agreement_with_jetserve_fp32": agreement,
                "batch1": b1,
                "concurrent": cc,
                "ratios": goals,
            }
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=2))
            plot(results, args.out.with_suffix(".png"))
            return goals

        for r in range(args.rounds):
            p1 = prompts(1)
            for t, m in cpp1.items():
                _, pre, dec = m.generate(p1, new1)
                batch1.setdefault(f"llama.cpp {t.upper()}", []).append(rates(new1, 1, pre, dec))
            for q, e in js1.items():
                _, pre, dec = jetserve_generate(e, p1, new1)
                batch1.setdefault(js_name(q), []).append(rates(new1, 1, pre, dec))
            pc = prompts(n_conc)
            for t, m in cpp64.items():
                _, pre, dec = m.generate(pc, new_conc)
                conc.setdefault(f"llama.cpp batched {t.upper()}", []).append(
                    rates(new_conc, n_conc, pre, dec)
                )
            for q, e in js64.items():
                _, pre, dec = jetserve_generate(e, pc, new_conc)
                conc.setdefault(js_name(q), []).append(rates(new_conc, n_conc, pre, dec))
            print(
                f"round {r + 1}:",
                {k: v[-1]["decode_tok_per_s"] for k, v in batch1.items()},
                {k: v[-1]["e2e_tok_per_s"] for k, v in conc.items()},
                flush=True,
            )
            goals = report(r + 1)
    print(json.dumps(goals, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
