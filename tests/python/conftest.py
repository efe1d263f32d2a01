"""Fixtures: a running kvroute-emulator process on a free port."""
import os
import subprocess
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def emulator_binary() -> str:
    explicit = os.environ.get("KVROUTE_EMULATOR")
    if explicit:
        return explicit
    for profile in ("release", "debug"):
        p = ROOT / "target" / profile / "kvroute-emulator"
        if p.exists():
            return str(p)
    raise RuntimeError("no kvroute-emulator binary: run `cargo build -p kvroute-emulator` (just py-tests does)")


@pytest.fixture(scope="module")
def emulator():
    """Yields the base URL of an emulator (seed-rig profile, 50x real time)."""
    proc = subprocess.Popen(
        [emulator_binary(), "--port", "0", "--time-scale", "50", "--served-model-name", "llama"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("listening on "), line
        yield "http://" + line.split()[-1]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
