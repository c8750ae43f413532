"""Build the token cache for a data config (the default: the embedded stdlib corpus).

  python -m launch.prepare_data [data.path=... data.vocab_size=...]
"""
from __future__ import annotations

import sys

from launch.train import _one_line, check_overrides


def main() -> None:
    from framework.data.sources import validate_sources

    try:
        cfg = check_overrides(sys.argv[1:])
        validate_sources(cfg.data)
    except Exception as e:
        print(f"config error: {_one_line(e)}", file=sys.stderr)
        sys.exit(2)
    from framework.config import ConfigError, validate_data
    from framework.data.prepare import prepare

    d = cfg.data
    try:
        validate_data(d)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    try:
        p = prepare(d.path, d.cache_dir, d.vocab_size, d.val_fraction, d.max_bytes, d.dtype, d.tokenizer,
                    d.text_field, d.mix)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"data ready: {p.folder} (vocab {p.vocab_size}, {p.dtype})")


if __name__ == "__main__":
    main()
