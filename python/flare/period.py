"""``flare.Period``: run a function every given time interval."""

from __future__ import annotations

from . import exception
from .schedule import Schedule

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# The shortest period the server runs.
_MIN_SECONDS = 1.0


class Period(Schedule):
    """Run a function every given time interval, counted from the deploy.

    ``Period(days=1)`` runs at the deploy's time of day every day; ``months=1`` on the
    deploy's day of the month (the last day in shorter months). Redeploying starts the
    period over; use :class:`flare.Cron` for times that do not move with deploys. Only
    ``seconds`` may be a float; the period is at least 1 second.

    ```python
    @app.function(schedule=flare.Period(minutes=15))
    def poll():
        ...
    ```
    """

    def __init__(
        self,
        *,
        years: int = 0,
        months: int = 0,
        weeks: int = 0,
        days: int = 0,
        hours: int = 0,
        minutes: int = 0,
        seconds: float = 0,
    ) -> None:
        whole = {"years": years, "months": months, "weeks": weeks, "days": days, "hours": hours, "minutes": minutes}
        for name, value in whole.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise exception.InvalidError(f"Period({name}={value!r}): expected a whole number >= 0")
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds >= 0:
            raise exception.InvalidError(f"Period(seconds={seconds!r}): expected a number >= 0")
        self.years = years
        self.months = months
        self.weeks = weeks
        self.days = days
        self.hours = hours
        self.minutes = minutes
        self.seconds = float(seconds)
        total_months = 12 * years + months
        total_seconds = (((7 * weeks + days) * 24 + hours) * 60 + minutes) * 60 + float(seconds)
        if total_months == 0 and total_seconds < _MIN_SECONDS:
            raise exception.InvalidError(
                f"{self!r} is too short: a schedule's period is at least {_MIN_SECONDS:g} second"
            )
        self._months = total_months
        self._seconds = total_seconds

    def _wire(self) -> dict[str, Any]:
        period: dict[str, Any] = {"seconds": self._seconds}
        if self._months:
            period["months"] = self._months
        return {"period": period}

    def __repr__(self) -> str:
        parts = [
            f"{name}={getattr(self, name)!r}"
            for name in ("years", "months", "weeks", "days", "hours", "minutes", "seconds")
            if getattr(self, name)
        ]
        return f"Period({', '.join(parts)})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Period) and self._wire() == other._wire()

    def __hash__(self) -> int:
        return hash((self._months, self._seconds))
