"""``esr_deploy.targets``: the parallel probe behind ``esr-deploy targets`` answers exactly
what the one-target probe answers, and leaves torch out of the calling process."""

from __future__ import annotations

import json
import subprocess
import sys

from esr_deploy.targets import TARGETS, availability, availability_all


def test_parallel_probe_answers_as_the_serial_one() -> None:
    """In this process (torch already imported: every backend is probed on a thread here)."""
    rows = availability_all()
    assert [t for t, _ in rows] == list(TARGETS)
    for target, status in rows:
        assert status == availability(target), target.name


def test_torch_backends_are_probed_in_another_process() -> None:
    """From a fresh process: the torch backends' answers come from a forked child, the
    caller never imports torch, and the answers are the serial probe's."""
    code = (
        "import json, sys\n"
        "from esr_deploy.targets import availability_all\n"
        "rows = [(t.name, a.ok, a.reason) for t, a in availability_all()]\n"
        "print(json.dumps({'rows': rows, 'torch': 'torch' in sys.modules}))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    if sys.platform == "linux":
        assert result["torch"] is False
    expected = [[t.name, a.ok, a.reason] for t, a in ((t, availability(t)) for t in TARGETS)]
    assert result["rows"] == expected
