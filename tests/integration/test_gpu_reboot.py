"""XID 79 on Linux: the reboot escalation runs on its own timer, not on memory readings (which on
Linux carry no wired memory). NVML is the stand-in of tests/unit/test_gpu_extension.py; the daemon,
its state and the reboot command (a harmless script that records that it ran) are real."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from supervisord_llm.clock import FakeClock
from supervisord_llm.subsystems.stranded import StrandedExtension
from tests.unit.test_gpu_extension import PYTHON, StandInNvml, _build, _events, _until, run_built

pytestmark = pytest.mark.long_wait  # mostly waits: run beside the rest


def _reboot_toml(tmp: Path) -> tuple[str, Path]:
    record = tmp / "reboots.log"
    script = tmp / "fake-reboot.py"
    script.write_text(f"open({str(record)!r}, 'a').write('rebooted\\n')\n")
    return (f'[policies.reboot]\nenabled = true\ngrace = "30s"\nargv = ["{PYTHON}", "{script}"]\n', record)


@pytest.mark.anyio
async def test_xid_79_reboot_runs_after_its_grace_on_linux(tmp_path) -> None:
    """XID 79: the reboot is announced, and once the 30 s grace has passed the reboot command runs once."""
    toml, record = _reboot_toml(tmp_path)
    nvml = StandInNvml()
    clock = FakeClock()
    daemon, _ = _build(toml, nvml, clock=clock, xid_wait_timeout_ms=50)
    daemon.extensions.append(StrandedExtension(daemon))
    async with run_built(daemon):
        nvml.xids.put((0, 79))
        await _until(lambda: bool(_events(daemon, "reboot.announced")), 10)
        assert daemon.status()["reboot"]["state"] == "announced"
        await anyio.sleep(1.5)
        assert not record.exists(), "the reboot ran before its grace"
        clock.advance(31)
        await _until(lambda: record.exists(), 10)
        executing = _events(daemon, "reboot.executing")
        assert len(executing) == 1 and "XID 79" in executing[0]["reason"]
        await anyio.sleep(2.5)
        assert record.read_text().splitlines() == ["rebooted"], "the reboot command ran more than once"
