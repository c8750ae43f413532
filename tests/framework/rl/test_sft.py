"""SFT data: labels cover only completion tokens (prompt and padding are -100), packing keeps examples whole, the
loss equals a float64 cross entropy over completion tokens alone, chat / JSONL inputs, and a short run learns."""
from __future__ import annotations

import json
import math

import pytest
import torch

from framework.config import ModelConfig, OptimConfig
from framework.models.dense import DenseLM
from framework.rl.config import RLConfig
from framework.rl.sft import IGNORE, encode_example, example_labels, pack_examples, run_sft
from framework.rl.task import ArithmeticTask, CharTokenizer, chat_to_pair, load_jsonl


def test_labels_mask_the_prompt_and_keep_completion_and_eos():
    tok = CharTokenizer()
    ids, start = encode_example(tok, "12+3=", "<answer>15</answer>")
    assert ids == [tok.bos_id] + tok.encode("12+3=") + tok.encode("<answer>15</answer>") + [tok.eos_id]
    assert start == 6 and len(ids) == 6 + 4 + 1
    labels = example_labels(ids, start)
    # position t predicts ids[t+1]: targets exist from the position before the first completion token
    assert labels == [IGNORE] * 5 + ids[6:] + [IGNORE]
    assert tok.decode([l for l in labels if l != IGNORE], keep_special=True) == "<answer>15</answer><eos>"


def test_packing_keeps_examples_whole_and_pads_with_ignore():
    tok = CharTokenizer()
    enc = [encode_example(tok, p, c) for p, c in [("1+1=", "2"), ("10+5=", "15"), ("7+8=", "<answer>15</answer>"),
                                                   ("9+9=" * 10, "18")]]
    ids, labels, cut = pack_examples(enc, 16, tok.pad_id, pack=True)
    lens = [len(e[0]) for e in enc]                                     # a tag is one token
    assert lens == [7, 9, 10, 44] and cut == 1
    assert ids.shape == (3, 16)                                         # [7 + 9], [10 + pad], [44 cut to 16]
    assert ids[0].tolist() == enc[0][0] + enc[1][0]
    assert labels[0].tolist() == example_labels(*enc[0]) + example_labels(*enc[1])
    assert ids[1].tolist() == enc[2][0] + [tok.pad_id] * 6 and labels[1].tolist()[10:] == [IGNORE] * 6
    assert labels[1].tolist()[:10] == example_labels(*enc[2])
    assert ids[2].tolist() == enc[3][0][:16] and (labels[2] == IGNORE).all()   # the cut example lost its answer
    one, one_lab, _ = pack_examples(enc[:3], 16, tok.pad_id, pack=False)
    assert one.shape == (3, 16) and one[0, :7].tolist() == enc[0][0] and (one_lab[0, 7:] == IGNORE).all()
    # labels are never set on prompt tokens: every target is a completion token or <eos>
    for row_ids, row_lab in zip(ids.tolist(), labels.tolist()):
        for t, l in enumerate(row_lab):
            if l != IGNORE:
                assert row_ids[t + 1] == l


def test_loss_is_cross_entropy_over_completion_tokens_only():
    tok = CharTokenizer()
    torch.manual_seed(0)
    model = DenseLM(ModelConfig(vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=32, max_position_embeddings=64)).double()
    enc = [encode_example(tok, p, c) for p, c in [("12+3=", "<think></think><answer>15</answer>"), ("4+4=", "8")]]
    ids, labels, _ = pack_examples(enc, 32, tok.pad_id, pack=True)
    loss, _ = model.compute_loss(ids, labels)
    with torch.no_grad():
        logp = torch.log_softmax(model(ids), -1)
    terms = [-logp[i, t, labels[i, t]].item() for i in range(ids.shape[0]) for t in range(ids.shape[1])
             if labels[i, t] != IGNORE]
    assert len(terms) == sum(len(e[0]) - e[1] for e in enc)            # completion tokens + one <eos> each
    assert loss.item() == pytest.approx(math.fsum(terms) / len(terms), rel=1e-6)   # the loss runs in float32


def test_jsonl_pairs_and_chats(tmp_path):
    f = tmp_path / "d.jsonl"
    rows = [{"prompt": "1+1=", "completion": "2"},
            {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"},
                          {"role": "assistant", "content": "4"}]}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    got = load_jsonl(f)
    assert got[0] == rows[0]
    assert got[1] == {"prompt": "system: be brief\nuser: 2+2?\nassistant: ", "completion": "4",
                      "messages": rows[1]["messages"][:2]}   # for a tokenizer's chat template
    f.write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"d\.jsonl:1: expected"):
        load_jsonl(f)
    with pytest.raises(ValueError, match="last message must be the assistant"):
        chat_to_pair([{"role": "user", "content": "hi"}], "x")
    with pytest.raises(FileNotFoundError, match="rl.sft_data"):
        load_jsonl(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="not in the char tokenizer"):
        CharTokenizer().encode("naïve")


def test_short_sft_run_learns_the_format():
    tok = CharTokenizer()
    torch.manual_seed(0)
    model = DenseLM(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=64))
    rl = RLConfig(sft_steps=40, sft_batch_size=8, sft_seq_len=64, sft_lr=1e-2)
    data = ArithmeticTask(1, 2).sft_examples(200, 0, 0.3, 0.1)
    hist = run_sft(model, tok, data, rl, OptimConfig(warmup_steps=5), None, log_every=0)
    first, last = hist[0]["sft/loss"], sum(h["sft/loss"] for h in hist[-5:]) / 5
    assert first > 3.0 and last < 0.6 * first, (first, last)          # ln(V) ~ 4.6 at the start
    assert hist[-1]["sft/lr"] < hist[5]["sft/lr"]                       # the cosine schedule ran
