"""``flare.Cron``: run a function on a cron schedule, in a time zone."""

from __future__ import annotations

from . import exception
from .schedule import Schedule

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

_MACROS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")


class Cron(Schedule):
    """Run a function at the times of a cron expression, read in a time zone.

    Five fields: minute, hour, day of month, month, day of week (``"0 9 * * 1-5"``: 9:00 on
    weekdays). ``timezone`` is an IANA name (``"Europe/Paris"``), UTC by default; across
    daylight saving changes each wall-clock time runs once. The server checks the
    expression and the zone when the app is deployed.

    ```python
    @app.function(schedule=flare.Cron("0 6 * * *", timezone="America/New_York"))
    def daily_report():
        ...
    ```
    """

    def __init__(self, cron_string: str, timezone: str = "UTC") -> None:
        if not isinstance(cron_string, str):
            raise exception.InvalidError(f"Cron({cron_string!r}): expected a string")
        if not isinstance(timezone, str) or not timezone:
            raise exception.InvalidError(f"Cron(timezone={timezone!r}): expected an IANA time zone name")
        fields = cron_string.split()
        if not (len(fields) == 5 or (len(fields) == 1 and fields[0].lower() in _MACROS)):
            raise exception.InvalidError(
                f"Cron({cron_string!r}): expected 5 fields (minute hour day-of-month month day-of-week), "
                f"got {len(fields)}"
            )
        self.cron_string = cron_string
        self.timezone = timezone

    def _wire(self) -> dict[str, Any]:
        return {"cron": {"expr": self.cron_string, "timezone": self.timezone}}

    def __repr__(self) -> str:
        if self.timezone == "UTC":
            return f"Cron({self.cron_string!r})"
        return f"Cron({self.cron_string!r}, timezone={self.timezone!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Cron) and self._wire() == other._wire()

    def __hash__(self) -> int:
        return hash((self.cron_string, self.timezone))
