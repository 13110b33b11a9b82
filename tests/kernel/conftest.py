"""Targets of the kernel conformance suite: the emulated kernel per generation, and the real device.

The real target only runs as root on a machine with ``/dev/liveupdate`` whose generation (detected
with the kernel-abi.md §12 probe order, or named by ``LUO_REAL_ABI=rfc-v2|v3|session[:6.19|:g6]``)
is the one the test is for; a bare ``session`` gets its profile from the GET_NAME probe, and
Linux 7.2 is G6).  It never kexecs: tests that need a reboot use the emulated machine.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from luo_agent.kernel.device import Abi
from luo_agent.kernel.syscalls import DEVICE_PATH, RealSyscalls
from tests.kernel.luo_raw import Target, probe_generation

# (id, abi, profile) of every emulated target.
EMULATED: dict[str, list[tuple[str, str, str | None]]] = {
    Abi.RFC_V2: [("emu-rfc-v2", Abi.RFC_V2, None)],
    Abi.V3: [("emu-v3", Abi.V3, None)],
    Abi.SESSION: [("emu-6.19", Abi.SESSION, "6.19"), ("emu-g6", Abi.SESSION, "g6")],
}

_real_generation: tuple[str, str | None] | str | None = None


def _detect_real() -> tuple[str, str | None] | str:
    """Cached: the real kernel's (abi, profile), or why the real target is unusable."""
    global _real_generation
    if _real_generation is None:
        if not os.path.exists(DEVICE_PATH):
            _real_generation = f"{DEVICE_PATH} does not exist (no LUO kernel)"
        elif os.geteuid() != 0:
            _real_generation = "real-kernel tests need root"
        elif env := os.environ.get("LUO_REAL_ABI"):
            abi, _, profile = env.partition(":")
            if abi == Abi.SESSION and not profile:
                # The GET_NAME probe tells 6.19 from G6 (Linux 7.2, the reference kernel).
                probed = probe_generation(RealSyscalls())
                profile = (probed[1] if isinstance(probed, tuple) else None) or "g6"
            _real_generation = (abi, profile or None)
        else:
            _real_generation = probe_generation(RealSyscalls())
    return _real_generation


def _real_target(abi: str) -> Target:
    detected = _detect_real()
    if isinstance(detected, str):
        pytest.skip(f"real kernel: {detected}")
    if detected[0] != abi:
        pytest.skip(f"real kernel speaks {detected[0]}, test is for {abi}")
    return Target(id="real", abi=abi, profile=detected[1], sc=RealSyscalls())


def _emulated_target(tmp_path: Path, tid: str, abi: str, profile: str | None) -> Iterator[Target]:
    from luo_agent.kernel.emulator import EmulatedMachine

    machine = EmulatedMachine(tmp_path / tid, abi, profile)
    with machine:
        machine.boot()
        target = Target(id=tid, abi=abi, profile=profile, sc=machine.syscalls, machine=machine)
        try:
            yield target
        finally:
            target.close_all()


def _params(abi: str, with_real: bool = True) -> list[Any]:
    params: list[Any] = [pytest.param(p, id=p[0]) for p in EMULATED[abi]]
    if with_real:
        params.append(
            pytest.param(("real", abi, None), id=f"real-{abi}", marks=pytest.mark.realkernel)
        )
    return params


def _target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Target]:
    tid, abi, profile = request.param
    if tid == "real":
        target = _real_target(abi)
        try:
            yield target
        finally:
            target.close_all()
    else:
        yield from _emulated_target(tmp_path, tid, abi, profile)


@pytest.fixture(params=_params(Abi.SESSION))
def session_target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Target]:
    """G5 (6.19) and G6 session kernels, emulated and real."""
    yield from _target(request, tmp_path)


@pytest.fixture(params=_params(Abi.V3))
def v3_target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Target]:
    yield from _target(request, tmp_path)


@pytest.fixture(params=_params(Abi.RFC_V2))
def rfc_v2_target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Target]:
    yield from _target(request, tmp_path)


# Emulated only: tests that kexec (a real kexec would end the test run).
@pytest.fixture(params=_params(Abi.SESSION, with_real=False))
def session_machine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Target]:
    yield from _target(request, tmp_path)


@pytest.fixture(params=_params(Abi.V3, with_real=False))
def v3_machine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Target]:
    yield from _target(request, tmp_path)


@pytest.fixture(params=_params(Abi.RFC_V2, with_real=False))
def rfc_v2_machine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Target]:
    yield from _target(request, tmp_path)


@pytest.fixture
def kexec_image(tmp_path: Path) -> Path:
    """Any small file will do as the emulated kernel's kexec image."""
    image = tmp_path / "vmlinuz"
    image.write_bytes(b"MZ not really a kernel\n" * 64)
    return image
