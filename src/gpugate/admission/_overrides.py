"""Operators' runtime overrides of a pool: pause, cap and drain, each
expiring by itself when given a duration (``set_override.lua``)."""

from __future__ import annotations

import json
from typing import Any

import structlog

from .. import _process
from .._exceptions import BackendError, ConfigError
from .._units import lifetime_ms
from ._core import GateCore, refusal

log = structlog.get_logger(__name__)


class Overrides(GateCore):
    """A gate's pause / resume / cap / uncap / drain (see ``Gate``)."""

    def pause(
        self,
        cls: str,
        *,
        duration: float | str | None = None,
        reason: str = "",
        who: str | None = None,
    ) -> dict[str, Any]:
        """Pause ``cls``: its requests DEFER (reason ``paused``).

        The pause lasts until :meth:`resume`, or until ``duration`` passes when one is given.
        """
        return self._override("pause", cls, 0, duration, reason, who)

    def resume(self, cls: str, *, reason: str = "", who: str | None = None) -> dict[str, Any]:
        """Lift a pause of ``cls``; ``reason`` and ``who`` are logged (``override_set``)."""
        return self._override("resume", cls, 0, None, reason, who)

    def cap(
        self,
        cls: str,
        n: int,
        *,
        duration: float | str | None = None,
        reason: str = "",
        who: str | None = None,
    ) -> dict[str, Any]:
        """Lower ``cls``'s pool-wide cap to ``n`` until ``duration`` passes.

        A runtime cap never raises the policy's: one at or above it changes
        nothing, and the gate logs a warning (``cap_changes_nothing``).
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ConfigError("a cap is a whole number >= 0", key="n", value=n)
        reply = self._override("cap", cls, n, duration, reason, who)
        cp = self.effective_policy.classes.get(cls)
        if cp is not None and not cp.lowered_by(n):
            log.warning(
                "cap_changes_nothing",
                cls=cls,
                n=n,
                policy_cap=cp.max_concurrent,
                fix="a runtime cap only lowers the policy's; apply a new policy to raise it",
            )
        return reply

    def uncap(self, cls: str, *, reason: str = "", who: str | None = None) -> dict[str, Any]:
        """Remove a runtime cap of ``cls``; ``reason`` and ``who`` are logged (``override_set``)."""
        return self._override("uncap", cls, 0, None, reason, who)

    def drain(
        self,
        cls: str | None = None,
        *,
        duration: float | str | None = None,
        reason: str = "",
        who: str | None = None,
    ) -> dict[str, Any]:
        """Pause ``cls``, or with no class every class but the highest (all the
        classes that share the highest priority keep running), by the pool's
        policy as Redis holds it now."""
        if cls is not None:
            return self.pause(cls, duration=duration, reason=reason or "drain", who=who)
        policy = self._current_policy()
        result: dict[str, Any] = {}
        for name in policy.classes:
            if name not in policy.highest_classes:
                result = self.pause(name, duration=duration, reason=reason or "drain", who=who)
        return result

    def overrides(self) -> dict[str, Any]:
        """The pool's overrides as stored (expired entries may still show until the next change)."""
        self._check_usable()
        raw = self._call(self._client.hget, self._keys.state, "ovr")
        return json.loads(raw) if raw else {"pause": {}, "cap": {}}

    def _override(
        self,
        kind: str,
        cls: str,
        n: int,
        duration: float | str | None,
        reason: str,
        who: str | None,
    ) -> dict[str, Any]:
        self._check_usable()
        for_ms = lifetime_ms(duration)
        who = who or _process.operator_name()
        try:
            raw = self._call(
                self._scripts.set_override,
                keys=[self._keys.state],
                args=[self._keys.prefix, self._now_arg(), kind, cls, n, for_ms, who, reason],
            )
        except BackendError as exc:
            if refusal(exc).startswith("unknown_class"):
                raise self._unknown_class(cls) from None
            raise
        log.info(
            "override_set",
            kind=kind,
            cls=cls,
            n=n,
            duration_s=for_ms / 1000 if for_ms else None,  # None: until lifted
            who=who,
            reason=reason,
        )
        return json.loads(raw)  # type: ignore[no-any-return]
