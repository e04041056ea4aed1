"""Streamed text: stop strings held back until they cannot start, UTF-8-safe pieces."""
from __future__ import annotations

from typing import Sequence


class StopStrings:
    """Finds stop strings in streamed text and holds back text that may be the start of one."""

    def __init__(self, stops: Sequence[str] = ()):
        self.stops = [s for s in stops if s]
        self.text = ""  # everything emitted or held
        self.emitted = 0

    def push(self, piece: str) -> tuple[str, bool]:
        """Add new text; return (text safe to emit now, stopped)."""
        self.text += piece
        hits = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if hits:
            out = self.text[self.emitted:min(hits)]
            self.text, self.emitted = self.text[:min(hits)], min(hits)
            return out, True
        hold = 0
        for s in self.stops:  # longest suffix of the text that is a proper prefix of a stop string
            for n in range(min(len(s) - 1, len(self.text) - self.emitted), 0, -1):
                if self.text.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        end = len(self.text) - hold
        out, self.emitted = self.text[self.emitted:end], max(self.emitted, end)
        return out, False

    def flush(self) -> str:
        out, self.emitted = self.text[self.emitted:], len(self.text)
        return out


class TextStream:
    """One sequence's token ids -> text pieces: UTF-8-safe (the tokenizer's stream decoder, which
    holds back a character's partial bytes), stop ids, and stop strings (cut from the text)."""

    def __init__(self, tokenizer, stop: Sequence[str] = (), stop_ids=()):
        self.decoder = tokenizer.stream_decoder() if tokenizer is not None else None
        self.stopper = StopStrings(stop)
        self.stop_ids = stop_ids

    def push(self, token: int) -> tuple[str, bool]:
        """(text safe to emit now, stopped: a stop id or a stop string ended the sequence)."""
        if token in self.stop_ids:
            return "", True
        if self.decoder is None:
            return "", False
        return self.stopper.push(self.decoder.push(token))

    def flush(self) -> str:
        """What is held back, at the end of a sequence that did not stop."""
        if self.decoder is None:
            return ""
        return self.stopper.push(self.decoder.flush())[0] + self.stopper.flush()
