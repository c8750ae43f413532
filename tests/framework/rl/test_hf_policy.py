"""Post-training a Hugging Face model: launch.rl with model.init_from and rl.tokenizer=<tokenizer folder>.

The prompts go through the folder's chat template (checked token for token against the template rendered by hand
and the tokenizers library); SFT's first loss equals the same SFT step on `from_pretrained`; GRPO runs on the same
rewards; the checkpoint exports to a Hugging Face folder with the tokenizer files.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from tests.conftest import compose_cfg
from tests.framework.hf_folder import BOS, EOS, documents, make_model_folder, make_tokenizer

warnings.filterwarnings("ignore", message="torch.distributed is disabled")


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    from framework.data.hf_tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("hf_rl")
    make_tokenizer(root / "tok", documents(30) + ["12+34=<think>4+2=6</think><answer>46</answer>"] * 20)
    make_model_folder(root / "model", load_tokenizer(str(root / "tok")).vocab_size)
    return root


def test_prompts_use_the_chat_template(hf):
    from tokenizers import Tokenizer

    from framework.rl.sft import encode_example
    from framework.rl.task import build_tokenizer, chat_to_pair

    tok = build_tokenizer(str(hf / "tok"))
    lib = Tokenizer.from_file(str(hf / "tok" / "tokenizer.json"))
    enc = lambda s: lib.encode(s, add_special_tokens=False).ids  # noqa: E731
    ids, start = encode_example(tok, "12+34=", "<answer>46</answer>")
    head = enc(f"{BOS}<|user|>\n12+34=\n<|assistant|>\n")
    assert head[0] == lib.token_to_id(BOS)   # the template's BOS is the special token, not its letters
    assert ids == head + enc("<answer>46</answer>") + [lib.token_to_id(EOS)] and start == len(head)
    pair = chat_to_pair([{"role": "system", "content": "Add."}, {"role": "user", "content": "1+2="},
                         {"role": "assistant", "content": "3"}], "x")
    ids, start = encode_example(tok, pair["prompt"], pair["completion"], pair["messages"])
    assert ids[:start] == enc(f"{BOS}<|system|>\nAdd.\n<|user|>\n1+2=\n<|assistant|>\n")
    assert tok.decode(ids[start:]) == "3"
    # transformers renders the template the same way
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoTokenizer.from_pretrained(str(hf / "tok"))
    for turns in ([{"role": "user", "content": "12+34="}], pair["messages"]):
        assert tok.render_chat(turns, add_generation_prompt=True) == \
            theirs.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)


def test_sft_and_grpo_from_a_hugging_face_folder(hf, tmp_path):
    from framework.models import from_pretrained
    from framework.rl.sft import run_sft
    from framework.rl.task import ArithmeticTask, build_tokenizer
    from launch.export import export
    from launch.rl import load_policy, post_train, with_defaults
    from parallel.mesh import init_mesh

    args = with_defaults([f"model.init_from={hf / 'model'}", f"rl.tokenizer={hf / 'tok'}", "rl.sft_steps=1",
                          "rl.grpo_steps=1", "rl.prompts_per_step=2", "rl.group_size=2", "rl.eval_problems=2",
                          "rl.sft_examples=40", "rl.sft_batch_size=4", "rl.sft_seq_len=64", "rl.max_new_tokens=6",
                          "logging.wandb.mode=disabled"])
    cfg = compose_cfg(*args)
    assert cfg.model.name == "deepseek_v3"   # the folder's architecture, not launch.rl's tiny dense default
    cfg.train.output_dir = str(tmp_path / "run")
    summary = post_train(cfg, init_mesh(1, 1, 1, "cpu"))
    # the same SFT step on from_pretrained's model: the same loss, bit for bit
    rl, t = cfg.rl, cfg.train
    task = ArithmeticTask.from_config(rl)
    examples = task.sft_examples(rl.sft_examples, t.seed, rl.sft_reason_fraction, rl.sft_bad_format_fraction,
                                 rl.sft_wrong_fraction)
    torch.manual_seed(t.seed)
    ref = run_sft(from_pretrained(str(hf / "model")), build_tokenizer(rl.tokenizer), examples, rl, cfg.optim, None,
                  seed=t.seed, log_every=0)
    assert summary["sft"]["final_loss"] == ref[0]["sft/loss"]
    assert summary["grpo"]["rounds"] == 1 and summary["grpo"]["reward_errors"] == {"accuracy": 0, "format": 0}
    # the post-trained policy exports to a Hugging Face folder, exactly, with its tokenizer
    ckpt = sorted((tmp_path / "run" / "checkpoints").glob("step_*"))[-1]
    out = export(ckpt, tmp_path / "export")
    policy, _, _ = load_policy(ckpt)
    back = from_pretrained(str(out)).state_dict()
    assert all(torch.equal(v, back[k]) for k, v in policy.state_dict().items())
    assert (Path(out) / "tokenizer.json").read_bytes() == (hf / "tok" / "tokenizer.json").read_bytes()
