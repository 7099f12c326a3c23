"""Sample N responses per prompt: the Ray Data actor of `pipeline.py generate`.

Reproducible by construction: every (prompt, sample) row draws its tokens from its own torch generator,
seeded by (seed, prompt_id, sample number), so a row's samples depend on nothing else in its batch
(the draw, that is; the logits of a left-padded row can differ from an unpadded run in the last bits).
Sampling is done by a logits processor handed to transformers' `generate` in greedy mode: it applies
temperature and top-p, draws one token per row from the row's generator and leaves only that token
standing. `generate` keeps doing the rest: left padding, the KV cache, stopping at EOS.

With `engine="vllm"` (vLLM installed and a GPU present) a vLLM engine samples instead, seeded per
request the same way (its samples differ from transformers' for the same seed).
"""

from __future__ import annotations

import functools
import hashlib
import json

import pyarrow as pa
import torch

from stages.core.inputs.formats import RowRejected
from stages.core.inputs.tokenization import prompt_token_ids
from stages.core.runtime.devices import pick_device
from stages.core.runtime.models import load_model, load_tokenizer, resolve_model

CANDIDATE_SCHEMA = pa.schema([
    ("prompt_index", pa.int64()),          # the prompt's row number in the input
    ("prompt_id", pa.string()),            # content hash of the prompt
    ("prompt", pa.string()),               # the prompt text, or JSON of its messages (conversational)
    ("conversational", pa.bool_()),
    ("template_json", pa.string()),        # tools / chat_template_kwargs of a conversational prompt, JSON
    ("prompt_tokens", pa.int32()),
    ("responses", pa.list_(pa.string())),
    ("finish_reasons", pa.list_(pa.string())),  # stop (EOS) or length (max_new_tokens)
    ("response_tokens", pa.list_(pa.int32())),  # tokens generated, EOS included
    ("reject_reason", pa.string()),        # a prompt the model cannot take (template_error); no responses
    ("reject_detail", pa.string()),
])


def sample_seed(seed: int, prompt_id: str, sample: int) -> int:
    """The generator seed of one sample: independent of batch, worker and order."""
    digest = hashlib.sha256(f"{seed}:{prompt_id}:{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero the tokens outside the smallest set holding `top_p` of the probability (the most likely token
    always stays), renormalised; rows of `probs` are distributions."""
    if top_p >= 1.0:
        return probs
    sorted_p, order = probs.sort(dim=-1, descending=True)
    before = sorted_p.cumsum(-1) - sorted_p  # mass of the tokens ranked above each one
    sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)
    out = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return out / out.sum(-1, keepdim=True)


class RowSampler:
    """A logits processor: temperature, top-p, then one draw per row from that row's own generator."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float):
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.temperature, self.top_p = temperature, top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = top_p_filter(torch.softmax(scores.float().cpu() / self.temperature, dim=-1), self.top_p)
        picks = [int(torch.multinomial(probs[r], 1, generator=g)) for r, g in enumerate(self.generators)]
        out = torch.full_like(scores, float("-inf"))
        out[torch.arange(len(picks)), torch.tensor(picks, device=scores.device)] = 0.0
        return out


@functools.lru_cache(maxsize=2)
def _tokenizer(path: str):
    return load_tokenizer(path)


def stop_ids(tokenizer, model) -> list[int]:
    """Tokens that end a response: the tokenizer's EOS and the model's generation config's."""
    ids = {tokenizer.eos_token_id}
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(extra if isinstance(extra, (list, tuple)) else [extra])
    return sorted(i for i in ids if i is not None)


def finish(tokens: list[int], stops: list[int], pad_id: int) -> tuple[list[int], str, int]:
    """(response tokens without the stop token, finish reason, tokens generated with the stop token)."""
    for k, t in enumerate(tokens):
        if t in stops:
            return tokens[:k], "stop", k + 1
    while tokens and tokens[-1] == pad_id and pad_id not in stops:  # never: generate pads only after a stop
        tokens = tokens[:-1]
    return tokens, "length", len(tokens)


class Sampler:
    """Loads the model once; each call samples `num_samples` responses for a batch of prompts."""

    def __init__(self, model_path: str, dtype: str, sampling: dict, device: str = "auto", threads: int | None = None,
                 engine: str = "hf"):
        if threads:
            torch.set_num_threads(threads)
        self.sampling = sampling
        model_path = resolve_model(model_path)  # on this node: an s3:// policy is fetched into its cache
        self.tokenizer = _tokenizer(model_path)
        self.engine = engine
        if engine == "vllm":
            from vllm import LLM  # optional: only with a GPU and vllm installed (checked by the stage)

            self.llm = LLM(model=model_path, dtype=dtype, seed=sampling["seed"])
            self.stops = [self.tokenizer.eos_token_id]
            return
        self.device = pick_device(device)
        self.model = load_model(model_path, dtype, self.device).eval()
        self.stops = stop_ids(self.tokenizer, self.model)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stops[0]

    def _sample_hf(self, prompts: list[list[int]], seeds: list[int]) -> list[list[int]]:
        from transformers import GenerationConfig, LogitsProcessorList

        s = self.sampling
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        config = GenerationConfig(max_new_tokens=s["max_new_tokens"], do_sample=False, num_beams=1,
                                  eos_token_id=self.stops, pad_token_id=self.pad_id)
        processors = LogitsProcessorList([RowSampler(seeds, s["temperature"], s["top_p"])]
                                         if s["temperature"] > 0 else [])
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                                      logits_processor=processors)
        return [row[width:].tolist() for row in out]

    def _sample_vllm(self, prompts: list[list[int]], seeds: list[int]) -> list[list[int]]:
        from vllm import SamplingParams

        s = self.sampling
        params = [SamplingParams(temperature=s["temperature"], top_p=s["top_p"], max_tokens=s["max_new_tokens"],
                                 seed=seed) for seed in seeds]
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    def __call__(self, batch: pa.Table) -> pa.Table:
        s, n = self.sampling, self.sampling["num_samples"]
        recs = batch.to_pylist()
        rows, seeds, owners = [], [], []
        for i, r in enumerate(recs):
            prompt = json.loads(r["prompt"]) if r["conversational"] else r["prompt"]
            template = json.loads(r["template_json"]) if r["template_json"] else None
            try:
                ids = prompt_token_ids(self.tokenizer, prompt, template)
            except RowRejected as e:
                r.update(reject_reason=e.reason, reject_detail=e.detail)
                continue
            r["prompt_tokens"] = len(ids)
            for j in range(n):
                rows.append(ids)
                seeds.append(sample_seed(s["seed"], r["prompt_id"], j))
                owners.append(i)
        generated = []
        if rows:
            generated = self._sample_vllm(rows, seeds) if self.engine == "vllm" else self._sample_hf(rows, seeds)
        for r in recs:
            r.setdefault("reject_reason", None)
            r.setdefault("reject_detail", None)
            r.setdefault("prompt_tokens", None)
            r["responses"], r["finish_reasons"], r["response_tokens"] = [], [], []
        for i, tokens in zip(owners, generated):
            kept, reason, count = finish(tokens, self.stops, getattr(self, "pad_id", -1))
            rec = recs[i]
            rec["responses"].append(self.tokenizer.decode(kept, skip_special_tokens=True))
            rec["finish_reasons"].append(reason)
            rec["response_tokens"].append(count)
        return pa.Table.from_pylist([{k: r.get(k) for k in CANDIDATE_SCHEMA.names} for r in recs],
                                    schema=CANDIDATE_SCHEMA)
