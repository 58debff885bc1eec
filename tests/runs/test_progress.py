"""What a run shows in a log (not a terminal): a line per finished slide, and a line a minute while it works."""

from __future__ import annotations

import io
import re
import time

from wsi_vssm import progress as progress_module
from wsi_vssm.progress import QUIET, Progress


def test_a_log_hears_from_a_long_run_every_minute(monkeypatch):
    """A SLURM or nohup log showed nothing while a slide ran (minutes on a real slide): no count, no time left,
    no slide name, so a hung job and a working one looked alike."""
    monkeypatch.setattr(progress_module, "HEARTBEAT_S", 0.05)
    err = io.StringIO()
    p = Progress(tty=False, err=err)
    with p.bar(160, "predict slides", unit="slide") as tick:
        tick(57)
        p.working_on("tumor_058")
        time.sleep(0.3)
    lines = [ln for ln in err.getvalue().splitlines() if ln]
    assert lines and all(ln.startswith("predict slides: 57 of 160 through, ") for ln in lines), lines
    assert "tumor_058 for " in lines[-1] and "left" not in lines[0], lines  # no time left before one is worked
    p2 = Progress(tty=False, err=io.StringIO())
    with p2.bar(160, "predict slides") as tick:  # 150 skipped at once, then slides of about 0.1 s
        tick(150)
        for i in range(3):
            p2.working_on(f"s{i}")
            time.sleep(0.1)
            p2.working_on(None)
            tick(151 + i)
        time.sleep(0.1)
    left = p2._err.getvalue().splitlines()[-1]
    # 7 left at ~0.1 s each (the slides worked on), not at the 150 skipped ones' ~0 s
    assert "153 of 160 through" in left and int(re.search(r"about (\d+) s left", left).group(1)) >= 1, left
    ended = len(lines)
    time.sleep(0.2)
    assert len([ln for ln in err.getvalue().splitlines() if ln]) == ended  # stopped with its loop
    for quiet_one in (Progress(QUIET, tty=False, err=io.StringIO()), Progress(tty=False, err=io.StringIO())):
        with quiet_one.bar(160 if quiet_one.level == QUIET else 1, "predict slides") as tick:  # quiet; one slide
            time.sleep(0.2)
        assert quiet_one._err.getvalue() == ""
