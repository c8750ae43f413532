"""Generation: the dense KV cache against recomputing the prefix, batched sampling against one-prompt-at-a-time
greedy decoding, stop tokens / strings, nucleus sampling, and DeepSeek-V3 through its latent cache."""
from __future__ import annotations

import pytest
import torch

from framework.config import ModelConfig
from framework.models.dense import DenseLM
from framework.rl.sampling import pick_next, sample
from framework.rl.task import CharTokenizer


def dense(vocab: int = 40, **kw) -> DenseLM:
    torch.manual_seed(0)
    cfg = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
               max_position_embeddings=64, initializer_range=0.3)  # large init: peaked, prompt-dependent logits
    cfg.update(kw)
    return DenseLM(ModelConfig(**cfg)).eval()


def greedy_reference(model, prompt: list[int], n: int, eos: int | None = None) -> list[int]:
    """The plainest loop: full forward over the whole sequence, argmax, append."""
    seq = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([seq]))[0, -1].argmax())
            out.append(nxt)
            seq.append(nxt)
            if nxt == eos:
                break
    return out


def test_dense_decode_with_cache_equals_forward():
    """Prefill, chunked prefill (several new tokens against a non-empty cache: needs the offset causal mask) and
    single-token steps give forward()'s logits."""
    model = dense()
    ids = torch.randint(0, 40, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids)
        caches = model.new_caches()
        got = torch.cat([model.decode(ids[:, :7], 0, caches), model.decode(ids[:, 7:12], 7, caches)]
                        + [model.decode(ids[:, t:t + 1], t, caches) for t in range(12, 20)], dim=1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="start_pos"):
        model.decode(ids[:, :1], 3, model.new_caches())


def test_kv_cache_greedy_equals_no_cache_and_per_prompt_reference():
    model = dense()
    prompts = [[1, 5, 7], [2, 9, 9, 3, 4], [1, 5, 8], [6]]  # three lengths: decoded in separate batches
    with_cache = sample(model, prompts, 2, 12, temperature=0.0)
    no_cache = sample(model, prompts, 2, 12, temperature=0.0, use_cache=False)
    assert with_cache.completion_ids == no_cache.completion_ids
    assert with_cache.prompt_index == [0, 0, 1, 1, 2, 2, 3, 3]
    for r, i in enumerate(with_cache.prompt_index):
        assert with_cache.completion_ids[r] == greedy_reference(model, prompts[i], 12)
        assert with_cache.prompt_ids[r] == prompts[i]
    assert with_cache.stats["new_tokens"] == 8 * 12 and with_cache.stats["tokens_per_s"] > 0


def test_stop_token_and_stop_strings_end_rows_and_finished_rows_are_dropped():
    tok = CharTokenizer()
    model = dense(vocab=tok.vocab_size)
    prompts = [[tok.bos_id] + tok.encode(p) for p in ("12+3=", "7+45=", "1+1=")]
    free = sample(model, prompts, 1, 20, temperature=0.0)
    # choose as "stop" the token each greedy row emits at step 3 / a two-character string it emits at steps 2-3
    eos = free.completion_ids[0][3]
    s = sample(model, prompts, 1, 20, temperature=0.0, eos_id=eos)
    ref = [greedy_reference(model, p, 20, eos) for p in prompts]
    assert s.completion_ids == ref
    assert s.finished == [c[-1] == eos for c in ref] and s.finished[0]
    stop = tok.decode(free.completion_ids[1][2:4], keep_special=True)
    s2 = sample(model, prompts, 1, 20, temperature=0.0, stop_strings=[stop],
                decode=lambda ids: tok.decode(ids, keep_special=True))
    for c, full, fin in zip(s2.completion_ids, free.completion_ids, s2.finished):
        text = tok.decode(c, keep_special=True)
        assert full[:len(c)] == c                                     # the same tokens, cut at the stop
        if fin:
            assert stop in text and stop not in tok.decode(c[:-1], keep_special=True)
        else:
            assert len(c) == 20 and stop not in text
    assert s2.finished[1] and len(s2.completion_ids[1]) == 4


def test_sampling_is_seeded_and_checks_limits():
    model = dense()
    a = sample(model, [[1, 2], [3]], 4, 10, temperature=1.0, generator=torch.Generator().manual_seed(5))
    b = sample(model, [[1, 2], [3]], 4, 10, temperature=1.0, generator=torch.Generator().manual_seed(5))
    assert a.completion_ids == b.completion_ids
    assert len({tuple(c) for c in a.completion_ids}) > 1               # temperature 1: the samples differ
    with pytest.raises(ValueError, match="max_position_embeddings"):
        sample(model, [[1] * 60], 1, 10)
    with pytest.raises(ValueError, match="top_p"):
        sample(model, [[1]], 1, 3, top_p=0.0)


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    probs = torch.tensor([[0.05, 0.4, 0.3, 0.2, 0.05]], dtype=torch.float64)
    logits = probs.log().repeat(4000, 1)
    gen = torch.Generator().manual_seed(0)
    got = pick_next(logits, 1.0, 0.65, gen)                            # nucleus {1, 2}: 0.4 + 0.3 >= 0.65
    assert set(got.tolist()) == {1, 2}
    frac = (got == 1).double().mean().item()
    assert abs(frac - 0.4 / 0.7) < 0.03                                # renormalized inside the nucleus
    assert set(pick_next(logits[:10], 1.0, 0.4, gen).tolist()) == {1}  # the top token alone reaches 0.4
    assert pick_next(logits[:3], 0.0, 1.0).tolist() == [1, 1, 1]       # temperature 0: argmax


def test_deepseek_v3_sampling_with_latent_cache_equals_no_cache():
    from tests.framework.models.test_deepseek_v3 import tiny

    from framework.models.deepseek_v3 import DeepSeekV3
    from framework.models.deepseek_v3.balance import routers

    torch.manual_seed(0)
    model = DeepSeekV3(tiny(num_nextn_predict_layers=0, vocab_size=40)).eval()
    loads = [r.load.clone() for r in routers(model)]
    prompts = [[1, 5, 7], [2, 9, 9, 3], [1, 5, 8]]
    a = sample(model, prompts, 2, 8, temperature=0.0)
    b = sample(model, prompts, 2, 8, temperature=0.0, use_cache=False)
    assert a.completion_ids == b.completion_ids
    for r, before in zip(routers(model), loads):                       # sampling leaves balancing statistics alone
        assert torch.equal(r.load, before)
    for r, i in enumerate(a.prompt_index):
        assert a.completion_ids[r] == greedy_reference(model, prompts[i], 8)
