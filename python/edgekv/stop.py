"""Stop strings: decoded text is cut at the first stop string, and text that could still
be the start of one is held back until it cannot."""

from __future__ import annotations

from typing import Sequence


def check_stop(stop: Sequence[str] | None) -> list[str]:
    """The stop strings as a list; a clear error for anything else."""
    if stop is not None and (isinstance(stop, str) or not all(isinstance(s, str) and s for s in stop)):
        raise ValueError("stop must be a list of non-empty strings")
    return list(stop or [])


class StopText:
    """Feed token ids with :meth:`push`; it returns the text that is safe to emit.

    ``stopped`` turns true when a stop string appeared: the text before it has been
    returned and the rest, the stop string included, is dropped."""

    def __init__(self, decoder, stop: Sequence[str]):
        self.decoder = decoder  # a Tokenizer.stream_decoder()
        self.stop = list(stop)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.pending = ""
        self.stopped = False

    def push(self, token: int) -> str:
        self.pending += self.decoder.push(token)
        if not self.stop:
            out, self.pending = self.pending, ""
            return out
        hit = min((self.pending.find(s) for s in self.stop if s in self.pending), default=-1)
        if hit >= 0:
            out, self.pending = self.pending[:hit], ""
            self.decoder.reset()  # bytes held back belong to the cut-off text
            self.stopped = True
            return out
        cut = len(self.pending) - self.hold
        if cut <= 0:
            return ""
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def flush(self) -> str:
        """The held-back text at the end of the stream."""
        out, self.pending = self.pending + self.decoder.flush(), ""
        return out
