"""Speculation: the encode + prefill of an utterance run in the endpointer's silence window, kept or dropped.

With VAD the utterance is fully known `speech_pad_ms` after speech stops, while the endpointer still waits
`min_silence_ms` to confirm the end. Doing the encoder and the audio + suffix prefill in that window takes
them off the path from endpoint to first token. The work is kept only if the endpoint is confirmed at the
same sample with the same audio already in the turn; if speech resumes it is stale and dropped (counted in
`discarded`). It is also skipped while the session lags behind real time (decided by the session).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from .errors import QwenAudioEdgeError

if TYPE_CHECKING:
    from .pipeline import PendingTurn, PrefilledTurn


class Speculation:
    """At most one speculative prefill, for one possible end of the current utterance.

    Lives as long as the session (the counters add up across utterances); `clear()` at each new utterance.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.runs = 0  # speculative encode + prefill runs that produced a prefill
        self.discarded = 0  # speculations dropped because speech resumed
        self._key: tuple[int, int] | None = None  # (utterance end sample, turn's audio_done) it was made for
        self._prefilled: PrefilledTurn | None = None  # None also when the speculative prefill was refused

    def clear(self) -> None:
        """A new utterance: whatever was speculated belongs to the last one."""
        self._key, self._prefilled = None, None

    def withdraw(self) -> None:
        """Speech resumed (no end pending): a speculation made in the silence is stale."""
        if self._key is not None:
            self.discarded += 1
        self.clear()

    def update(
        self,
        end: int | None,
        turn: Callable[[], PendingTurn],
        fed: int,
        start: int,
        prefill: Callable[[PendingTurn], PrefilledTurn],
    ) -> None:
        """Speculate for the utterance [start, end) whose mel is fed up to `fed`, unless already done for it.

        end: the endpointer's pending end (None: speech goes on, a speculation made in the silence is
        stale). turn: the pending turn (begun on demand). Refused work (e.g. the utterance does not fit
        the context) is recorded as no prefill: the endpoint does the work again and reports the error then.
        """
        if end is None:
            self.withdraw()
            return
        pending = turn()
        key = (end, pending.audio_done)
        if not self.enabled or fed < end or self._key == key or end <= start:
            return
        try:
            prefilled: PrefilledTurn | None = prefill(pending)
        except QwenAudioEdgeError:
            prefilled = None  # speculation is optional: the endpoint does the work and reports the error then
        self._key, self._prefilled = key, prefilled
        self.runs += prefilled is not None

    def take(self, end: int, audio_done: int) -> PrefilledTurn | None:
        """The prefill made for an utterance ending at `end` with this much audio in the turn, if any."""
        return self._prefilled if self._key == (end, audio_done) else None
