"""choose_accel decides from a probe; the real probe must answer quickly on any host."""

from __future__ import annotations

import time

import pytest

from stoker.host import kvm
from stoker.host.kvm import KvmProbe, choose_accel, probe_kvm, require_kvm

USABLE = KvmProbe(True, "usable")
HANGS = KvmProbe(False, "KVM_RUN did not return within 1.0 s (nested virtualisation?)")


def _fail() -> KvmProbe:
    raise AssertionError("the probe must not run for an explicit choice")


def test_auto_picks_kvm_when_usable() -> None:
    assert choose_accel("auto", lambda: USABLE) == ("kvm", None)


def test_auto_falls_back_to_tcg_with_reason() -> None:
    accel, warning = choose_accel("auto", lambda: HANGS)
    assert accel == "tcg"
    assert warning is not None and "did not return" in warning and "TCG" in warning


def test_explicit_choices_do_not_probe() -> None:
    assert choose_accel("kvm", _fail) == ("kvm", None)
    assert choose_accel("tcg", _fail) == ("tcg", None)


def test_unknown_accel_rejected() -> None:
    with pytest.raises(ValueError, match="hvf"):
        choose_accel("hvf", lambda: USABLE)


def test_require_kvm() -> None:
    require_kvm(lambda: USABLE)
    with pytest.raises(RuntimeError, match="not usable: KVM_RUN did not return"):
        require_kvm(lambda: HANGS)


def test_ioctl_numbers_match_linux_headers() -> None:
    # values from <linux/kvm.h> on x86_64
    assert kvm.KVM_GET_API_VERSION == 0xAE00
    assert kvm.KVM_CREATE_VM == 0xAE01
    assert kvm.KVM_RUN == 0xAE80
    assert kvm.KVM_SET_USER_MEMORY_REGION == 0x4020AE46
    assert kvm.KVM_SET_REGS == 0x4090AE82
    assert kvm.KVM_GET_SREGS == 0x8138AE83
    assert kvm.KVM_SET_SREGS == 0x4138AE84


def test_no_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kvm, "KVM_DEVICE", "/nonexistent/kvm")
    assert probe_kvm() == KvmProbe(False, "no /dev/kvm")


def test_real_probe_answers_quickly() -> None:
    started = time.monotonic()
    result = probe_kvm(timeout_s=1.0)
    elapsed = time.monotonic() - started
    assert elapsed < 3.0, f"probe took {elapsed:.2f} s"
    assert result.reason
    assert result.usable == (result.reason == "usable")
