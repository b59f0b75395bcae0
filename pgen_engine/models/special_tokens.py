"""Special token ids a Janus prompt needs, read from a checkpoint or built in.

Janus checkpoints keep ``image_token_id`` (the understanding placeholder) in config.json
and ``bos``/``pad``/``boi`` in generation_config.json (``generation_kwargs.boi_token_id``,
which ``transformers``' image-mode generate reads). Tiny test/demo checkpoints use the
built-in layout below together with the built-in byte tokenizer (``pgen_engine.data``).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .janus_config import CheckpointError


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
    """Token ids with special meaning in prompts.

    Attributes:
        bos: begin of sequence.
        eos: end of sequence.
        pad: padding; also what the "pad" unconditional prompt replaces tokens with.
        boi: begin of image; a generation prompt ends with it.
        eoi: end of image; closes an image's codes in a prompt.
        image: the understanding placeholder, one per vision-encoder feature.
    """

    bos: int
    eos: int
    pad: int
    boi: int
    eoi: int
    image: int

    # Built-in layout for tiny models: 0..5 specials, then 256 byte tokens.
    BUILTIN_VOCAB_MIN = 262

    @classmethod
    def builtin(cls) -> "SpecialTokens":
        """Ids used by tiny checkpoints with the built-in byte tokenizer."""
        return cls(pad=0, bos=1, eos=2, boi=3, eoi=4, image=5)

    @classmethod
    def janus_pro(cls) -> "SpecialTokens":
        """Ids of the released Janus-Pro tokenizer (deepseek-community/Janus-Pro-1B/7B)."""
        return cls(bos=100000, eos=100001, pad=100015, boi=100016, eoi=100593, image=100581)

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> "SpecialTokens":
        """Read ids from ``config.json`` / ``generation_config.json`` under ``path``.

        Missing generation config fields fall back to the Janus-Pro ids when the vocab is
        Janus-Pro sized, else to the built-in layout.

        Raises:
            CheckpointError: invalid JSON or structure in either file, an id that is not an
                integer, or an id outside the text vocabulary; the message names the file.
        """
        path = Path(path)
        cfg_file, gen_file = path / "config.json", path / "generation_config.json"

        def read(f: Path) -> dict:
            try:
                obj = json.loads(f.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
                raise CheckpointError(f"{f}: invalid JSON ({e})") from None
            if not isinstance(obj, dict):
                raise CheckpointError(f"{f}: expected a JSON object")
            return obj

        cfg = read(cfg_file)
        gen = read(gen_file) if gen_file.exists() else {}
        kw = gen.get("generation_kwargs") or {}
        pgen = cfg.get("pgen_special_tokens") or {}
        if not isinstance(kw, dict):
            raise CheckpointError(f"{gen_file}: expected a JSON object (with an optional 'generation_kwargs' object)")
        if not isinstance(pgen, dict):
            raise CheckpointError(f"{cfg_file}: 'pgen_special_tokens' must be an object of token ids")
        text = cfg.get("text_config") or {}
        text_vocab = text.get("vocab_size", 0) if isinstance(text, dict) else 0
        text_vocab = text_vocab if isinstance(text_vocab, int) else 0
        base = cls.janus_pro() if text_vocab > 100593 else cls.builtin()

        def pick(name: str, *candidates) -> int:
            for c in candidates:
                if c is not None:
                    if isinstance(c, bool) or not isinstance(c, int):
                        raise CheckpointError(f"{path}: special token {name}={c!r} (config.json / "
                                              "generation_config.json) is not an integer token id")
                    return c
            return getattr(base, name)

        eos = gen.get("eos_token_id")
        out = cls(
            bos=pick("bos", pgen.get("bos"), gen.get("bos_token_id")),
            eos=pick("eos", pgen.get("eos"), eos if not isinstance(eos, list) else None),
            pad=pick("pad", pgen.get("pad"), gen.get("pad_token_id")),
            boi=pick("boi", pgen.get("boi"), kw.get("boi_token_id")),
            eoi=pick("eoi", pgen.get("eoi"), kw.get("eoi_token_id")),
            image=pick("image", pgen.get("image"), cfg.get("image_token_id")),
        )
        if text_vocab > 0:
            for name, v in out.as_dict().items():
                if not 0 <= v < text_vocab:
                    raise CheckpointError(
                        f"{path}: special token {name}={v} (from config.json image_token_id / pgen_special_tokens "
                        f"or generation_config.json) is outside the text vocabulary [0, {text_vocab})")
        return out

    def generation_config_dict(self) -> dict:
        """The generation_config.json fields ``transformers``' Janus image generate needs."""
        return {
            "bos_token_id": self.bos,
            "eos_token_id": self.eos,
            "pad_token_id": self.pad,
            "generation_kwargs": {"boi_token_id": self.boi, "eoi_token_id": self.eoi},
        }

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)
