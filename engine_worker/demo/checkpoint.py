"""`jetserve build-demo`: a small Llama checkpoint trained offline, deterministically, on the CPU.

`jetserve up` needs a model to serve on a machine with no model hub. This builds one: a byte
level BPE tokenizer and a tiny Llama trained for a fixed number of steps on the procedural
corpus of `demo_corpus`, written as an ordinary Hugging Face folder (config.json,
model.safetensors, tokenizer.json, tokenizer_config.json with a chat template, ...).

The model trained is the engine's own Llama (engine_worker/engine/models/llama.py, through
its plain causal forward), not transformers: transformers is only a dev dependency, and
`jetserve up` must build the demo from a plain install. Its weights are written under
Hugging Face's names, so transformers and the engine load the result like any Llama.

Determinism: the corpus, tokenizer, initial weights and batch order all come from the seed,
training runs a fixed number of steps on a fixed number of threads with torch's deterministic
algorithms, so the same seed gives a byte-identical model.safetensors on the same machine type.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from engine_worker.demo.corpus import (
    BOS_TOKEN,
    CHAT_TEMPLATE,
    EOS_TOKEN,
    SPECIAL_TOKENS,
    demo_corpus,
)
from engine_worker.engine.config import ModelConfig
from engine_worker.engine.models.llama import LlamaForCausalLM
from engine_worker.engine.models.loader import build_model, hf_state_dict
from shared.settings import LauncherSettings, Settings, add_flags, setting
from shared.settings.fields import same_as
from shared.terminal import ProgressBar

CHECKPOINT_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
)
BUILD_INFO_FILE = "jetserve_demo.json"  # provenance: seed, steps, shapes, final loss
DEFAULT_STEPS = 400


@dataclass(frozen=True)
class DemoModelShape:
    """Small enough to learn the demo corpus in a minute or two on one CPU core (how many
    steps it gets matters more than width here); GQA and an untied head on purpose, so the
    demo exercises the same code paths as real Llama checkpoints."""

    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    vocab_size: int = 2048  # a target for the BPE trainer; the corpus may support fewer

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class TrainingPlan:
    """Bounded by steps, never by wall time, so that the result is reproducible."""

    steps: int = DEFAULT_STEPS
    batch_size: int = 8
    seq_len: int = 256
    lr: float = 6e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 15
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    # One thread, on every machine: the thread count changes how float sums are split, and
    # a second thread stalls badly whenever another process holds the other core.
    threads: int = 1
    tokenizer_docs: int = 4000
    init_std: float = 0.02
    # Share of copy/edit conversations in the corpus (corpus.copy_conversation): 0 for the
    # demo model; the speculative decoding benchmark trains models that copy.
    copy_fraction: float = 0.0


@dataclass
class BuildReport:
    """What a build did, written beside the weights as jetserve_demo.json."""

    seed: int
    shape: DemoModelShape
    plan: TrainingPlan
    vocab_size: int
    num_parameters: int
    train_tokens: int
    losses: list[float] = field(default_factory=list)  # mean loss per tenth of training

    def to_json(self) -> dict:
        return {
            "seed": self.seed,
            "shape": asdict(self.shape),
            "plan": asdict(self.plan),
            "vocab_size": self.vocab_size,
            "num_parameters": self.num_parameters,
            "train_tokens": self.train_tokens,
            "losses": [round(x, 4) for x in self.losses],
        }


# --------------------------------------------------------------------------- tokenizer


def train_bpe_tokenizer(
    texts: list[str],
    vocab_size: int,
    special_tokens: list[str],
    bos_token: str | None = None,
) -> Tokenizer:
    """A byte level BPE (GPT-2 style, any UTF-8 text encodes) trained on ``texts``.

    Special tokens get the first ids in the order given. They are cut out of the texts
    before counting merges, so markup like ``<|user|>`` never leaks into ordinary tokens.
    With ``bos_token``, ``encode(text)`` prepends it (as Llama tokenizers do); chat prompts
    carry it in their template and are encoded without special tokens.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    if special_tokens:
        splitter = re.compile("|".join(re.escape(t) for t in special_tokens))
        pieces = [p for text in texts for p in splitter.split(text) if p]
    else:
        pieces = list(texts)
    tok.train_from_iterator(pieces, trainer=trainer)
    if bos_token is not None:
        bos_id = tok.token_to_id(bos_token)
        if bos_id is None:
            raise ValueError(f"bos token {bos_token!r} is not among the special tokens")
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A",
            pair=f"{bos_token} $A {bos_token} $B",
            special_tokens=[(bos_token, bos_id)],
        )
    return tok


# --------------------------------------------------------------------------- model


def model_config(shape: DemoModelShape, vocab_size: int) -> ModelConfig:
    """The engine's view of the demo model: a plain Llama (no bias, untied head, GQA)."""
    return ModelConfig(
        architecture="LlamaForCausalLM",
        family="llama",
        vocab_size=vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_layers=shape.num_layers,
        num_heads=shape.num_heads,
        num_kv_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        rms_norm_eps=shape.rms_norm_eps,
        rope_theta=shape.rope_theta,
        rope_scaling=None,
        max_position_embeddings=shape.max_position_embeddings,
        tie_word_embeddings=False,
        qkv_bias=False,
        qk_norm=False,
        torch_dtype="float32",
    )


def trainable_model(shape: DemoModelShape, vocab_size: int, seq_len: int) -> LlamaForCausalLM:
    """The engine's own Llama (torch reference ops) in float32 on the CPU, with gradients:
    trained through its causal forward, then served by the engine from the written folder."""
    cfg = model_config(shape, vocab_size)
    model = build_model(cfg, torch.float32, torch.device("cpu"), max_positions=seq_len)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def init_weights(model: LlamaForCausalLM, generator: torch.Generator, std: float) -> None:
    """GPT-2 style init from an explicit generator: residual projections scaled by depth
    so the stream stays well-conditioned, norms at one."""
    resid_std = std / math.sqrt(2 * model.cfg.num_layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(("o_proj.weight", "down.weight")):
                p.normal_(0.0, resid_std, generator=generator)
            else:
                p.normal_(0.0, std, generator=generator)


# --------------------------------------------------------------------------- data


def pack_documents(docs: list[list[int]], row_len: int, pad_id: int) -> list[list[int]]:
    """Greedy packing of whole documents into rows of ``row_len`` tokens.

    Every row starts at a document's first token (its bos), as served prompts do; a document
    longer than a row is cut. The tail of a row is ``pad_id``; its targets are masked.
    """
    rows: list[list[int]] = []
    current: list[int] = []
    for doc in docs:
        doc = doc[:row_len]
        if len(current) + len(doc) > row_len:
            rows.append(current + [pad_id] * (row_len - len(current)))
            current = []
        current.extend(doc)
    if current:
        rows.append(current + [pad_id] * (row_len - len(current)))
    return rows


def training_rows(
    tokenizer: Tokenizer,
    seed: int,
    num_rows: int,
    row_len: int,
    pad_id: int,
    copy_fraction: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets, ``num_rows`` x ``row_len``, in corpus order (itself seeded).

    Targets are the inputs shifted by one, with -100 where the next token is padding.
    The corpus is prefix-stable in ``n``, so growing it keeps the rows already made.
    """
    n = max(64, num_rows * 4)
    while True:
        texts = demo_corpus(seed, n, copy_fraction=copy_fraction)
        encoded = [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
        rows = pack_documents(encoded, row_len + 1, pad_id)
        if len(rows) > num_rows:  # the last row may be partial; never use it
            break
        n *= 2
    data = torch.tensor(rows[:num_rows], dtype=torch.long)
    real = torch.zeros_like(data, dtype=torch.bool)
    for i, row in enumerate(rows[:num_rows]):
        # positions holding real tokens: everything up to the last non-pad of the row
        length = len(row)
        while length > 0 and row[length - 1] == pad_id:
            length -= 1
        real[i, :length] = True
    inputs = data[:, :-1].clone()
    targets = data[:, 1:].clone()
    targets[~real[:, 1:]] = -100
    return inputs, targets


# --------------------------------------------------------------------------- training


@contextlib.contextmanager
def _deterministic_torch(threads: int) -> Iterator[None]:
    """Fixed threads and deterministic kernels for the build, restored afterwards."""
    prev_threads = torch.get_num_threads()
    prev_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev_det)
        torch.set_num_threads(prev_threads)


def _lr_at(step: int, plan: TrainingPlan) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio`` of the peak."""
    if step < plan.warmup_steps:
        return plan.lr * (step + 1) / plan.warmup_steps
    progress = (step - plan.warmup_steps) / max(1, plan.steps - plan.warmup_steps)
    ratio = plan.min_lr_ratio + (1 - plan.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return plan.lr * ratio


def train(
    model: LlamaForCausalLM,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    plan: TrainingPlan,
    progress: Callable[[str], None] | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """AdamW over the rows in order, one batch per step; returns mean loss per tenth.

    ``progress`` gets a line per tenth, ``on_step`` (steps done, loss) every step.
    """
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": plan.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=plan.lr,
        betas=(0.9, 0.95),
        foreach=False,
    )
    model.train()
    window = max(1, plan.steps // 10)
    losses: list[float] = []
    acc = 0.0
    started = time.monotonic()
    for step in range(plan.steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, plan)
        lo = step * plan.batch_size
        x, y = inputs[lo : lo + plan.batch_size], targets[lo : lo + plan.batch_size]
        logits = model.forward_causal(x)
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), plan.grad_clip, foreach=False)
        opt.step()
        value = loss.item()
        acc += value
        if on_step:
            on_step(step + 1, value)
        if (step + 1) % window == 0 or step + 1 == plan.steps:
            n = (step % window) + 1
            losses.append(acc / n)
            acc = 0.0
            if progress:
                elapsed = time.monotonic() - started
                progress(
                    f"step {step + 1}/{plan.steps} loss {losses[-1]:.3f} ({elapsed:.0f}s elapsed)"
                )
    model.eval()
    return losses


# --------------------------------------------------------------------------- files


def _hf_config(shape: DemoModelShape, vocab_size: int, bos_id: int, eos_id: int) -> dict:
    """config.json for LlamaForCausalLM, readable by transformers 4.x and 5.x."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_layers,
        "num_attention_heads": shape.num_heads,
        "num_key_value_heads": shape.num_kv_heads,
        "head_dim": shape.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": shape.max_position_embeddings,
        "rms_norm_eps": shape.rms_norm_eps,
        "rope_theta": shape.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": None,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": "float32",
    }


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_checkpoint_files(
    folder: Path, model: LlamaForCausalLM, tokenizer: Tokenizer, shape: DemoModelShape
) -> None:
    """Everything an HF loader, the engine and the API read from a model folder."""
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    _write_json(folder / "config.json", _hf_config(shape, vocab, bos_id, eos_id))
    _write_json(
        folder / "generation_config.json",
        {
            "bos_token_id": bos_id,
            "eos_token_id": eos_id,
            "max_length": shape.max_position_embeddings,
        },
    )
    tensors = hf_state_dict(model)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save(str(folder / "tokenizer.json"))
    extra = [t for t in SPECIAL_TOKENS if t not in (BOS_TOKEN, EOS_TOKEN)]
    _write_json(
        folder / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS_TOKEN,
            "eos_token": EOS_TOKEN,
            "pad_token": None,
            "additional_special_tokens": extra,
            "model_max_length": shape.max_position_embeddings,
            "clean_up_tokenization_spaces": False,
            "chat_template": CHAT_TEMPLATE,
        },
    )
    _write_json(
        folder / "special_tokens_map.json",
        {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "additional_special_tokens": extra},
    )


def is_complete_checkpoint(path: Path) -> bool:
    return all((Path(path) / name).is_file() for name in CHECKPOINT_FILES)


# --------------------------------------------------------------------------- build


def build_demo_checkpoint(
    out_dir: Path,
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    shape: DemoModelShape | None = None,
    plan: TrainingPlan | None = None,
    progress: Callable[[str], None] | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> Path:
    """Train and write the demo model into ``out_dir``, replacing what is there.

    The folder is assembled beside ``out_dir`` and renamed into place, so a reader (or a
    concurrent build) never sees half a checkpoint. ``steps`` overrides ``plan.steps``.
    """
    out_dir = Path(out_dir)
    shape = shape or DemoModelShape()
    plan = plan or TrainingPlan()
    if steps != plan.steps:
        plan = TrainingPlan(**{**asdict(plan), "steps": steps})
    if steps < 1:
        raise ValueError("steps must be at least 1")
    say = progress or (lambda _msg: None)

    with _deterministic_torch(plan.threads):
        # The tokenizer comes from the plain corpus whatever the plan: models trained on
        # other mixes share it, so one can draft for another (speculative decoding).
        texts = demo_corpus(seed, plan.tokenizer_docs)
        tokenizer = train_bpe_tokenizer(
            texts, shape.vocab_size, SPECIAL_TOKENS, bos_token=BOS_TOKEN
        )
        vocab = tokenizer.get_vocab_size(with_added_tokens=True)
        pad_id = tokenizer.token_to_id(EOS_TOKEN)
        inputs, targets = training_rows(
            tokenizer,
            seed,
            plan.steps * plan.batch_size,
            plan.seq_len,
            pad_id,
            plan.copy_fraction,
        )
        gen = torch.Generator().manual_seed(seed)
        model = trainable_model(shape, vocab, plan.seq_len)
        init_weights(model, gen, plan.init_std)
        n_params = sum(p.numel() for p in model.parameters())
        say(
            f"vocab {vocab}, {n_params / 1e6:.2f}M parameters, "
            f"{plan.steps} steps of {plan.batch_size}x{plan.seq_len} tokens"
        )
        losses = train(model, inputs, targets, plan, say, on_step)

    report = BuildReport(
        seed=seed,
        shape=shape,
        plan=plan,
        vocab_size=vocab,
        num_parameters=n_params,
        train_tokens=int((targets != -100).sum()),
        losses=losses,
    )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.building-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        write_checkpoint_files(staging, model, tokenizer, shape)
        _write_json(staging / BUILD_INFO_FILE, report.to_json())
        if out_dir.exists():
            shutil.rmtree(out_dir)
        try:
            staging.rename(out_dir)
        except OSError:
            if not is_complete_checkpoint(out_dir):  # a concurrent build that won is fine
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def default_demo_dir() -> Path:
    """JETSERVE_DEMO_MODEL_DIR, else <JETSERVE_DATA_DIR>/models/jetserve-demo (as the launcher)."""
    return LauncherSettings.from_env().resolved_demo_model_dir


def ensure_demo_checkpoint(path: Path | None = None, **build_kwargs: Any) -> Path:
    """The demo folder at ``path`` (default: `default_demo_dir()`), built first if incomplete.

    ``build_kwargs`` go to `build_demo_checkpoint` (seed, steps, progress, ...).
    """
    path = Path(path) if path is not None else default_demo_dir()
    if not is_complete_checkpoint(path):
        build_demo_checkpoint(path, **build_kwargs)
    return path


# --------------------------------------------------------------------------- CLI


class BuildDemoOptions(Settings):
    section: ClassVar[str] = "build-demo"

    out: str = same_as(
        LauncherSettings,
        "demo_model_dir",
        flag="--out",
        help="output folder; empty: <JETSERVE_DATA_DIR>/models/jetserve-demo",
    )
    seed: int = setting(0, ge=0, env=None, help="same seed, same weights")
    steps: int = setting(DEFAULT_STEPS, ge=1, env=None, help="training steps")
    force: bool = setting(False, env=None, help="rebuild even if complete")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_flags(parser, BuildDemoOptions)


def run(args: argparse.Namespace) -> int:
    opts = BuildDemoOptions.from_args(args)
    out = Path(opts.out) if opts.out else default_demo_dir()
    if is_complete_checkpoint(out) and not opts.force:
        print(f"demo model already built at {out} (use --force to rebuild)", file=sys.stderr)
        return 0

    started = time.monotonic()
    build_with_progress(out, seed=opts.seed, steps=opts.steps)
    print(f"built demo model at {out} in {time.monotonic() - started:.0f}s", file=sys.stderr)
    return 0


def build_with_progress(out: Path, seed: int = 0, steps: int = DEFAULT_STEPS) -> Path:
    """`build_demo_checkpoint` with a progress bar on a terminal (lines on a pipe)."""
    bar = ProgressBar(total=steps, label="training the demo model")
    try:
        return build_demo_checkpoint(
            out,
            seed=seed,
            steps=steps,
            progress=bar.say,
            on_step=lambda done, loss: bar.update(done, f"loss {loss:.3f}"),
        )
    finally:
        bar.close()
