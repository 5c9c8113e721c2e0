"""Per-token text pieces for the token colours of the web page: the text each committed token added.

Pieces come from decoding the whole answer so far, so they concatenate exactly to the answer's text (a token
that ends inside a multi-byte character adds "" and the next one carries the character)."""

from __future__ import annotations

from typing import Any


class TokenPieces:
    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.token_ids: list[int] = []
        self.text = ""

    def add(self, token_ids: list[int]) -> list[str]:
        """One piece per token, in order."""
        pieces = []
        for token in token_ids:
            self.token_ids.append(token)
            full = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
            if full.endswith("\ufffd") or not full.startswith(self.text):
                pieces.append("")              # unfinished character, or a rewrite of earlier text: wait
                continue
            pieces.append(full[len(self.text):])
            self.text = full
        return pieces

    def rest(self) -> str:
        """Text the final decode has beyond the pieces given (a last token that ended inside a character)."""
        full = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        return full[len(self.text):] if full.startswith(self.text) else ""
