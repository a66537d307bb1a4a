"""A short run of the fault campaign (scripts/campaign, issue 16 item 6):
five random faults on a real pair, every sample of the secondary a prefix
of the write history, the final images identical. The long run (hundreds
of faults) is for the README's line, not the suite."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.system
def test_a_short_fault_campaign_finds_no_violation_and_identical_images():
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "campaign"), "--faults", "5",
                        "--seed", "7"], capture_output=True, text=True, timeout=240)
    out = r.stdout
    assert r.returncode == 0, f"campaign exited {r.returncode}:\n{out}\n{r.stderr}"
    assert "Traceback" not in r.stderr, r.stderr
    faults = re.search(r"^faults by kind: (.*)$", out, re.M)
    assert faults and sum(int(n) for n in re.findall(r" (\d+)", faults.group(1))) == 5, out
    samples = re.search(r"^samples: (\d+) checked", out, re.M)
    assert samples and int(samples.group(1)) >= 5 * 2, out  # healed and drained, each fault
    assert re.search(r"^violations: 0$", out, re.M), out
    assert re.search(r"^final images: identical", out, re.M), out
    assert re.search(r"^campaign: 5 faults, 0 violations, \d+ samples, longest recovery "
                     r"[\d.]+ s, images identical \(seed 7\)$", out, re.M), out
