"""Adapters kept for a while after their session expired: paged out, freed after a retention."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Retention:
    """Models whose adapters wait to be freed, with when they were retired (monotonic seconds)."""

    _since: dict[str, float] = field(default_factory=dict)

    def retire(self, model_id: str, now: float) -> None:
        self._since[model_id] = now

    def take_due(self, cutoff: float) -> list[str]:
        """The models retired at or before `cutoff`, no longer held here."""
        due = [model_id for model_id, since in self._since.items() if since <= cutoff]
        for model_id in due:
            del self._since[model_id]
        return due

    def held(self) -> dict[str, float]:
        return dict(self._since)
