"""A small Hugging Face DeepSeek-V3 folder and tokenizer, built locally (no network): the user's "own model"."""
from __future__ import annotations

import json
from pathlib import Path

import torch

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
# a template in the usual shape: BOS, then "<|role|>\ncontent" turns, generation prompt for the assistant
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
                 "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def make_tokenizer(folder: Path, texts: list[str], vocab_size: int = 384, add_bos: bool = True) -> Path:
    """A byte-level BPE trained on `texts`, saved as tokenizer.json + tokenizer_config.json (transformers' layout)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"__type": "AddedToken", "content": BOS, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True}, "eos_token": EOS, "pad_token": PAD,
        "add_bos_token": add_bos, "add_eos_token": False, "chat_template": CHAT_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast"}))
    return folder


def make_model_folder(folder: Path, vocab_size: int, seed: int = 7, **kw) -> Path:
    """Random DeepSeek-V3 weights (far from the default init, so a wrong mapping shows) in the hub layout."""
    from framework.config import ModelConfig
    from framework.models import save_pretrained
    from framework.models.deepseek_v3 import DeepSeekV3

    fields = dict(name="deepseek_v3", vocab_size=vocab_size, hidden_size=32, num_hidden_layers=4,
                  num_attention_heads=2, intermediate_size=64, max_position_embeddings=64, q_lora_rank=16,
                  kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_routed_experts=4,
                  n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=16, first_k_dense_replace=1,
                  n_group=2, topk_group=1, num_nextn_predict_layers=1)
    fields.update(kw)
    torch.manual_seed(seed)
    model = DeepSeekV3(ModelConfig(**fields))
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.normal_(1.0, 0.1) if "norm" in n else p.normal_(0.0, 0.08)
        for n, b in model.named_buffers():
            if "bias" in n and b.is_floating_point():
                b.normal_(0.0, 0.05)
    save_pretrained(model, str(folder))
    return folder


def documents(n: int = 60) -> list[str]:
    """Deterministic documents of varied length (the stdlib's first sources, cut into pieces)."""
    from framework.data.corpus import stdlib_files

    docs = []
    for f in stdlib_files():
        text = f.read_text(errors="replace")
        for i in range(0, min(len(text), 6000), 1500):
            if text[i:i + 1500].strip():
                docs.append(text[i:i + 1500])
        if len(docs) >= n:
            return docs[:n]
    return docs
