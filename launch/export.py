"""Write a training checkpoint as a Hugging Face DeepSeek-V3 folder.

  python -m launch.export <run>/checkpoints/step_N <out>

<out> receives config.json, model.safetensors (hub layout: per-expert weights, MTP depths as layers L..L+D-1) and
the tokenizer files of the run's data.tokenizer (or rl.tokenizer; or the BPE the run trained, looked up in its data
cache with its data settings, plus a tokenizer_config.json naming <|endoftext|> as EOS), so
`framework.models.from_pretrained(<out>)`, transformers and `model.init_from=<out> data.tokenizer=<out>` read it.
Training layouts export as they are: checkpoint tensors are keyed by the model's fully-qualified names (pipeline
parts, DualPipe's two copies and data-parallel replicas write each name once; ZeRO shards hold optimizer state, which
is not exported), read through framework.checkpoint, which checks the folder before anything is read. Expert-parallel
runs store each rank's slice of the stacked experts under its own key (`...@experts4-8`); they are stacked back here.
The folder is written under a temporary name and renamed when complete. Exit status 2 on bad input, in one line.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import tempfile
from pathlib import Path

USAGE = "usage: python -m launch.export <run>/checkpoints/step_N <out folder>"


def model_config_of(meta: dict, where: str):
    """The checkpoint's ModelConfig: launch.rl stores it as 'model', launch.train inside the resolved 'config'."""
    from framework.config import ModelConfig

    fields = meta.get("model") or (meta.get("config") or {}).get("model")
    if not isinstance(fields, dict):
        raise ValueError(f"{where}: its meta.json holds no model configuration (not a duet checkpoint?)")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    cfg = ModelConfig(**{k: v for k, v in fields.items() if k in known})
    if cfg.name != "deepseek_v3":
        raise ValueError(f"{where}: model.name={cfg.name!r}; export writes the Hugging Face DeepSeek-V3 layout, "
                         f"allowed: deepseek_v3")
    return cfg


def tokenizer_files(meta: dict) -> list[Path]:
    """The run's tokenizer files: data.tokenizer, else a Hugging Face rl.tokenizer, else the BPE the run trained on
    its corpus (found in the data cache: the folder the run itself read); [] for the char tokenizer."""
    from framework.data.hf_tokenizer import load_tokenizer

    config = meta.get("config") or {}
    data = config.get("data") or {}
    rl_tok = meta.get("tokenizer") or (config.get("rl") or {}).get("tokenizer")
    for key, path in (("data.tokenizer", data.get("tokenizer")), ("rl.tokenizer", rl_tok)):
        if path and path != "char":
            return load_tokenizer(path, key).files
    if "stage" in meta or not data:   # launch.rl with the char tokenizer: no tokenizers file to give
        return []
    from framework.data.prepare import prepare
    prepared = prepare(data.get("path"), data.get("cache_dir", "data/cache"), data["vocab_size"],
                       data["val_fraction"], data["max_bytes"], data.get("dtype", "auto"))
    return [prepared.tokenizer] if prepared.tokenizer.is_file() else []


def bpe_tokenizer_config() -> dict:
    """tokenizer_config.json of the BPE trained by framework.data.prepare: documents end with <|endoftext|>."""
    from framework.data.prepare import EOT
    return {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOT, "bos_token": None, "pad_token": EOT,
            "add_bos_token": False, "add_eos_token": False}


def model_tensors(model, stored) -> dict:
    """{checkpoint key: tensor of the full model to load it into}. An expert-parallel run stored each rank's slice of
    a stacked expert tensor under its own key (framework.checkpoint.expert_slice_key): those load into views."""
    from framework.checkpoint import EXPERT_SLICE, CheckpointError

    slices: dict[str, list[tuple[int, int, str]]] = {}
    for key in stored:
        m = EXPERT_SLICE.match(key)
        if m:
            slices.setdefault(m["name"], []).append((int(m["start"]), int(m["stop"]), key))
    out = {}
    for name, t in model.state_dict().items():
        key = f"model/{name}"
        if key in stored or key not in slices:
            out[key] = t
            continue
        covered = sorted(slices[key])
        if [a for a, _, _ in covered] != [0] + [b for _, b, _ in covered[:-1]] or covered[-1][1] != t.shape[0]:
            raise CheckpointError(f"checkpoint: {name}: expert slices {[(a, b) for a, b, _ in covered]} do not cover "
                                  f"its {t.shape[0]} experts")
        out.update({k: t[a:b] for a, b, k in covered})
    return out


def export(checkpoint: str | Path, out: str | Path) -> Path:
    import torch

    from framework.checkpoint import Checkpointer, read_metadata
    from framework.models import build_model, save_pretrained

    checkpoint, out = Path(checkpoint), Path(out)
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"checkpoint={str(checkpoint)!r}: no such folder (expected <run>/checkpoints/step_N)")
    meta = Checkpointer.verify(checkpoint)
    cfg = model_config_of(meta, str(checkpoint))
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"out={str(out)!r}: exists and is not empty (choose a new folder)")
    dtype = {"bfloat16": torch.bfloat16}.get(((meta.get("config") or {}).get("train") or {}).get("dtype"),
                                             torch.float32)
    model = build_model(cfg).to(dtype)
    Checkpointer.load(checkpoint, model_tensors(model, read_metadata(checkpoint).state_dict_metadata))
    files = tokenizer_files(meta)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        save_pretrained(model, str(tmp))
        for f in files:
            shutil.copy(f, tmp / ("tokenizer.json" if f is files[0] else f.name))
        if len(files) == 1 and not (files[0].parent / "tokenizer_config.json").is_file():
            (tmp / "tokenizer_config.json").write_text(json.dumps(bpe_tokenizer_config(), indent=1))
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or any(a.startswith("-") for a in args):
        print(USAGE, file=sys.stderr)
        sys.exit(2)
    import warnings

    from framework.checkpoint import CheckpointError

    warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # one process reads: expected
    try:
        out = export(args[0], args[1])
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    print(f"exported {args[0]} -> {out}")


if __name__ == "__main__":
    main()
