"""What /readyz reports: the store answers, every configured listener is bound, not draining."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Health:
    draining: bool = False
    listeners: dict[str, str] = field(default_factory=dict)  # name -> "bound" or the reason not

    def listener_problems(self) -> dict[str, str]:
        return {name: state for name, state in self.listeners.items() if state != "bound"}
