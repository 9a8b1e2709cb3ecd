"""Speculative decoding at batch 1 on the CPU, where the output repeats the input.

The workload comes from the demo corpus: "repeat this passage" and "replace X with Y in
this passage" chat prompts (engine_worker/demo/corpus.py `copy_conversation`), from a
seed the models never trained on. The demo model does not copy (it never saw such a
task), so this benchmark trains two models that do, with the demo builder itself, on the
demo corpus with half of it copy/edit conversations (`TrainingPlan.copy_fraction`):
- small: the demo model's shape (1.1M parameters), the draft;
- large: hidden 256, 4 layers, 8 heads (~5M parameters), the target, trained the same
  way for fewer steps (this 2-core box is shared; its build time stays modest).
Both use the demo's tokenizer. They are built once into .jetserve/models/ and reused.

Both are a few MB, so their forward is bound by per-call overheads and arithmetic, not by
weight bytes as batch-1 decoding of a real model is, and verifying several rows costs more
than one. So each is also run widened: padded with zero weights to hidden 1024 and
intermediate 4096 (benchmarks/widen_checkpoint.py; small-wide has 55M parameters, 218 MB
in fp32, the size of issue 16's model), its tokens at a real model's bytes per token.
large-wide also runs with the (unwidened) small model as its draft: a draft that is a
small fraction of its target's bytes, as drafts are.

Arms, greedy, one request at a time, all in one run and interleaved prompt by prompt (so
every arm sees the same machine load): each model plain and with prompt lookup
(`--speculative-method ngram`), and the large ones with the small one as their draft.
Greedy tokens must be identical across the arms of a model (checked). Timed prompts are
never the warm-up's (no prefix-cache reuse across them).

    python benchmarks/spec_decode_bench.py          # writes benchmarks/results/spec_decode.{json,png}
    python benchmarks/spec_decode_bench.py --quick  # 2 prompts, few tokens: checks the script

`--sampled` measures the draft model at temperature 1.0 instead (the large model, the
small one as its draft): proposals drawn from the draft's own distribution q and checked
by the rejection sampler, against the draft's argmax (point masses, what the draft
proposed before), unseeded and seeded, interleaved prompt by prompt in one run. Writes
benchmarks/results/spec_decode_sampled.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from widen_checkpoint import widen_checkpoint

from engine_worker.demo.checkpoint import (
    DemoModelShape,
    TrainingPlan,
    build_demo_checkpoint,
    is_complete_checkpoint,
)
from engine_worker.demo.corpus import copy_conversation
from engine_worker.engine.llm import LLM
from shared.sampling_params import SamplingParams

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
MODELS = ROOT / ".jetserve" / "models"
HELD_OUT_SEED = 4242  # the corpus seed the models trained on is 0
SMALL = ("spec-copy-small", DemoModelShape(), TrainingPlan(steps=320, copy_fraction=0.5))
LARGE = (
    "spec-copy-large",
    DemoModelShape(
        hidden_size=256, intermediate_size=768, num_layers=4, num_heads=8, num_kv_heads=2
    ),
    TrainingPlan(steps=160, lr=3e-3, copy_fraction=0.5),
)


def run_facts(
    load_before: tuple[float, ...],
    load_after: tuple[float, ...],
    timed: list[list[int]],
    max_tokens: int,
    k: int,
) -> dict:
    """What every result of this benchmark records about the machine and the workload."""
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, shared with other jobs",
        "torch_threads": torch.get_num_threads(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
        "prompts": len(timed),
        "mean_prompt_tokens": round(sum(map(len, timed)) / len(timed), 1),
        "max_tokens": max_tokens,
        "num_speculative_tokens": k,
    }


def ensure_model(name: str, shape: DemoModelShape, plan: TrainingPlan) -> Path:
    path = MODELS / name
    if not is_complete_checkpoint(path):
        print(f"training {name} ({plan.steps} steps; minutes on a busy CPU)", flush=True)
        build_demo_checkpoint(
            path, seed=0, steps=plan.steps, shape=shape, plan=plan, progress=print
        )
    return path


# Hidden and intermediate size the copy models are widened to (zero weights): 55M
# parameters for the small one, 218 MB in fp32, issue 16's size.
WIDE_HIDDEN, WIDE_INTERMEDIATE = 1024, 4096


def ensure_wide(source: Path) -> Path:
    """`source` widened with zeros into `<name>-wide` (rebuilt when the source is newer)."""
    path = MODELS / f"{source.name}-wide"
    config = path / "config.json"
    weights = source / "model.safetensors"
    if not config.exists() or config.stat().st_mtime < weights.stat().st_mtime:
        print(f"widening {source.name} to hidden {WIDE_HIDDEN}", flush=True)
        widen_checkpoint(source, path, WIDE_HIDDEN, WIDE_INTERMEDIATE)
    return path


def parameters_millions(path: Path) -> float:
    with safe_open(path / "model.safetensors", framework="pt") as f:
        count = sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    return round(count / 1e6, 1)


def copy_prompts(llm: LLM, n: int) -> list[list[int]]:
    r = random.Random(HELD_OUT_SEED)
    prompts = []
    for _ in range(n):
        user = copy_conversation(r)[0]
        assert llm.tokenizer is not None
        prompts.append(llm.tokenizer.encode_chat([user]))
    return prompts


@dataclass
class Arm:
    name: str
    model: str
    llm: LLM
    tokens: int = 0
    seconds: float = 0.0
    outputs: list[list[int]] = field(default_factory=list)
    per_prompt_s: list[float] = field(default_factory=list)

    def run(self, prompt: list[int], params: SamplingParams) -> None:
        t0 = time.perf_counter()
        out = self.llm.generate([prompt], params)[0].outputs[0].token_ids
        self.per_prompt_s.append(time.perf_counter() - t0)
        self.seconds += self.per_prompt_s[-1]
        self.tokens += len(out)
        self.outputs.append(out)

    def summary(self) -> dict:
        s = self.llm.engine.stats().spec
        return {
            "arm": self.name,
            "model": self.model,
            "output_tokens": self.tokens,
            "seconds": round(self.seconds, 3),
            "tokens_per_s": round(self.tokens / self.seconds, 2) if self.seconds else 0.0,
            "spec_drafts": s.num_drafts,
            "spec_draft_tokens": s.num_draft_tokens,
            "spec_accepted_tokens": s.num_accepted_tokens,
            "acceptance_rate": round(s.acceptance_rate, 3),
            "tokens_per_forward": round(s.mean_acceptance_length, 3) if s.num_drafts else 1.0,
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--k", type=int, default=8, help="--num-speculative-tokens")
    ap.add_argument("--out", default=None, help="default: results/spec_decode[_sampled].json")
    ap.add_argument("--note", default="", help="what the JSON should say about this run")
    ap.add_argument(
        "--sampled", action="store_true", help="draft acceptance at temperature 1.0 (see above)"
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads; 1 on a shared box, where a second thread stalls every op",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n_prompts, max_tokens = (2, 24) if args.quick else (args.prompts, args.max_tokens)
    small, large = ensure_model(*SMALL), ensure_model(*LARGE)
    if args.sampled:
        sampled_main(args, small, large, n_prompts, max_tokens)
        return
    wide, large_wide = ensure_wide(small), ensure_wide(large)
    args.out = args.out or str(RESULTS / "spec_decode.json")
    load_before = os.getloadavg()
    common = dict(num_kv_blocks=512, block_size=16, max_model_len=1024)
    spec = dict(num_speculative_tokens=args.k)
    ngram = dict(speculative_method="ngram", **spec)
    draft = dict(speculative_method="draft", speculative_model=str(small), **spec)
    # model name -> (checkpoint, its speculating arms); every model also runs plain.
    models = {
        "small": (small, {"ngram": ngram}),
        "small-wide": (wide, {"ngram": ngram}),
        "large": (large, {"ngram": ngram, "draft(small)": draft}),
        "large-wide": (large_wide, {"ngram": ngram, "draft(small)": draft}),
    }
    arms = [
        Arm(arm, model, LLM(str(path), **flags, **common))
        for model, (path, speculating) in models.items()
        for arm, flags in {"plain": {}, **speculating}.items()
    ]
    prompts = copy_prompts(arms[0].llm, n_prompts + 1)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    warm, timed = prompts[0], prompts[1:]
    for arm in arms:  # warm-up, then forget what it counted
        arm.llm.generate([warm], params)
        arm.llm.engine.spec_counters = type(arm.llm.engine.spec_counters)()
    for i, prompt in enumerate(timed):
        for arm in arms:
            arm.run(prompt, params)
        print(f"prompt {i + 1}/{len(timed)} done", flush=True)
    load_after = os.getloadavg()
    for model in models:
        outs = [a.outputs for a in arms if a.model == model]
        assert all(o == outs[0] for o in outs), f"greedy outputs differ across {model} arms"
    plain = {a.model: a.outputs for a in arms if a.name == "plain"}

    def same_tokens(model: str) -> str:
        """Prompts where the widened model decoded its source's tokens (all, up to float
        rounding at near-ties)."""
        same = sum(w == m for w, m in zip(plain[f"{model}-wide"], plain[model], strict=True))
        return f"{same}/{len(timed)}"

    def key(arm: Arm) -> str:
        return f"{arm.model}_{arm.name}".replace("-", "_").replace("(", "_").replace(")", "")

    rows = [a.summary() for a in arms]
    by = {(r["model"], r["arm"]): r for r in rows}

    def ratio(model: str, arm: str) -> float:
        return round(by[(model, arm)]["tokens_per_s"] / by[(model, "plain")]["tokens_per_s"], 3)

    def median_ratio(model: str, arm: str) -> float:
        """Per prompt, plain time over this arm's (same tokens): robust to load bursts."""
        mine = next(a for a in arms if (a.model, a.name) == (model, arm))
        plain = next(a for a in arms if (a.model, a.name) == (model, "plain"))
        ratios = sorted(p / m for p, m in zip(plain.per_prompt_s, mine.per_prompt_s, strict=True))
        return round(ratios[len(ratios) // 2], 3)

    result = {
        "benchmark": "spec_decode",
        "what": "batch-1 greedy decode on CPU, copy/edit prompts from the demo corpus",
        **run_facts(load_before, load_after, timed, max_tokens, args.k),
        "models": {
            "small": {"path": str(small.relative_to(ROOT)), "shape": vars(SMALL[1])},
            "large": {"path": str(large.relative_to(ROOT)), "shape": vars(LARGE[1])},
            **{
                f"{model}-wide": {
                    "path": str(path.relative_to(ROOT)),
                    "shape": {"hidden_size": WIDE_HIDDEN, "intermediate_size": WIDE_INTERMEDIATE},
                    "what": f"{model} padded with zero weights: its tokens at a real size",
                    "parameters_millions": parameters_millions(path),
                    "prompts_with_the_source_models_tokens": same_tokens(model),
                }
                for model, path in (("small", wide), ("large", large_wide))
            },
        },
        "greedy_outputs_identical": True,
        "arms": rows,
        "speedup": {key(a): ratio(a.model, a.name) for a in arms if a.name != "plain"},
        "speedup_median_per_prompt": {
            key(a): median_ratio(a.model, a.name) for a in arms if a.name != "plain"
        },
    }
    if args.note:
        result["note"] = args.note
    out = Path(args.out)
    if not args.quick:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        plot(result, out.with_suffix(".png"))
    print(json.dumps(result["speedup"]), json.dumps(rows, indent=1))


def sampled_main(
    args: argparse.Namespace, small: Path, large: Path, n_prompts: int, max_tokens: int
) -> None:
    """Draft acceptance at temperature 1.0: proposals sampled from q vs the draft's argmax."""
    common = dict(num_kv_blocks=512, block_size=16, max_model_len=1024, seed=0)
    spec = dict(
        num_speculative_tokens=args.k, speculative_method="draft", speculative_model=str(small)
    )
    arms = []
    for seeded in (False, True):
        for proposes in ("q", "argmax"):
            llm = LLM(str(large), **spec, **common)
            llm.engine.proposer.samples_proposals = proposes == "q"  # type: ignore[union-attr]
            arm = Arm(f"draft {proposes}", "seeded" if seeded else "unseeded", llm)
            arms.append(arm)
    plain = Arm("plain", "unseeded", LLM(str(large), **common))
    prompts = copy_prompts(plain.llm, n_prompts + 1)
    warm, timed = prompts[0], prompts[1:]

    def params(arm: Arm, i: int) -> SamplingParams:
        seed = 1000 + i if arm.model == "seeded" else None
        return SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed)

    load_before = os.getloadavg()
    for arm in [plain, *arms]:
        arm.llm.generate([warm], params(arm, 0))
        arm.llm.engine.spec_counters = type(arm.llm.engine.spec_counters)()
    for i, prompt in enumerate(timed):
        for arm in [plain, *arms]:
            arm.run(prompt, params(arm, i + 1))
        print(f"prompt {i + 1}/{len(timed)} done", flush=True)
    load_after = os.getloadavg()
    # Seeded: the draft's proposals change nothing but how many hold.
    seeded_outputs = [a.outputs for a in arms if a.model == "seeded"]
    assert seeded_outputs[0] == seeded_outputs[1], "seeded outputs differ between proposers"
    rows = [a.summary() for a in [plain, *arms]]
    by = {(r["model"], r["arm"]): r for r in rows}
    result = {
        "benchmark": "spec_decode_sampled",
        "what": "batch-1 decode at temperature 1.0 on CPU, copy/edit prompts from the demo "
        "corpus; the large model with the small one as its draft",
        **run_facts(load_before, load_after, timed, max_tokens, args.k),
        "seeded_outputs_identical_across_proposers": True,
        "arms": rows,
        "acceptance": {
            kind: {
                "q (after)": by[(kind, "draft q")]["acceptance_rate"],
                "argmax (before)": by[(kind, "draft argmax")]["acceptance_rate"],
            }
            for kind in ("unseeded", "seeded")
        },
    }
    out = Path(args.out or RESULTS / "spec_decode_sampled.json")
    if not args.quick:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        plot(result, out.with_suffix(".png"), "output tokens/s (batch 1, temperature 1.0)")
    print(json.dumps(result["acceptance"]), json.dumps(rows, indent=1))


def plot(result: dict, path: Path, ylabel: str = "output tokens/s (batch 1, greedy)") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["arms"]
    labels = [f"{r['model']}\n{r['arm']}" for r in rows]
    values = [r["tokens_per_s"] for r in rows]
    fig, ax = plt.subplots(figsize=(11, 4.5))
    bars = ax.bar(labels, values, color=["#888" if r["arm"] == "plain" else "#2a7" for r in rows])
    for bar, r in zip(bars, rows, strict=True):
        note = (
            ""
            if r["arm"] == "plain"
            else f"acc {r['acceptance_rate']:.2f}\n{r['tokens_per_forward']:.2f} tok/fwd"
        )
        ax.annotate(
            note,
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    load = result["load_average_before"][0]
    ax.set_yscale("log")  # the widened models decode ~20-50x slower than the others
    ax.set_ylim(top=max(values) * 3)  # room for the top bar's note
    ax.set_ylabel(ylabel)
    ax.set_title(f"Speculative decoding on copy/edit prompts (CPU, load avg {load})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
