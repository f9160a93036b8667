"""Stranded wired memory and reboot escalation, carried out for the daemon.

Room: subsystems.

The decisions are ``policies.stranded`` (baseline and assessment) and ``policies.reboot`` (the
escalation state machine); this module feeds them each memory reading, carries out their actions
(alerts, the announced reboot, the reboot argv — never through a shell) and persists what must
survive: the idle-wired baseline of this boot and the reboot ledger. The ledger uses wall-clock
times because it must survive the reboot itself, when monotonic clocks start again from zero.

When the saved ``boot_id`` is not this boot's, the machine rebooted (by the escalation or by a
person): before the first reading of the new boot, the alert episodes of the old one are resolved
(``policies.reboot.on_new_boot``), so receivers see them end and the new boot's alerts are new episodes.
"""

from __future__ import annotations

import subprocess
import sys
from typing import TYPE_CHECKING, Any

import anyio
import psutil

from policies import reboot as reboot_policy
from policies import stranded as stranded_policy
from policies.actions import Alert, EscalateReboot, RunReboot
from probes.readings import SystemMemoryReading
from supervisord_llm.extension import Extension

if TYPE_CHECKING:
    from supervisord_llm.daemon import Daemon
    from supervisord_llm.engine.supervisor import EngineSupervisor


REBOOT_TICK_S = 1.0


def boot_id() -> str:
    """An id that changes at every boot (Linux boot_id; elsewhere the boot time)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return f"boot-{psutil.boot_time():.0f}"


class StrandedExtension(Extension):
    name = "stranded"

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        cfg = daemon.config
        self.settings = cfg.stranded  # the config builds the policies' settings objects
        self.reboot_settings = cfg.reboot
        self.baseline = stranded_policy.BaselineState()
        self.ledger = reboot_policy.RebootLedger()
        self.boot = boot_id()
        self.reboot_state = reboot_policy.RebootState()
        self.alert_active = False
        self.stranded = 0
        self.last_exit_at_s: float | None = None
        self.verified = False
        self._rebooting = False
        self._sent: dict[str, bool] = {}
        self._persisting: bool | None = None  # the last stranded verdict (None: no verdict yet)
        self._gpu_lost: str | None = None  # why a GPU needs a reboot (XID 79, lost); holds until reboot
        self._previous_boot: str | None = None  # the boot the saved state was written in, until its episodes end

    def restore(self, saved: dict[str, Any]) -> None:
        """Load what the previous daemon persisted (called once the state file is read)."""
        base = saved.get("baseline")
        if not isinstance(base, dict):
            base = {}
        self.baseline = stranded_policy.BaselineState(
            boot_id=base.get("boot_id"), baseline_wired_bytes=base.get("baseline_wired_bytes"),
            recent_idle_wired_bytes=tuple(base.get("recent_idle_wired_bytes") or ()),
            provisional=bool(base.get("provisional", False)))
        raw_ledger = saved.get("reboots_wall_s") or []
        try:
            self.ledger = reboot_policy.ledger_from_record(raw_ledger)
        except ValueError:
            # A damaged entry must not erase the cooldown: the reboots that can still be read count.
            self.ledger = reboot_policy.RebootLedger(tuple(
                float(t) for t in raw_ledger if isinstance(t, (int, float)) and not isinstance(t, bool))
                if isinstance(raw_ledger, list) else ())
        saved_boot = saved.get("boot_id")
        same_boot = saved_boot == self.boot
        # Closed at the first reading or tick, not here: restore may run again (a damaged state file).
        self._previous_boot = saved_boot if isinstance(saved_boot, str) and not same_boot else None
        self.reboot_state = reboot_policy.state_after_restart(saved.get("reboot_phase"), same_boot=same_boot)
        self.alert_active = bool(saved.get("alert_active")) and same_boot

    def _close_previous_boot(self) -> None:
        """After a reboot: resolve the episodes the previous boot left open (once, before any reading
        of this boot can fire them again and be dropped as a duplicate of the open episode)."""
        previous, self._previous_boot = self._previous_boot, None
        if previous is None:
            return
        daemon = self.daemon
        outbox = daemon.alerts_outbox
        open_keys = sorted(outbox.open_episodes()) if outbox is not None else []
        alerts = reboot_policy.on_new_boot(open_keys)
        daemon.events.emit("policy.decided", policy="reboot", trigger="new boot", previous_boot_id=previous,
                           boot_id=self.boot, open_episodes=open_keys,
                           decision="resolve " + ",".join(a.key for a in alerts) if alerts else "none")
        for alert in alerts:
            daemon.apply(alert)

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        self._close_previous_boot()
        task_status.started()
        # The reboot escalation's own timer: memory readings step it too, but on Linux they carry no
        # wired memory and never reach it, so an announced reboot for a lost GPU would never run.
        while True:
            await anyio.sleep(REBOOT_TICK_S)
            if self._gpu_lost is not None:
                self._escalate(True, self._gpu_lost)
            elif self.reboot_state.phase == "announced" and self._persisting is not None:
                self._escalate(self._persisting, self.reboot_state.reason or "wired memory stranded")

    def persisted(self) -> dict[str, Any]:
        return {
            "boot_id": self.boot,
            "baseline": {"boot_id": self.baseline.boot_id, "baseline_wired_bytes": self.baseline.baseline_wired_bytes,
                         "recent_idle_wired_bytes": list(self.baseline.recent_idle_wired_bytes),
                         "provisional": self.baseline.provisional},
            "reboots_wall_s": reboot_policy.ledger_to_record(self.ledger),
            "reboot_phase": self.reboot_state.phase,
            "alert_active": self.alert_active,
        }

    def on_engine_exit(self, sup: EngineSupervisor) -> None:
        self.last_exit_at_s = self.daemon.clock.now()

    def stranded_bytes(self) -> int:
        return self.stranded

    def on_memory(self, reading: SystemMemoryReading | None) -> None:
        self._close_previous_boot()  # the daemon's first reading comes before run()
        if reading is None or reading.wired_bytes is None:
            return
        daemon = self.daemon
        now = daemon.clock.now()
        resident = daemon.resident()
        self.baseline = stranded_policy.update_baseline(
            self.baseline, boot_id=self.boot, wired_bytes=reading.wired_bytes, engine_resident=bool(resident),
            last_exit_at_s=self.last_exit_at_s, now_s=now, settings=self.settings)
        if not self.verified and self.baseline.baseline_wired_bytes is not None:
            self.verified = True
            self._verify_reboot(reading)
        live = sum(daemon.footprint_bytes(s) or 0 for s in resident)
        assessment = stranded_policy.assess_stranded(
            self.baseline.baseline_wired_bytes, reading.wired_bytes, live, self.last_exit_at_s, now, self.settings,
            alert_active=self.alert_active)
        if assessment.stranded_bytes != self.stranded:
            daemon.events.emit("memory.stranded_changed", stranded_bytes=assessment.stranded_bytes,
                               wired_bytes=reading.wired_bytes,
                               baseline_wired_bytes=self.baseline.baseline_wired_bytes)
        self.stranded = assessment.stranded_bytes
        if assessment.alert is not None:
            opening = not assessment.alert.resolved
            if opening != self.alert_active:
                self.alert_active = opening
                daemon.apply(assessment.alert)
                daemon.persist()
        persisting = None if assessment.reclaiming else assessment.over_threshold
        self._persisting = persisting
        if self._gpu_lost is None:
            self._escalate(persisting, "wired memory stranded")

    def _escalate(self, persisting: bool | None, reason: str) -> None:
        daemon = self.daemon
        before = self.reboot_state
        resident = [s.name for s in daemon.resident()]
        self.reboot_state, actions = reboot_policy.decide_reboot(
            self.reboot_state, self.ledger, self.reboot_settings, persisting, daemon.clock.now(), daemon.clock.wall(),
            reason=reason, resident_engines=resident)
        if self.reboot_state != before:
            daemon.events.emit("policy.decided", policy="reboot", persisting=persisting, reason=reason,
                               resident_engines=resident, phase=self.reboot_state.phase)
        for action in actions:
            if isinstance(action, Alert):
                # The policy repeats an alert while its condition lasts; a person hears of each change once.
                if self._sent.get(action.key) == action.resolved:
                    continue
                self._sent[action.key] = action.resolved
            daemon.apply(action)  # the executor hands the reboot steps back to announce_reboot / run_reboot
        if self.reboot_state != before:
            daemon.persist()

    def announce_reboot(self, action: EscalateReboot) -> bool:
        daemon = self.daemon
        daemon.events.emit("reboot.announced", reason=action.reason,
                           in_s=round(action.at_s - daemon.clock.now(), 1), argv=list(self.reboot_settings.argv))
        return True

    def run_reboot(self, action: RunReboot) -> bool:
        self._run_reboot(action)
        return True

    def _run_reboot(self, action: RunReboot) -> None:
        if self._rebooting:
            return
        self._rebooting = True
        daemon = self.daemon
        # The ledger is written before the command runs: the cooldown must hold across the reboot.
        self.ledger = reboot_policy.record_reboot(self.ledger, daemon.clock.wall())
        daemon.persist()
        daemon.events.emit("reboot.executing", argv=list(action.argv), reason=action.reason)

        async def run() -> None:
            await daemon.persist_durably()  # the ledger is on disk before the command runs
            try:
                done = await anyio.to_thread.run_sync(lambda: subprocess.run(
                    list(action.argv), capture_output=True, text=True, timeout=120))
                daemon.events.emit("reboot.command_finished", returncode=done.returncode,
                                   stderr=done.stderr.strip()[-500:])
                if done.returncode != 0:
                    daemon.apply(Alert("reboot.failed", "critical",
                                       f"the reboot command {' '.join(action.argv)} failed with status "
                                       f"{done.returncode}: {done.stderr.strip()[-200:]}; reboot by hand"))
            except (OSError, subprocess.SubprocessError) as exc:
                daemon.events.emit("reboot.command_failed", error=str(exc))
                daemon.apply(Alert("reboot.failed", "critical",
                                   f"the reboot command {' '.join(action.argv)} could not run: {exc}; reboot by hand"))
            finally:
                self._rebooting = False

        daemon.spawn_background(run)

    def _verify_reboot(self, reading: SystemMemoryReading) -> None:
        if not self.ledger.reboots_wall_s:
            return
        result = reboot_policy.verify_after_reboot(self.ledger, psutil.boot_time(), self.baseline.baseline_wired_bytes,
                                                   reading.wired_bytes or 0, self.settings.threshold_bytes)
        self.daemon.events.emit("reboot.verified", rebooted=result.rebooted, memory_back=result.memory_back)
        if result.alert is not None:
            self.daemon.apply(result.alert)

    def cancel_reboot(self) -> dict[str, Any]:
        state = self.reboot_state
        if state.phase != "announced":
            return {"ok": True, "cancelled": False, "message": f"no reboot is pending (escalation is {state.phase})"}
        self.reboot_state = reboot_policy.cancel(state)
        self.daemon.events.emit("reboot.cancelled", reason=state.reason)
        self.daemon.apply(Alert("reboot.announced", "critical", "reboot cancelled by a person", resolved=True))
        self.daemon.persist()
        return {"ok": True, "cancelled": True, "message": f"reboot cancelled ({state.reason})"}

    def request_reboot(self, reason: str) -> bool:
        """A GPU lost (XID 79) takes the same path as stranded memory; it needs a reboot until one happens."""
        self._gpu_lost = reason
        self._escalate(True, reason)
        return True

    def contribute_status(self, doc: dict[str, Any]) -> None:
        mem = doc["system"]["memory"]
        mem["baseline_wired_bytes"] = self.baseline.baseline_wired_bytes
        mem["stranded_bytes"] = self.stranded if mem.get("wired_bytes") is not None else None
        state = self.reboot_state
        at = None
        if state.execute_at_s is not None:
            at = self.daemon.clock.wall() + (state.execute_at_s - self.daemon.clock.now())
        doc["reboot"] = {"state": state.phase, "at": at, "reason": state.reason, "enabled": self.reboot_settings.enabled,
                         "last_reboot_wall": self.ledger.last_wall_s}


__all__ = ["StrandedExtension", "boot_id", "sys"]
