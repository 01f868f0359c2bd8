"""``flare.Schedule``: what ``@app.function(schedule=...)`` takes (``Period`` or ``Cron``)."""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


class Schedule:
    """A time frame to run a function repeatedly: :class:`flare.Period` or :class:`flare.Cron`.

    A scheduled function runs on its own, with no arguments, while its app is deployed (or
    while an ephemeral ``flare run`` / ``app.run()`` lives). See docs/SCHEDULES.md.
    """

    def _wire(self) -> dict[str, Any]:
        """The schedule as the function definition sends it (docs/PROTOCOL.md)."""
        raise NotImplementedError
