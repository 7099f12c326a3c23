"""The judges of `pipeline.py judge`, and how their scores become pairs.

Each judge gives every candidate (prompt, response) a score, higher is better:
- `RewardModelJudge` (a Ray actor): a sequence-classification reward model with one logit, on the chat
  template's rendering of prompt + response (a string prompt: prompt + response as text);
- `load_reward_fn`: a Python callable (prompt, response) -> float, for verifiable tasks;
- `ImplicitRewardJudge` (a Ray actor): a DPO policy's implicit reward beta * (log pi(y|x) - log pi_ref(y|x)),
  both log-probs from precompute's scorer (`ReferenceScorer.score_sequences`, THE log-prob function),
  over the tokens precompute and the trainer use for that response.
Human labels come as A / B / tie on a sheet (`stages.judge`), not as scores.

`select_pairs` turns one prompt's scores into pairs (best-worst, all, random) and gives every candidate
it leaves out its reason: tie (score differences below --min-margin, or none), not_selected, or
single_response.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import random
import sys
from typing import Any, Callable

import pyarrow as pa
import torch

from stages.core.config.engine import ConfigError
from stages.core.inputs.formats import RowRejected, is_messages
from stages.core.inputs.tokenization import ids_of, template_kwargs
from stages.core.inputs.unpaired import tokenize_unpaired_row
from stages.core.runtime.devices import pick_device
from stages.core.runtime.models import load_tokenizer, resolve_model
from stages.core.scoring.truncation import Truncation

# A candidate is (prompt_index, response_index): a response of generate's output. The actors take and
# return the two as columns, so a key never has to be spelt as text and parsed back.
CandidateKey = tuple[int, int]
SCORE_SCHEMA = pa.schema([("prompt_index", pa.int64()), ("response_index", pa.int64()), ("score", pa.float64()),
                          ("error", pa.string())])


def candidate_key(rec: dict) -> CandidateKey:
    return rec["prompt_index"], rec["response_index"]


def score_rows(keys: list[CandidateKey], values: list[float | None], errors: dict[CandidateKey, str]) -> pa.Table:
    """An actor's answer: one row per candidate, its score or its error."""
    return pa.Table.from_pylist([{"prompt_index": k[0], "response_index": k[1], "score": v, "error": errors.get(k)}
                                 for k, v in zip(keys, values)], schema=SCORE_SCHEMA)


def candidate_prompt(rec: dict) -> Any:
    """A candidate row's prompt as the user gave it: text, or a message list."""
    return json.loads(rec["prompt"]) if rec["conversational"] else rec["prompt"]


def load_reward_fn(spec: str) -> Callable[[Any, str], float]:
    """`package.module:function` (importable from here or the working folder) or `path/file.py:function`."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise ConfigError(f"config key 'reward_fn': {spec!r} is not module:function or file.py:function")
    try:
        if target.endswith(".py"):
            if not os.path.exists(target):
                raise ConfigError(f"config key 'reward_fn': no file {target}")
            loader = importlib.util.spec_from_file_location(f"reward_fn_{abs(hash(target))}", target)
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:
                sys.path.append(os.getcwd())
            module = importlib.import_module(target)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001  an import error of any kind, in the user's module
        raise ConfigError(f"config key 'reward_fn': cannot import {target}: {type(e).__name__}: {e}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"config key 'reward_fn': {target} has no function {name!r}")
    return fn


def call_reward_fn(fn: Callable, prompt: Any, response: str) -> float:
    """The function's score as a finite float; anything else raises RowRejected('judge_error')."""
    try:
        value = fn(prompt, response)
    except Exception as e:  # noqa: BLE001  the user's function; its failure is one candidate's reject
        raise RowRejected("judge_error", f"the reward function raised {repr(e)[:300]}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RowRejected("judge_error", f"the reward function returned {value!r}, not a finite number")
    return float(value)


def reward_model_ids(tokenizer, prompt: Any, response: str, template: dict | None, max_tokens: int) -> list[int]:
    """What a reward model reads: the chat template over prompt + the response as the assistant turn
    (a string prompt: the text prompt + response), cut to max_tokens tokens from the start (judge's
    --max-length: the reward model's input, not the precompute truncation a `Truncation` holds)."""
    if is_messages(prompt):
        ids = ids_of(tokenizer, prompt + [{"role": "assistant", "content": response}], **template_kwargs(template))
    else:
        ids = ids_of(tokenizer, prompt + response)
    return ids[:max_tokens]


def _one_output(model_path: str, num_labels: int) -> None:
    if num_labels != 1:
        raise ConfigError(f"--reward-model {model_path}: has {num_labels} outputs; a reward model has one "
                          "(num_labels 1)")


def check_reward_model(model_path: str) -> None:
    """What RewardModelJudge needs, checked in the driver before actors load the model: a failure inside an
    actor reaches the user as a Ray traceback, not as this one line."""
    from transformers import AutoConfig

    from stages.core.runtime.models import one_line_error

    load_tokenizer(model_path)
    try:
        config = AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError) as e:
        raise one_line_error(model_path, "a model config from", e) from None
    _one_output(model_path, config.num_labels)


class RewardModelJudge:
    """A sequence-classification reward model (one logit); each call scores a batch of candidates."""

    def __init__(self, model_path: str, dtype: str, max_tokens: int, device: str = "auto",
                 threads: int | None = None):
        from transformers import AutoModelForSequenceClassification

        if threads:
            torch.set_num_threads(threads)
        self.device = pick_device(device)
        model_path = resolve_model(model_path)  # on this node: an s3:// model is fetched into its cache
        self.tokenizer = load_tokenizer(model_path)
        self.model = AutoModelForSequenceClassification.from_pretrained(model_path, dtype=getattr(torch, dtype))
        self.model = self.model.to(self.device).eval()
        _one_output(model_path, self.model.config.num_labels)
        if self.model.config.pad_token_id is None:  # the model finds each sequence's last token by its padding
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.max_tokens = max_tokens  # tokens of prompt + response the reward model reads

    def scores(self, sequences: list[list[int]]) -> list[float]:
        """One forward, right-padded; the model reads each sequence's last real token."""
        width = max(len(s) for s in sequences)
        pad = self.model.config.pad_token_id
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in sequences], device=self.device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences], device=self.device)
        with torch.inference_mode():
            return self.model(input_ids=ids, attention_mask=mask).logits[:, 0].float().cpu().tolist()

    def __call__(self, batch: pa.Table) -> pa.Table:
        keys, seqs, errors = [], [], {}
        for rec in batch.to_pylist():
            keys.append(candidate_key(rec))
            template = json.loads(rec["template_json"]) if rec["template_json"] else None
            try:
                seqs.append(reward_model_ids(self.tokenizer, candidate_prompt(rec), rec["response"], template,
                                             self.max_tokens))
            except RowRejected as e:
                errors[keys[-1]] = e.detail
                seqs.append(None)
        good = [s for s in seqs if s is not None]
        values = iter(self.scores(good) if good else [])
        return score_rows(keys, [None if s is None else next(values) for s in seqs], errors)


class ImplicitRewardJudge:
    """beta * (log pi(y|x) - log pi_ref(y|x)) of each candidate, on the tokens precompute scores: the
    response is tokenized as an unpaired completion (TRL's rule: EOS after a string response) and cut by
    the reference output's truncation (its manifest's)."""

    def __init__(self, policy_path: str, reference_path: str, beta: float, truncation: Truncation,
                 dtype: str = "float32", device: str = "auto", threads: int | None = None):
        from stages.core.scoring.scorer import ReferenceScorer
        from stages.core.training.checkpoint import load_policy_model

        device = pick_device(device)
        if "://" in policy_path:  # a policy on object storage: fetched into this node's cache
            policy_path = resolve_model(policy_path)
        args = dict(dtype=dtype, truncation=truncation, threads=threads, device=device)
        self.reference = ReferenceScorer(reference_path, **args)
        self.policy = ReferenceScorer(reference_path, model=load_policy_model(policy_path, device), **args)
        self.tokenizer = load_tokenizer(reference_path)
        self.beta, self.truncation = beta, truncation

    def __call__(self, batch: pa.Table) -> pa.Table:
        keys, seqs, errors = [], [], {}
        for rec in batch.to_pylist():
            keys.append(candidate_key(rec))
            template = json.loads(rec["template_json"]) if rec["template_json"] else {}
            prompt, response = candidate_prompt(rec), rec["response"]
            completion = [{"role": "assistant", "content": response}] if is_messages(prompt) else response
            try:
                ids = tokenize_unpaired_row(self.tokenizer, {**template, "prompt": prompt, "completion": completion})
                ids = self.truncation.cut_unpaired(ids)
                seqs.append(self.truncation.scored_sequence(ids["prompt_ids"], ids["completion_ids"]))
            except RowRejected as e:
                errors[keys[-1]] = f"{e.reason}: {e.detail}"
                seqs.append(None)
        good = [s for s in seqs if s is not None]
        pi = iter(self.policy.score_sequences(good) if good else [])
        ref = iter(self.reference.score_sequences(good) if good else [])
        return score_rows(keys, [None if s is None else self.beta * (next(pi) - next(ref)) for s in seqs], errors)


def select_pairs(scores: dict[int, float], mode: str, min_margin: float,
                 rng: random.Random) -> tuple[list[tuple[int, int]], dict[int, tuple[str, str]]]:
    """One prompt's usable candidates {response index: score} -> (pairs as (chosen, rejected) indices,
    {left-out index: (reason, detail)}). A pair needs a score difference above 0 and at least min_margin."""
    order = sorted(scores, key=lambda i: (-scores[i], i))  # best first; equal scores: the earlier response
    if len(order) < 2:
        return [], {i: ("single_response", "only one usable response for this prompt") for i in order}

    def apart(a: int, b: int) -> bool:
        margin = scores[a] - scores[b]
        return margin > 0 and margin >= min_margin

    def tie_detail(a: int, b: int) -> str:
        return (f"score difference {scores[a] - scores[b]:.6g} between responses {a} and {b} is below "
                f"--min-margin {min_margin:g}" if scores[a] != scores[b] else f"responses {a} and {b} score the same")

    if mode == "all":
        pairs = [(a, b) for a in order for b in order if apart(a, b)]
        used = {i for p in pairs for i in p}
        best = order[0]
        return pairs, {i: ("tie", "no other response scores apart from it by --min-margin "
                                  f"(best {best}: {scores[best]:.6g}, this: {scores[i]:.6g})")
                       for i in order if i not in used}
    if mode == "random":
        a, b = sorted(rng.sample(order, 2), key=lambda i: (-scores[i], i))
    else:  # best-worst
        a, b = order[0], order[-1]
    if not apart(a, b):
        return [], {i: ("tie", tie_detail(a, b)) for i in order}
    return [(a, b)], {i: ("not_selected", f"{mode}: responses {a} and {b} were paired") for i in order
                      if i not in (a, b)}
