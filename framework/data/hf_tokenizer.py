"""A Hugging Face tokenizer used as it is: tokenizer.json through the `tokenizers` library, special tokens and the
chat template from tokenizer_config.json (transformers' layout, so any hub folder works without transformers).

Documents are encoded without the post-processor's additions (`add_special_tokens=False`) and framed explicitly:
BOS first when tokenizer_config.json says add_bos_token, EOS last always (it separates documents in the token
stream, as <|endoftext|> does for the BPE trained here).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

# files of a tokenizer folder that travel with an exported model
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "generation_config.json")


def _token_text(value) -> Optional[str]:
    """tokenizer_config.json writes a special token as a string or as an AddedToken dict {content, ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


@dataclass
class HFTokenizer:
    tok: object                            # tokenizers.Tokenizer
    source: Path                           # the folder (or tokenizer.json) it was read from
    bos_id: Optional[int]
    eos_id: int
    pad_id: int
    add_bos: bool
    chat_template: Optional[str] = None
    files: list[Path] = field(default_factory=list)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def fingerprint(self) -> str:
        """Changes whenever the encoding could: the bytes of every tokenizer file."""
        h = hashlib.sha256()
        for f in self.files:
            h.update(f.name.encode() + b"\0" + f.read_bytes())
        return h.hexdigest()[:16]

    # -- text <-> ids ------------------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_documents(self, texts: list[str]) -> list[list[int]]:
        """[BOS] text EOS per document."""
        head = [self.bos_id] if self.add_bos and self.bos_id is not None else []
        return [head + e.ids + [self.eos_id] for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids, keep_special: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=not keep_special)

    # -- chat ---------------------------------------------------------------------------------------------------------
    def render_chat(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """The chat template applied to messages (Jinja in a sandbox, with transformers' variables)."""
        if not self.chat_template:
            raise ValueError(f"tokenizer {str(self.source)!r}: no chat_template in tokenizer_config.json or "
                             f"chat_template.jinja")
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        special = {"bos_token": self._text(self.bos_id), "eos_token": self._text(self.eos_id),
                   "pad_token": self._text(self.pad_id)}
        return env.from_string(self.chat_template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                          **special)

    def encode_prompt(self, text: str, messages: Optional[list[dict]] = None) -> list[int]:
        """A prompt as the model's user turn (or the chat `messages` as they are), ready for the assistant's answer;
        special tokens in the rendered template, such as BOS, are parsed as such. Without a template: [BOS] text."""
        if self.chat_template:
            turns = messages if messages else [{"role": "user", "content": text}]
            rendered = self.render_chat(list(turns), add_generation_prompt=True)
            return self.tok.encode(rendered, add_special_tokens=False).ids
        head = [self.bos_id] if self.bos_id is not None else []
        return head + self.encode(text)

    def _text(self, token_id: Optional[int]) -> str:
        return "" if token_id is None else (self.tok.id_to_token(token_id) or "")


def load_tokenizer(path: str, key: str = "data.tokenizer") -> HFTokenizer:
    """Read a tokenizer folder (tokenizer.json + tokenizer_config.json) or a tokenizer.json file. Errors name `key`."""
    from tokenizers import Tokenizer

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{key}={path!r}: no such folder or file")
    folder, file = (p, p / "tokenizer.json") if p.is_dir() else (p.parent, p)
    if not file.is_file():
        raise ValueError(f"{key}={path!r}: no tokenizer.json in the folder (a Hugging Face tokenizer folder holds "
                         f"tokenizer.json and tokenizer_config.json)")
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as e:  # the library's parse errors are long: keep the first line
        raise ValueError(f"{key}={path!r}: {file.name} is not a tokenizers file ({str(e).splitlines()[0][:120]})") \
            from None
    config: dict = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the second wins, as in transformers
        f = folder / name
        if f.is_file():
            try:
                config.update(json.loads(f.read_text()))
            except json.JSONDecodeError as e:
                raise ValueError(f"{key}={path!r}: {name} is not JSON ({e.msg})") from None

    def token_id(name: str) -> Optional[int]:
        text = _token_text(config.get(name))
        if text is None:
            return None
        i = tok.token_to_id(text)
        if i is None:
            raise ValueError(f"{key}={path!r}: {name}={text!r} of tokenizer_config.json is not in the vocabulary")
        return i

    bos, eos, pad = token_id("bos_token"), token_id("eos_token"), token_id("pad_token")
    if eos is None:
        raise ValueError(f"{key}={path!r}: tokenizer_config.json names no eos_token (needed to end documents)")
    template = config.get("chat_template")
    if isinstance(template, list):  # [{name, template}, ...]: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    files = [file] + [folder / n for n in TOKENIZER_FILES[1:] if (folder / n).is_file()]
    return HFTokenizer(tok=tok, source=p, bos_id=bos, eos_id=eos, pad_id=eos if pad is None else pad,
                       add_bos=bool(config.get("add_bos_token", False)) and bos is not None, chat_template=template,
                       files=files)
