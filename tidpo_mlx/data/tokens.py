"""Tokenising texts in batches: ids, and character offsets read from the Rust encoding only when needed."""

from __future__ import annotations

from typing import Any


class Tokens:
    """A text's token ids, and their character offsets, read from the Rust encoding only when asked for
    (a truncation mask needs them; most pairs are not cut)."""

    __slots__ = ("ids", "_offsets", "_encoding", "_stop")

    def __init__(self, ids: list[int], offsets: list[tuple[int, int]] | None = None, encoding: Any = None,
                 stop: int | None = None):
        self.ids, self._offsets, self._encoding, self._stop = ids, offsets, encoding, stop

    @property
    def offsets(self) -> list[tuple[int, int]]:
        if self._offsets is None:
            self._offsets = self._encoding.offsets[: self._stop]
        return self._offsets

    def prefix(self, chars: int) -> Tokens | None:
        """The tokens of the first ``chars`` characters when a token starts exactly there (None otherwise)."""
        enc = self._encoding
        k = enc.char_to_token(chars) if enc is not None and self._stop is None else None
        if k is None or enc.token_to_chars(k)[0] != chars or (k and enc.token_to_chars(k - 1)[1] > chars):
            return None
        return Tokens(self.ids[:k], encoding=enc, stop=k)


class TokenCache:
    """The tokens of a chunk's texts, by (text, special tokens added), filled by batched tokenizer calls."""

    def __init__(self, hf: Any):
        self.hf = hf
        self.tokenized: dict[tuple[str, bool], Tokens] = {}

    def __getstate__(self) -> dict[str, Any]:
        """A worker process gets the tokenizer without the kept tokens (their Rust encodings do not pickle)."""
        return dict(self.__dict__, tokenized={})

    def encode(self, texts: list[str], special: bool) -> list[Tokens]:
        """Token ids and character offsets of each of ``texts``, in one batched call.

        Calls the Rust tokenizer under a transformers fast tokenizer directly
        when the settings that transformers sets per call (truncation, padding,
        splitting special tokens) are already as our calls want them: the same
        ids and offsets, without transformers' per-text conversion.
        """
        rust = getattr(self.hf, "_tokenizer", None)
        if (rust is not None and hasattr(rust, "encode_batch") and rust.truncation is None and rust.padding is None
                and rust.encode_special_tokens == bool(getattr(self.hf, "split_special_tokens", False))):
            return [Tokens(e.ids, encoding=e) for e in rust.encode_batch(texts, add_special_tokens=special)]
        enc = self.hf(texts, add_special_tokens=special, return_offsets_mapping=True)
        return [Tokens(list(ids), [tuple(o) for o in offs]) for ids, offs in zip(enc["input_ids"], enc["offset_mapping"])]

    def get(self, text: str, special: bool = False) -> Tokens:
        """The tokens of ``text`` (kept ones, else tokenised now)."""
        hit = self.tokenized.get((text, special))
        return hit if hit is not None else self.encode([text], special)[0]

    def fill(self, texts: list[str], special: bool) -> None:
        """Tokenise the texts not kept yet in one batched call."""
        todo = [t for t in dict.fromkeys(texts) if (t, special) not in self.tokenized]
        if todo:
            self.tokenized.update(((t, special), e) for t, e in zip(todo, self.encode(todo, special)))
