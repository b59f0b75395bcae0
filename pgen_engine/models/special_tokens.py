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
        """
        path = Path(path)
        cfg = json.loads((path / "config.json").read_text())
        text_vocab = int(cfg.get("text_config", {}).get("vocab_size", 0))
        base = cls.janus_pro() if text_vocab > 100593 else cls.builtin()
        gen = {}
        gpath = path / "generation_config.json"
        if gpath.exists():
            gen = json.loads(gpath.read_text())
        kw = gen.get("generation_kwargs", {}) or {}
        pgen = cfg.get("pgen_special_tokens", {}) or {}

        def pick(name: str, *candidates) -> int:
            for c in candidates:
                if c is not None:
                    return int(c)
            return getattr(base, name)

        return cls(
            bos=pick("bos", pgen.get("bos"), gen.get("bos_token_id")),
            eos=pick("eos", pgen.get("eos"), gen.get("eos_token_id") if not isinstance(gen.get("eos_token_id"), list) else None),
            pad=pick("pad", pgen.get("pad"), gen.get("pad_token_id")),
            boi=pick("boi", pgen.get("boi"), kw.get("boi_token_id")),
            eoi=pick("eoi", pgen.get("eoi"), kw.get("eoi_token_id")),
            image=pick("image", pgen.get("image"), cfg.get("image_token_id")),
        )

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
