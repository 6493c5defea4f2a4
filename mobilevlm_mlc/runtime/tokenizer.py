"""LLaMA SentencePiece tokenization as MobileVLM's (slow, legacy) HF `LlamaTokenizer` does it.

Special tokens written in the text (`<s>`, `</s>`, `<unk>`) become their ids; every other span is
encoded by SentencePiece on its own, so each span gets SentencePiece's dummy-prefix '▁' (that is where
the lone '▁' after `<image>` comes from). Tests check this against transformers' `LlamaTokenizer`.
"""

from __future__ import annotations

import re
from pathlib import Path

from mobilevlm_mlc.errors import MobileVLMError


class Tokenizer:
    def __init__(self, model_file: Path):
        import sentencepiece as spm

        model_file = Path(model_file)
        if not model_file.is_file():
            raise MobileVLMError(f"{model_file}: tokenizer model not found")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        except (RuntimeError, OSError) as err:
            raise MobileVLMError(f"{model_file}: not a SentencePiece model ({err})") from None
        self.bos_id, self.eos_id, self.unk_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id()
        self.vocab_size = self.sp.vocab_size()
        specials = {self.sp.id_to_piece(i): i for i in (self.bos_id, self.eos_id, self.unk_id) if i >= 0}
        self._special_ids = specials
        self._special_re = re.compile("(" + "|".join(re.escape(s) for s in specials) + ")")

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        try:  # SentencePiece takes UTF-8 and fails inside on a str that has none
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise MobileVLMError(
                f"the text holds {text[err.start : err.end]!r}, a lone UTF-16 surrogate (a JSON \\u escape of "
                "half a pair, or bytes that were not UTF-8): expected Unicode text"
            ) from None
        ids = [self.bos_id] if add_bos else []
        for part in self._special_re.split(text):
            if part in self._special_ids:
                ids.append(self._special_ids[part])
            elif part:
                ids.extend(self.sp.encode(part))
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([i for i in ids if i not in (self.bos_id, self.eos_id)])


class StreamDecoder:
    """Turns a growing list of token ids into text deltas, holding back incomplete UTF-8 byte sequences."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        delta = text[len(self.emitted) :] if text.startswith(self.emitted) else text
        self.emitted = text
        return delta
