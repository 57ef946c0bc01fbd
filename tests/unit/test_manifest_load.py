"""Manifest loading and validation: every error names file, key path and line; defaults merge
as documented; the example mirrors the seed's three modules."""

from __future__ import annotations

from pathlib import Path

import pytest

from stoker.manifest import (
    Manifest,
    ManifestError,
    ManifestProblem,
    load_manifest,
    parse_sources,
)
from stoker.manifest.validate import build_manifest, inline_name

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "host.toml"
VM = 'name = "{name}"\nkernel = "/boot/vmlinuz"\n'


def vm(name: str, extra: str = "") -> str:
    return "[[vm]]\n" + VM.format(name=name) + extra


def load(**files: str) -> Manifest:
    """Files given as name=text ("a_toml" is a.toml), validated together."""
    sources = [(name.replace("_", "."), text.encode()) for name, text in files.items()]
    return build_manifest(parse_sources(sources))


def problems(**files: str) -> list[ManifestProblem]:
    with pytest.raises(ManifestError) as info:
        load(**files)
    return list(info.value.problems)


def only(**files: str) -> ManifestProblem:
    found = problems(**files)
    assert len(found) == 1, found
    return found[0]


# --------------------------------------------------------------------------- the example


def test_example_mirrors_the_seed_modules() -> None:
    manifest = load_manifest(EXAMPLE)
    web = manifest.vm("web-server")
    assert web is not None and web.quota is not None
    # quota_manager.sh set web-server --cpu 200 --memory 4096 --disk 100 --network 100
    assert web.quota.cpu_percent == 200 and web.quota.memory_mib == 4096
    assert web.quota.disk_gib == 100 and web.quota.network_mbps == 100
    assert web.quota.disk_iops == 1000  # from [defaults.quota]
    # snapshot_manager.sh set-policy web-server "daily:7,weekly:4"
    assert web.snapshot_policy is not None
    assert web.snapshot_policy.retention == "daily:7,weekly:4"
    crons = {s.name: (s.spec.action, s.spec.vm, s.spec.cron) for s in manifest.schedules}
    assert crons["web-server-start"] == ("start", "web-server", "0 8 * * 1-5")
    assert crons["web-server-stop"] == ("stop", "web-server", "0 18 * * *")
    assert crons["daily-report"][0] == "report"
    assert {vm.name for vm in manifest.vms} == {"web-server", "db", "batch"}


# --------------------------------------------------------------------------- each kind of error


def test_unknown_key_names_file_path_line_and_the_key_meant() -> None:
    p = only(host_toml=vm("web", "quota = { cpu = 200 }\n"))
    assert (p.file, p.line, p.path) == ("host.toml", 4, "vm[web].quota.cpu")
    assert "unknown key 'cpu'" in p.message and "cpu_percent" in p.message
    assert str(p).startswith("host.toml:4: vm[web].quota.cpu: ")


def test_unknown_section() -> None:
    p = only(host_toml="[[vms]]\nname = 'x'\n")
    assert (p.line, p.path) == (1, "vms") and "'vm'" in p.message


def test_table_instead_of_array_of_tables() -> None:
    p = only(host_toml='[vm]\nname = "web"\n')
    assert p.path == "vm" and "[[vm]]" in p.message


def test_wrong_type_is_not_coerced() -> None:
    p = only(host_toml=vm("web", 'memory_mib = "4096"\n'))
    assert (p.line, p.path) == (4, "vm[web].memory_mib")
    assert "integer" in p.message and '"4096"' in p.message


def test_bad_values_inside_nested_models_and_arrays() -> None:
    text = vm(
        "web",
        'drives = [\n  { path = "/ok.img" },\n  { path = "rel.img" },\n]\n'
        '[[vm.probes]]\nkind = "tcp"\nport = 0\n'
        '[vm.restart]\npolicy = "sometimes"\n',
    )
    found = {p.path: p for p in problems(host_toml=text)}
    assert found["vm[web].drives[1].path"].line == 6
    assert "absolute" in found["vm[web].drives[1].path"].message
    assert found["vm[web].probes[0].port"].line == 10
    assert found["vm[web].restart.policy"].line == 12
    assert "on-failure" in found["vm[web].restart.policy"].message


def test_probe_kind_errors_name_the_kinds() -> None:
    p = only(host_toml=vm("web", 'probes = [{ kind = "ping" }]\n'))
    assert p.path == "vm[web].probes[0]" and "vmm, http, tcp, exec" in p.message
    p = only(host_toml=vm("web", 'probes = [{ kind = "http", ur = "x", url = "http://a" }]\n'))
    assert p.path == "vm[web].probes[0].ur" and "'url'" in p.message


def test_missing_required_key_and_unnamed_entry_by_index() -> None:
    found = problems(host_toml='[[vm]]\nvcpus = 2\n[[vm]]\nname = "b"\nkernel = "/k"\n')
    assert {(p.path, p.line, p.message) for p in found} == {
        ("vm[0].name", 1, "is required"),
        ("vm[0].kernel", 1, "is required"),
    }


def test_bad_snapshot_policy_uses_the_retention_parser() -> None:
    p = only(host_toml=vm("web", 'snapshot_policy = { retention = "daily:7,weakly:4" }\n'))
    assert p.path == "vm[web].snapshot_policy.retention" and "'weekly'" in p.message
    p = only(host_toml=vm("web", 'snapshot_policy = { interval = "30s" }\n'))
    assert p.path == "vm[web].snapshot_policy.interval"


def test_schedule_errors_use_the_scheduler_checks() -> None:
    text = vm("web") + (
        '[[schedule]]\nname = "rep"\naction = "report"\ncron = "0 0 * * *"\n'
        'options = { period = "hourly" }\n'
        '[[schedule]]\nname = "bad-cron"\naction = "start"\nvm = "web"\ncron = "0 8 * * 8"\n'
        '[[schedule]]\naction = "stop"\nvm = "web"\ncron = "0 18 * * *"\n'
        '[[schedule]]\nname = "both"\naction = "stop"\ncron = "0 18 * * *"\n'
    )
    found = {p.path: p for p in problems(host_toml=text)}
    assert "hourly" in found["schedule[rep].options.period"].message
    assert found["schedule[bad-cron].cron"].line == 13
    assert "name" in found["schedule[2]"].message  # a [[schedule]] needs a name
    assert "exactly one of vm" in found["schedule[both]"].message


def test_inline_schedule_cannot_target_others_or_report() -> None:
    text = vm(
        "web",
        '[[vm.schedules]]\naction = "start"\ncron = "0 8 * * *"\nselector = { a = "b" }\n'
        '[[vm.schedules]]\naction = "report"\ncron = "0 8 * * *"\n',
    )
    found = {p.path: p for p in problems(host_toml=text)}
    assert found["vm[web].schedules[0].selector"].line == 7
    assert "[[schedule]]" in found["vm[web].schedules[1].action"].message


def test_duplicate_vm_across_files_names_both() -> None:
    p = only(a_toml=vm("web"), b_toml="\n" + vm("web"))
    assert (p.file, p.line, p.path) == ("b.toml", 2, "vm[web]")
    assert "a.toml:1" in p.message


def test_duplicate_schedule_names_including_derived_ones() -> None:
    text = vm("web", '[[vm.schedules]]\naction = "start"\ncron = "0 8 * * *"\n') + (
        '[[schedule]]\nname = "web-start"\naction = "stop"\nvm = "web"\ncron = "0 9 * * *"\n'
    )
    p = only(host_toml=text)
    assert (p.line, p.path) == (7, "schedule[web-start]")
    assert "declared twice" in p.message and "host.toml:4" in p.message


def test_references_to_missing_vm_and_network() -> None:
    text = vm("web", 'network_name = "lan2"\n') + (
        '[[network]]\nname = "lan"\nsubnet = "10.20.0.0/24"\n'
        '[[schedule]]\nname = "s"\naction = "stop"\nvm = "ghost"\ncron = "0 18 * * *"\n'
    )
    found = {p.path: p for p in problems(host_toml=text)}
    assert found["vm[web].network_name"].line == 4
    assert "'lan'" in found["vm[web].network_name"].message
    assert found["schedule[s].vm"].line == 11 and "ghost" in found["schedule[s].vm"].message


def test_builtin_default_network_needs_no_entry() -> None:
    manifest = load(host_toml=vm("web", 'network_name = "default"\n'))
    assert manifest.vms[0].network_name == "default"


def test_networks_overlap_or_not_private() -> None:
    text = (
        '[[network]]\nname = "a"\nsubnet = "10.0.0.0/8"\n'
        '[[network]]\nname = "b"\nsubnet = "10.1.0.0/24"\n'
        '[[network]]\nname = "c"\nsubnet = "8.8.8.0/24"\n'
        '[[network]]\nname = "d"\nsubnet = "10.0.0.1/24"\n'
    )
    found = {p.path: p for p in problems(host_toml=text)}
    assert "overlaps network 'a'" in found["network[b].subnet"].message
    assert "private" in found["network[c].subnet"].message
    assert found["network[d].subnet"].line == 12


def test_not_utf8_names_the_line() -> None:
    with pytest.raises(ManifestError) as info:
        parse_sources([("host.toml", b'[[vm]]\nname = "web"\nlabels = { a = "caf\xe9" }\n')])
    (p,) = info.value.problems
    assert (p.file, p.line) == ("host.toml", 3) and "UTF-8" in p.message and "0xe9" in p.message


def test_toml_syntax_error_names_the_line() -> None:
    p = only(host_toml=vm("web", "vcpus = = 2\n"))
    assert p.line == 4 and "not valid TOML" in p.message


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        ("1979-05-27T07:32:00Z", "datetime"),
        ("1979-05-27", "date"),
        ("08:00:00", "time"),
    ],
)
def test_toml_dates_and_times_are_refused(value: str, kind: str) -> None:
    text = vm("web") + f'[[vm.schedules]]\naction = "start"\ncron = {value}\n'
    p = only(host_toml=text)
    assert (p.path, p.line) == ("vm[web].schedules[0].cron", 6)
    assert f"TOML {kind}" in p.message and "quote it" in p.message


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "+nan"])
def test_nan_and_inf_are_refused(value: str) -> None:
    p = only(host_toml=vm("web", f"boot_timeout_s = {value}\n"))
    assert (p.path, p.line) == ("vm[web].boot_timeout_s", 4) and "finite" in p.message


def test_all_errors_are_collected_and_sorted_by_file_and_line() -> None:
    found = problems(
        b_toml=vm("b", "vcpus = 0\n"),
        a_toml=vm("a", 'memory_mib = "x"\ncolor = "red"\n'),
    )
    assert [(p.file, p.line) for p in found] == [("a.toml", 4), ("a.toml", 5), ("b.toml", 4)]
    text = str(ManifestError(found))
    assert text.splitlines()[0].startswith("the manifest has 3 problems")


def test_a_bad_default_is_reported_once_not_per_vm() -> None:
    text = "[defaults]\nquota = { cpu_percent = -1 }\n" + vm("a") + vm("b")
    p = only(host_toml=text)
    assert (p.path, p.line) == ("defaults.quota.cpu_percent", 2)


def test_a_default_set_in_two_files_names_both() -> None:
    p = only(a_toml="[defaults]\nwarm_start = true\n", b_toml="[defaults]\nwarm_start = false\n")
    assert (p.file, p.path) == ("b.toml", "defaults.warm_start") and "a.toml:2" in p.message


def test_memory_quota_below_guest_ram_says_where_the_value_comes_from() -> None:
    text = "[defaults.quota]\nmemory_mib = 256\n" + vm("web", "memory_mib = 512\n")
    p = only(host_toml=text)
    assert p.path == "vm[web].quota.memory_mib" and "defaults.quota, host.toml:1" in p.message


# --------------------------------------------------------------------------- defaults merge


def test_defaults_merge_key_by_key_and_probes_replace() -> None:
    text = (
        '[defaults]\nwarm_start = true\nlabels = { site = "fra", tier = "x" }\n'
        "quota = { cpu_percent = 100, memory_mib = 2048 }\n"
        'snapshot_policy = { retention = "daily:7", interval = "1d" }\n'
        'restart = { policy = "on-failure", max_retries = 3 }\n'
        '[[defaults.probes]]\nkind = "vmm"\n'
        + vm(
            "own",
            'labels = { tier = "web" }\nquota = { cpu_percent = 200 }\nwarm_start = false\n'
            'snapshot_policy = { retention = "" }\nrestart = { max_retries = 9 }\n'
            'probes = [{ kind = "tcp", port = 22 }]\n',
        )
        + vm("plain")
        + vm("noprobes", "probes = []\n")
    )
    manifest = load(host_toml=text)
    own, plain, noprobes = (manifest.vm(n) for n in ("own", "plain", "noprobes"))
    assert own is not None and plain is not None and noprobes is not None
    assert own.spec.labels == {"site": "fra", "tier": "web"}
    assert own.quota is not None and (own.quota.cpu_percent, own.quota.memory_mib) == (200, 2048)
    assert own.snapshot_policy is not None
    assert (own.snapshot_policy.retention, own.snapshot_policy.interval) == (None, "1d")
    assert (own.spec.restart.policy, own.spec.restart.max_retries) == ("on-failure", 9)
    assert [p.kind for p in own.spec.probes] == ["tcp"]
    assert own.warm_start is False and plain.warm_start is True
    assert plain.spec.labels == {"site": "fra", "tier": "x"}
    assert [p.kind for p in plain.spec.probes] == ["vmm"]
    assert noprobes.spec.probes == []


# --------------------------------------------------------------------------- files


def test_directory_is_read_in_name_order_skipping_hidden_files(tmp_path: Path) -> None:
    (tmp_path / "b.toml").write_text(vm("b"))
    (tmp_path / "a.toml").write_text(vm("a"))
    (tmp_path / ".#a.toml").write_text("broken = [")
    (tmp_path / "notes.txt").write_text("not toml")
    manifest = load_manifest(tmp_path)
    assert manifest.files == (str(tmp_path / "a.toml"), str(tmp_path / "b.toml"))


def test_empty_directory_and_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=r"no \*\.toml files"):
        load_manifest(tmp_path)
    with pytest.raises(ManifestError, match="no such file"):
        load_manifest(tmp_path / "nope.toml")


def test_hash_ignores_how_the_manifest_is_split() -> None:
    one = load(host_toml="[defaults]\nwarm_start = true\n" + vm("a") + vm("b"))
    two = load(b_toml=vm("b"), a_toml=vm("a") + "[defaults]\nwarm_start = true\n")
    assert one.hash == two.hash
    assert load(host_toml=vm("a") + vm("b")).hash != one.hash


def test_inline_schedule_names() -> None:
    text = vm(
        "web",
        '[[vm.schedules]]\naction = "start"\ncron = "0 8 * * *"\n'
        '[[vm.schedules]]\naction = "start"\ncron = "0 9 * * *"\n',
    )
    assert [s.name for s in load(host_toml=text).schedules] == ["web-start", "web-start-2"]
    long = inline_name("v" * 63, "restart", 2)
    assert len(long) <= 63 and long.endswith("-restart-2")
