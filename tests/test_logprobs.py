"""The shared log-prob function against the exact oracle, and its independence from batching."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import make_tiny_model
from oracle import exact_logps

from stages.core.config.options import TrainConfig
from stages.core.scoring.logprobs import scored_logps, sequence_logps, token_logps
from stages.core.scoring.packing import pack_rows, pad_batch, pair_rows
from stages.core.scoring.truncation import Truncation
from stages.core.training.policy_pass import forward, pass_context

# What pass_context reads of a manifest: its kind and its truncation (here: none).
NO_TRUNCATION = SimpleNamespace(kind="paired", truncation=Truncation(None))


def test_token_logps_hand_computed():
    # logits [0, ln 3] -> softmax [1/4, 3/4]; label 1 -> ln(3/4), label 0 -> ln(1/4)
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, math.log(3.0)]])
    out = token_logps(logits, torch.tensor([1, 0]))
    assert torch.allclose(out, torch.tensor([math.log(0.75), math.log(0.25)], dtype=torch.float64), atol=1e-7)


def test_token_logps_is_float64_for_bf16_logits():
    logits = torch.randn(3, 11).to(torch.bfloat16)
    assert token_logps(logits, torch.tensor([0, 5, 10])).dtype == torch.float64


def _random_sequences(n, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for _ in range(n):
        length = int(torch.randint(3, 40, (1,), generator=g))
        start = int(torch.randint(1, length, (1,), generator=g))
        seqs.append((torch.randint(0, vocab, (length,), generator=g).tolist(), start))
    return seqs


@pytest.fixture(scope="module")
def model(tokenizer):
    return make_tiny_model(tokenizer, seed=1)


def test_matches_exact_unpadded_forward(model, tokenizer):
    seqs = _random_sequences(12, len(tokenizer))
    ids, mask, comp = pad_batch([s for s, _ in seqs], [st for _, st in seqs], tokenizer.pad_token_id)
    with torch.no_grad():
        got = sequence_logps(model, ids, mask, comp, chunk_size=7)
    want = torch.tensor([exact_logps(model, s, st) for s, st in seqs], dtype=torch.float64)
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


def _softcapped_model(tokenizer):
    """A tiny Gemma2: its logits are tanh-softcapped after the LM head, so a plain head is wrong."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(7)
    config = Gemma2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, final_logit_softcapping=0.1,
                          pad_token_id=tokenizer.pad_token_id, attn_implementation="eager")
    return Gemma2ForCausalLM(config).eval()


def test_custom_lm_head_takes_the_full_logits_path(tokenizer):
    """A model whose logits are post-processed (softcapping) is detected and scored through its
    own full forward: the oracle's numbers, not those of a plain lm_head(hidden)."""
    import stages.core.scoring.logprobs as lp

    model = _softcapped_model(tokenizer)
    assert not lp._has_plain_head(model) and lp._has_plain_head(make_tiny_model(tokenizer))
    seqs = _random_sequences(5, len(tokenizer), seed=3)
    ids, mask, comp = pad_batch([s for s, _ in seqs], [st for _, st in seqs], tokenizer.pad_token_id)
    with torch.no_grad():
        got = sequence_logps(model, ids, mask, comp)
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        plain = torch.log_softmax(model.lm_head(hidden)[:, :-1].double(), -1)
        plain = (plain.gather(-1, ids[:, 1:, None]).squeeze(-1) * comp[:, 1:]).sum(1)
    want = torch.tensor([exact_logps(model, s, st) for s, st in seqs], dtype=torch.float64)
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    assert (plain - want).abs().max() > 0.1  # without the softcap the numbers would be far off


def test_independent_of_batch_composition(model, tokenizer):
    seqs = _random_sequences(10, len(tokenizer), seed=5)
    target = seqs[0]
    alone = sequence_logps(model, *pad_batch([target[0]], [target[1]], tokenizer.pad_token_id))[0]
    for others in (seqs[1:3], seqs[3:10]):
        batch = [target, *others]
        with torch.no_grad():
            got = sequence_logps(model, *pad_batch([s for s, _ in batch], [st for _, st in batch],
                                                   tokenizer.pad_token_id))[0]
        assert abs(float(got) - float(alone)) < 1e-4


def test_gradients_flow_for_training(model, tokenizer):
    seqs = _random_sequences(2, len(tokenizer), seed=7)
    m = make_tiny_model(tokenizer, seed=2).train()
    out = sequence_logps(m, *pad_batch([s for s, _ in seqs], [st for _, st in seqs], tokenizer.pad_token_id))
    out.sum().backward()
    assert m.get_output_embeddings().weight.grad is not None
    assert m.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_no_scored_tokens_gives_zero(model, tokenizer):
    ids, mask, comp = pad_batch([[1, 2, 3]], [3], tokenizer.pad_token_id)  # start == length: nothing scored
    assert float(sequence_logps(model, ids, mask, comp)[0]) == 0.0


def _random_pairs(tokenizer, n, seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda lo, hi: torch.randint(0, len(tokenizer), (int(torch.randint(lo, hi, (1,), generator=g)),),  # noqa: E731
                                     generator=g).tolist()
    return [(r(1, 30), r(1, 20), r(1, 25)) for _ in range(n)]


@pytest.mark.parametrize("max_length,mode", [(None, "keep_start"), (24, "keep_start"), (24, "keep_end")])
def test_packed_prompt_sharing_matches_separate_sequences(model, tokenizer, max_length, mode):
    """Every pair laid out by pair_rows (shared prompt, or two rows where keep_end cut the prompt
    differently) scores what the unpadded oracle gives for TRL's truncated sequences."""
    pairs = _random_pairs(tokenizer, 7, seed=11)
    truncation = Truncation(max_length, mode=mode)
    rows = [row for j, (p, c, rj) in enumerate(pairs) for row in pair_rows(j, p, c, rj, truncation)]
    if max_length is None:
        assert len(rows) == len(pairs)  # one row per pair: the prompt runs once
    if mode == "keep_end":
        assert len(rows) > len(pairs)  # some prompts were cut differently for the two answers
    inputs, r, c, labels, seq_ids = pack_rows(rows, tokenizer.pad_token_id, torch.float32)
    with torch.no_grad():
        packed = scored_logps(model, inputs, r, c, labels, seq_ids, 2 * len(pairs))
    for j, (p, ch, rj) in enumerate(pairs):
        for k, answer in enumerate((ch, rj)):
            seq, start = Truncation(max_length, mode=mode).scored_sequence(p, answer)
            assert abs(float(packed[2 * j + k]) - exact_logps(model, seq, start)) < 1e-4, (j, k)


def test_packed_training_forward_same_loss_and_gradients_as_padded(tokenizer):
    """Training with the prompt run once per pair gives the padded path's log-probs and gradients."""
    pairs = [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in _random_pairs(tokenizer, 3, 17)]
    packed, padded = (pass_context(TrainConfig(pack_prompts=pack), NO_TRUNCATION, tokenizer.pad_token_id, "cpu")
                      for pack in (True, False))
    packed_model, padded_model = make_tiny_model(tokenizer, seed=6).train(), make_tiny_model(tokenizer, seed=6).train()
    pc, pr, packed_tokens = forward(packed_model, pairs, packed)
    qc, qr, padded_tokens = forward(padded_model, pairs, padded)
    assert torch.allclose(pc, qc, atol=1e-4) and torch.allclose(pr, qr, atol=1e-4)
    assert packed_tokens == sum(len(p) + len(c) + len(r) for p, c, r in
                                ((x["prompt_ids"], x["chosen_ids"], x["rejected_ids"]) for x in pairs))
    assert packed_tokens < padded_tokens
    (pc - pr).sigmoid().log().sum().backward()
    (qc - qr).sigmoid().log().sum().backward()
    for (name, a), (_, b) in zip(packed_model.named_parameters(), padded_model.named_parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-4), name


def test_training_path_same_values_and_gradients_as_plain_logits(tokenizer):
    """The chunked, recomputed LM head gives the plain full-logits values and gradients."""
    seqs = _random_sequences(3, len(tokenizer), seed=13)
    ids, mask, comp = pad_batch([s for s, _ in seqs], [st for _, st in seqs], tokenizer.pad_token_id)
    fast_model, plain_model = make_tiny_model(tokenizer, seed=5).train(), make_tiny_model(tokenizer, seed=5).train()
    fast = sequence_logps(fast_model, ids, mask, comp, chunk_size=5)
    logits = plain_model(input_ids=ids, attention_mask=mask).logits[:, :-1].double()
    per_token = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    plain = (per_token * comp[:, 1:]).sum(1)
    assert torch.allclose(fast, plain, atol=1e-4)
    fast.sum().backward()
    plain.sum().backward()
    for (name, a), (_, b) in zip(fast_model.named_parameters(), plain_model.named_parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-4), name
