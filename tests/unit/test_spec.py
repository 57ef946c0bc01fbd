"""VM spec validation: every error names its field."""

import pytest
from pydantic import ValidationError

from stoker.domain.spec import VMSpec, valid_name

BASE = {"name": "web-1", "kernel": "/boot/vmlinuz"}


def errors(**overrides):
    with pytest.raises(ValidationError) as info:
        VMSpec.model_validate({**BASE, **overrides})
    return {".".join(str(p) for p in e["loc"]): e["msg"] for e in info.value.errors()}


def test_minimal_spec_has_defaults():
    spec = VMSpec.model_validate(BASE)
    assert spec.vcpus == 1 and spec.memory_mib == 128
    assert spec.boot_timeout_s == 300 and spec.stop_timeout_s == 30
    assert spec.hypervisor == "qemu" and spec.accel == "auto"
    assert spec.restart.policy == "never"


@pytest.mark.parametrize(
    "name", ["", "-web", "Web", "web_1", "../etc", "a/b", "a" * 64, "web.1", " web"]
)
def test_bad_names(name):
    assert "name" in errors(name=name)
    assert not valid_name(name)


@pytest.mark.parametrize("name", ["a", "0", "web-1", "a" * 63, "1-2-3"])
def test_good_names(name):
    VMSpec.model_validate({**BASE, "name": name})
    assert valid_name(name)


def test_negative_memory_names_the_field():
    assert "memory_mib" in errors(memory_mib=-1)


def test_zero_vcpus():
    assert "vcpus" in errors(vcpus=0)


def test_relative_kernel_path():
    assert "must be an absolute path" in errors(kernel="vmlinuz")["kernel"]


def test_unknown_field_is_an_error():
    assert "memory" in errors(memory=128)


def test_drive_format_and_path():
    errs = errors(drives=[{"path": "disk.img", "format": "vmdk"}])
    assert "drives.0.path" in errs and "drives.0.format" in errs


def test_port_forward_needs_user_network():
    errs = errors(network={"mode": "none", "port_forwards": [{"host_port": 1, "guest_port": 2}]})
    assert any("user" in m for m in errs.values())


def test_duplicate_host_port():
    net = {
        "mode": "user",
        "port_forwards": [
            {"host_port": 8080, "guest_port": 80},
            {"host_port": 8080, "guest_port": 81},
        ],
    }
    assert any("forwarded twice" in m for m in errors(network=net).values())


def test_tap_needs_a_name():
    assert errors(network={"mode": "tap"})


def test_bad_label_key():
    assert "labels" in errors(labels={"bad key": "x"})


def test_probe_kinds_need_their_fields():
    assert errors(probes=[{"kind": "http"}])
    assert errors(probes=[{"kind": "tcp"}])
    assert errors(probes=[{"kind": "exec"}])
    VMSpec.model_validate({**BASE, "probes": [{"kind": "http", "url": "http://127.0.0.1:1/"}]})


def test_cmdline_one_line():
    assert "cmdline" in errors(cmdline="a\nb")


def test_round_trip_json():
    spec = VMSpec.model_validate(
        {**BASE, "labels": {"tier": "web"}, "drives": [{"path": "/d.img"}]}
    )
    assert VMSpec.model_validate_json(spec.model_dump_json()) == spec
