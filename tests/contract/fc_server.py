"""A Firecracker API test double, checked against Firecracker's published API spec.

This is NOT Firecracker. It serves HTTP/1.1 on a Unix socket like Firecracker does, and it
answers as the specification (``firecracker-v1.16.1.yaml`` in the shared directory, read at
run time, never copied) says Firecracker answers:

* every request body is validated against the Swagger 2.0 schema of that path and method
  (``$ref``s resolved through jsonschema); objects also refuse unknown fields, as
  Firecracker's serde structs do (``deny_unknown_fields``), because a misspelt field that is
  silently ignored is exactly the bug this double must catch;
* success is 204 (200 with a body for GETs); every refusal is 400 ``{"fault_message": ...}``;
* the pre-boot / post-boot rules the spec states are enforced (see ``PRE_BOOT_ONLY`` and
  ``FirecrackerDouble.handle``), plus a few Firecracker behaviours FACTS.md records: files
  are opened at PUT time (so they must exist), InstanceStart once, snapshot load only on a
  fresh process and a failed load ends the process.

Every request is recorded (``requests``; in executable mode also as JSON lines in
``<api-sock>.requests.jsonl``) for assertions. Run as a program (``main``), it stands in for
the ``firecracker`` executable: it takes ``--api-sock`` and ``--id``, "boots" by printing
console lines to stdout, writes metrics lines on FlushMetrics, and exits 0 after
SendCtrlAltDel when the guest command line has ``reboot=k``.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SPEC_PATH = (
    Path(__file__).resolve().parents[2]
    / ".."
    / "shared"
    / "firecracker"
    / "firecracker-v1.16.1.yaml"
)
READY_LINE = "fc-double: guest ready"
#: deltas written on every FlushMetrics: per drive, and for eth0
FLUSH_BLOCK = {"read_bytes": 4096, "write_bytes": 1024, "read_count": 2, "write_count": 1}
FLUSH_NET = {"rx_bytes_count": 1500, "tx_bytes_count": 700}

#: (method, template) that the spec calls pre-boot only (or says fail after startup)
PRE_BOOT_ONLY: frozenset[tuple[str, str]] = frozenset(
    {
        ("PUT", "/machine-config"),
        ("PATCH", "/machine-config"),
        ("PUT", "/cpu-config"),
        ("PUT", "/boot-source"),
        ("PUT", "/drives/{drive_id}"),
        ("PUT", "/pmem/{id}"),
        ("PUT", "/network-interfaces/{iface_id}"),
        ("PUT", "/balloon"),
        ("PUT", "/vsock"),
        ("PUT", "/entropy"),
        ("PUT", "/mmds/config"),
        ("PUT", "/snapshot/load"),
        # not stated in the spec; Firecracker refuses these after start
        ("PUT", "/logger"),
        ("PUT", "/metrics"),
        ("PUT", "/serial"),
        ("PUT", "/hotplug/memory"),
    }
)
#: (method, template) that the spec calls post-boot only
POST_BOOT_ONLY: frozenset[tuple[str, str]] = frozenset(
    {
        ("PATCH", "/drives/{drive_id}"),
        ("PATCH", "/pmem/{id}"),
        ("PATCH", "/network-interfaces/{iface_id}"),
        ("PUT", "/snapshot/create"),
        ("PATCH", "/vm"),
    }
)
#: what a snapshot load still allows to have been configured before it
ALLOWED_BEFORE_LOAD = frozenset({"/logger", "/metrics"})


def load_spec(path: Path = SPEC_PATH) -> dict[str, Any]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with open(path) as f:
        spec: dict[str, Any] = yaml.load(f, Loader=loader)
    return spec


def _strict(definitions: dict[str, Any]) -> dict[str, Any]:
    """Copy of the definitions where objects with properties refuse unknown fields."""
    defs = copy.deepcopy(definitions)

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node:
                node.setdefault("additionalProperties", False)
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(defs)
    return defs


@dataclass(frozen=True)
class Route:
    method: str
    template: str
    regex: re.Pattern[str]
    params: tuple[str, ...]
    body_schema: dict[str, Any] | None
    body_required: bool


class SpecIndex:
    """The spec's paths and body schemas, ready to match and validate requests."""

    def __init__(self, spec: dict[str, Any], strict: bool = True) -> None:
        self.spec = spec
        self.definitions = _strict(spec["definitions"]) if strict else spec["definitions"]
        self.routes: list[Route] = []
        for template, ops in spec["paths"].items():
            params = tuple(re.findall(r"{(\w+)}", template))
            regex = re.compile("^" + re.sub(r"{\w+}", r"([^/]+)", template) + "$")
            for method, op in ops.items():
                body = next((p for p in op.get("parameters", []) if p.get("in") == "body"), None)
                self.routes.append(
                    Route(
                        method.upper(),
                        template,
                        regex,
                        params,
                        body["schema"] if body else None,
                        bool(body and body.get("required")),
                    )
                )

    def has(self, method: str, template: str) -> bool:
        return any(r.method == method and r.template == template for r in self.routes)

    def match(self, method: str, path: str) -> tuple[Route, dict[str, str]] | None:
        for route in self.routes:
            m = route.regex.match(path)
            if m and route.method == method:
                return route, dict(zip(route.params, m.groups(), strict=True))
        return None

    def errors(self, schema: dict[str, Any], instance: Any) -> list[str]:
        """Validation errors of ``instance`` against a (possibly $ref) schema of this spec."""
        full = {**schema, "definitions": self.definitions}
        validator = jsonschema.Draft4Validator(full)
        return [
            f"{'/'.join(str(p) for p in e.absolute_path) or '<body>'}: {e.message}"
            for e in sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path))
        ]

    def definition_errors(self, name: str, instance: Any) -> list[str]:
        return self.errors({"$ref": f"#/definitions/{name}"}, instance)


@dataclass
class Recorded:
    method: str
    path: str
    template: str | None
    body: Any
    status: int
    fault: str | None = None


class Fault(Exception):
    """A 400 answer; ``exit_code`` set when Firecracker would also end the process."""

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class FirecrackerDouble:
    """The state machine behind the socket: Not started -> Running <-> Paused."""

    index: SpecIndex
    vm_id: str = "anonymous-instance"
    console: Callable[[str], None] = lambda line: None
    record_file: Path | None = None
    state: str = "Not started"
    booted: bool = False
    loaded_snapshot: bool = False
    configured: set[str] = field(default_factory=set)
    machine: dict[str, Any] = field(
        default_factory=lambda: {
            "vcpu_count": 1,
            "mem_size_mib": 128,
            "smt": False,
            "track_dirty_pages": False,
        }
    )
    boot_source: dict[str, Any] | None = None
    drives: dict[str, dict[str, Any]] = field(default_factory=dict)
    ifaces: dict[str, dict[str, Any]] = field(default_factory=dict)
    devices: dict[str, Any] = field(default_factory=dict)
    metrics_path: str | None = None
    requests: list[Recorded] = field(default_factory=list)
    exit_code: int | None = None
    #: the jail root when run by the (fake) jailer: every path is inside it
    chroot: Path | None = None
    #: called with an exit code after the answer is sent (executable mode: really exit)
    on_exit: Callable[[int], None] | None = None

    # ------------------------------------------------------------------ HTTP entry point

    def handle(self, method: str, path: str, raw: bytes) -> tuple[int, Any]:
        """Answer one request: (status, JSON body or None)."""
        matched = self.index.match(method, path)
        body: Any = None
        template = matched[0].template if matched else None
        try:
            if matched is None:
                raise Fault(f"Invalid request method and/or path: {method} {path}")
            route, params = matched
            if raw.strip():
                try:
                    body = json.loads(raw)
                except ValueError as exc:
                    raise Fault(
                        f"An error occurred when deserializing the json body: {exc}"
                    ) from exc
            if route.body_schema is not None:
                if body is None and route.body_required:
                    raise Fault("Empty request body: this request needs a JSON body")
                if body is not None:
                    errors = self.index.errors(route.body_schema, body)
                    if errors:
                        raise Fault("Invalid body: " + "; ".join(errors))
            elif body is not None:
                raise Fault(f"{method} {route.template} takes no body")
            status, answer = self._dispatch(method, route.template, params, body)
        except Fault as fault:
            self._record(Recorded(method, path, template, body, 400, str(fault)))
            if fault.exit_code is not None:
                self.exit_code = fault.exit_code
            return 400, {"fault_message": str(fault)}
        self._record(Recorded(method, path, template, body, status))
        return status, answer

    def _record(self, rec: Recorded) -> None:
        self.requests.append(rec)
        if self.record_file is not None:
            line = {"pid": os.getpid(), **rec.__dict__}
            with open(self.record_file, "a") as f:
                f.write(json.dumps(line) + "\n")

    # ------------------------------------------------------------------ rules

    def _dispatch(
        self, method: str, template: str, params: dict[str, str], body: Any
    ) -> tuple[int, Any]:
        key = (method, template)
        if key in PRE_BOOT_ONLY and self.booted:
            raise Fault(
                f"The requested operation is not supported after starting the microVM: "
                f"{method} {template}"
            )
        if key in POST_BOOT_ONLY and not self.booted:
            raise Fault(
                f"The requested operation is not supported before starting the microVM: "
                f"{method} {template}"
            )
        for name, value in params.items():
            id_field = {"drive_id": "drive_id", "iface_id": "iface_id", "id": "id"}[name]
            if isinstance(body, dict) and body.get(id_field) != value:
                raise Fault("The id from the path does not match the id from the body!")

        if method == "GET":
            return 200, self._get(template)
        handler = getattr(
            self, "_" + re.sub(r"\W+", "_", f"{method} {template}").strip("_").lower(), None
        )
        if handler is None:
            # valid per spec but not modelled: accept, as configuration, pre-boot
            self.configured.add(template)
            return 204, None
        handler(body, params)
        if method == "PUT" and template not in ("/actions", "/snapshot/create", "/snapshot/load"):
            self.configured.add(template)
        return 204, None

    def _get(self, template: str) -> Any:
        if template == "/":
            return {
                "app_name": "Firecracker",
                "id": self.vm_id,
                "state": self.state,
                "vmm_version": "1.16.1",
            }
        if template == "/machine-config":
            return self.machine
        if template == "/version":
            return {"firecracker_version": "1.16.1"}
        if template == "/vm/config":
            return self._vm_config()
        raise Fault(f"GET {template} is not modelled by the test double")

    def _vm_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "machine-config": self.machine,
            "drives": list(self.drives.values()),
            "network-interfaces": list(self.ifaces.values()),
        }
        if self.boot_source:
            config["boot-source"] = self.boot_source
        return config

    def host(self, path: str) -> Path:
        """Where a path Firecracker was given lies on the host: under the chroot if jailed."""
        if self.chroot is None:
            return Path(path)
        return self.chroot / path.lstrip("/")

    def _must_open(self, path: str, what: str) -> None:
        if not self.host(path).is_file():
            raise Fault(f"{what} cannot be opened: {path}: No such file or directory (os error 2)")

    def _put_machine_config(self, body: dict[str, Any], _: dict[str, str]) -> None:
        if body.get("smt") and body["vcpu_count"] > 1 and body["vcpu_count"] % 2:
            raise Fault(
                "The vCPU number is invalid! The vCPU number can only be 1 or an even "
                "number when SMT is enabled."
            )
        self.machine = {"smt": False, "track_dirty_pages": False, **body}

    def _put_boot_source(self, body: dict[str, Any], _: dict[str, str]) -> None:
        self._must_open(body["kernel_image_path"], "The kernel file")
        if "initrd_path" in body:
            self._must_open(body["initrd_path"], "The initrd file")
        self.boot_source = body

    def _put_drives_drive_id(self, body: dict[str, Any], params: dict[str, str]) -> None:
        if "socket" not in body:
            if "path_on_host" not in body or "is_read_only" not in body:
                raise Fault("A virtio-block drive needs path_on_host and is_read_only")
            self._must_open(body["path_on_host"], "Unable to create the block device: the file")
        if body["is_root_device"] and any(
            d["is_root_device"] for i, d in self.drives.items() if i != params["drive_id"]
        ):
            raise Fault("A root block device already exists!")
        self.drives[params["drive_id"]] = body

    def _patch_drives_drive_id(self, body: dict[str, Any], params: dict[str, str]) -> None:
        drive = self.drives.get(params["drive_id"])
        if drive is None:
            raise Fault(f"Invalid block device ID: {params['drive_id']}")
        drive.update({k: v for k, v in body.items() if k != "drive_id"})

    def _put_network_interfaces_iface_id(
        self, body: dict[str, Any], params: dict[str, str]
    ) -> None:
        self.ifaces[params["iface_id"]] = body

    def _patch_network_interfaces_iface_id(
        self, body: dict[str, Any], params: dict[str, str]
    ) -> None:
        iface = self.ifaces.get(params["iface_id"])
        if iface is None:
            raise Fault(f"Invalid network interface ID: {params['iface_id']}")
        iface.update({k: v for k, v in body.items() if k != "iface_id"})

    def _put_logger(self, body: dict[str, Any], _: dict[str, str]) -> None:
        if "log_path" in body:
            self._must_open(body["log_path"], "Cannot open the log file")

    def _put_metrics(self, body: dict[str, Any], _: dict[str, str]) -> None:
        if self.metrics_path is not None:
            raise Fault("Reinitialization of metrics not allowed.")
        self._must_open(body["metrics_path"], "Cannot open the metrics file")
        self.metrics_path = body["metrics_path"]

    def _put_balloon(self, body: dict[str, Any], _: dict[str, str]) -> None:
        if body["amount_mib"] > self.machine["mem_size_mib"]:
            raise Fault("Amount of pages requested cannot be greater than total amount of memory")
        self.devices["balloon"] = body

    def _put_vsock(self, body: dict[str, Any], _: dict[str, str]) -> None:
        self.devices["vsock"] = body

    def _put_entropy(self, body: dict[str, Any], _: dict[str, str]) -> None:
        self.devices["entropy"] = body

    def _put_actions(self, body: dict[str, Any], _: dict[str, str]) -> None:
        action = body["action_type"]
        if action == "InstanceStart":
            if self.booted:
                raise Fault(
                    "The requested operation is not supported after starting the microVM: "
                    "InstanceStart"
                )
            if self.boot_source is None:
                raise Fault("Cannot start microvm without kernel configuration.")
            self.booted = True
            self.state = "Running"
            self.console(f"fc-double: booting {self.boot_source.get('boot_args', '')}")
            self.console(READY_LINE)
        elif action == "SendCtrlAltDel":
            if not self.booted:
                raise Fault(
                    "The requested operation is not supported before starting the microVM: "
                    "SendCtrlAltDel"
                )
            args = (self.boot_source or {}).get("boot_args", "")
            if "reboot=k" in args.split() and "i8042.nokbd" not in args.split():
                self.console("fc-double: guest got Ctrl-Alt-Del, rebooting (reboot=k: exit)")
                self.exit_code = 0
        elif action == "FlushMetrics":
            if self.metrics_path is None:
                raise Fault("The metrics system is not initialized: cannot flush metrics")
            self._flush_metrics()

    def _flush_metrics(self) -> None:
        line: dict[str, Any] = {"utc_timestamp_ms": 0}
        if self.booted:
            for drive_id in self.drives:
                line[f"block_{drive_id}"] = dict(FLUSH_BLOCK)
            line["block"] = {k: v * len(self.drives) for k, v in FLUSH_BLOCK.items()}
            for iface_id in self.ifaces:
                line[f"net_{iface_id}"] = dict(FLUSH_NET)
            line["net"] = {k: v * len(self.ifaces) for k, v in FLUSH_NET.items()}
        assert self.metrics_path is not None
        with open(self.host(self.metrics_path), "a") as f:
            f.write(json.dumps(line) + "\n")

    def _patch_vm(self, body: dict[str, Any], _: dict[str, str]) -> None:
        self.state = "Paused" if body["state"] == "Paused" else "Running"

    def _put_snapshot_create(self, body: dict[str, Any], _: dict[str, str]) -> None:
        if self.state != "Paused":
            raise Fault(
                f"Cannot create a snapshot: the microVM must be paused (it is {self.state})"
            )
        if body.get("snapshot_type") == "Diff" and not self.machine.get("track_dirty_pages"):
            raise Fault("Diff snapshots require dirty page tracking (track_dirty_pages)")
        for key in ("snapshot_path", "mem_file_path"):
            if not self.host(body[key]).parent.is_dir():
                raise Fault(f"Cannot create {body[key]}: No such file or directory (os error 2)")
        state = {"double": "fc-double vmstate", "vm": self._vm_config()}
        self.host(body["snapshot_path"]).write_text(json.dumps(state))
        with open(self.host(body["mem_file_path"]), "wb") as f:
            f.truncate(self.machine["mem_size_mib"] * 1024 * 1024)

    def _put_snapshot_load(self, body: dict[str, Any], _: dict[str, str]) -> None:
        extra = self.configured - ALLOWED_BEFORE_LOAD
        if self.booted or extra:
            raise Fault(
                "Loading a microVM snapshot not allowed after configuring boot-specific "
                f"resources: {sorted(extra)}"
            )
        if ("mem_file_path" in body) == ("mem_backend" in body):
            raise Fault("Exactly one of mem_file_path and mem_backend must be given")
        mem = body.get("mem_file_path") or body["mem_backend"]["backend_path"]
        try:
            if body.get("mem_backend", {}).get("backend_type", "File") != "File":
                raise ValueError("the double models File memory backends only")
            if not self.host(mem).is_file():
                raise ValueError(f"cannot open memory file {mem}")
            state = json.loads(self.host(body["snapshot_path"]).read_text())
            if state.get("double") != "fc-double vmstate":
                raise ValueError("not a microVM state file")
        except (OSError, ValueError) as exc:
            # Firecracker ends the process after a failed load
            raise Fault(f"Load snapshot error: {exc}", exit_code=1) from exc
        vm = state["vm"]
        self.machine = vm["machine-config"]
        self.boot_source = vm.get("boot-source")
        self.drives = {d["drive_id"]: d for d in vm["drives"]}
        self.ifaces = {i["iface_id"]: i for i in vm["network-interfaces"]}
        for override in body.get("network_overrides", []):
            if override["iface_id"] not in self.ifaces:
                raise Fault(f"Invalid network override: no interface {override['iface_id']}", 1)
            self.ifaces[override["iface_id"]]["host_dev_name"] = override["host_dev_name"]
        self.booted = True
        self.loaded_snapshot = True
        self.state = "Running" if body.get("resume_vm") else "Paused"


# ---------------------------------------------------------------------------- HTTP/1.1


async def _serve_connection(
    double: FirecrackerDouble, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            headers = {
                k.strip().lower(): v.strip()
                for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)
            }
            length = int(headers.get("content-length", "0"))
            raw = await reader.readexactly(length) if length else b""
            status, body = double.handle(method, target.split("?", 1)[0], raw)
            reason = {200: "OK", 204: "No Content", 400: "Bad Request"}[status]
            out = f"HTTP/1.1 {status} {reason}\r\nServer: Firecracker API\r\n"
            if body is None:
                writer.write((out + "\r\n").encode())
            else:
                payload = json.dumps(body).encode()
                out += f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
                writer.write(out.encode() + payload)
            await writer.drain()
            if double.exit_code is not None and double.on_exit is not None:
                code = double.exit_code
                await asyncio.sleep(0.05)
                double.on_exit(code)
                return
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def start(double: FirecrackerDouble, socket_path: Path) -> asyncio.Server:
    """Serve ``double`` on ``socket_path`` in the running event loop."""
    return await asyncio.start_unix_server(
        lambda r, w: _serve_connection(double, r, w), path=str(socket_path)
    )


# ---------------------------------------------------------------------------- executable


def main(argv: list[str] | None = None) -> None:
    """Stand in for the ``firecracker`` executable: ``--api-sock PATH --id ID``."""
    args = list(sys.argv[1:] if argv is None else argv)
    opts: dict[str, str] = {}
    while args:
        arg = args.pop(0)
        if arg in ("--api-sock", "--id") and args:
            opts[arg] = args.pop(0)
        else:
            print(f"Arguments parsing error: unexpected argument {arg!r}", file=sys.stderr)
            os._exit(153)
    chroot = Path(os.environ["FC_DOUBLE_CHROOT"]) if os.environ.get("FC_DOUBLE_CHROOT") else None
    sock = Path(opts.get("--api-sock", "/run/firecracker.socket"))
    if chroot is not None:
        sock = chroot / str(sock).lstrip("/")
    if sock.exists():
        print(f"Failed to open the API socket at {sock}: Address in use", file=sys.stderr)
        os._exit(1)

    def console(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    def finish(code: int) -> None:
        sys.stdout.flush()
        os._exit(code)

    double = FirecrackerDouble(
        SpecIndex(load_spec()),
        vm_id=opts.get("--id", "anonymous-instance"),
        console=console,
        record_file=Path(str(sock) + ".requests.jsonl"),
        on_exit=finish,
        chroot=chroot,
    )

    async def run() -> None:
        server = await start(double, sock)
        async with server:
            await server.serve_forever()

    asyncio.run(run())


def jailer_main(argv: list[str] | None = None) -> None:
    """Stand in for the jailer: check its arguments, then run the double "chrooted".

    There is no real chroot: the double resolves every path under the jail root instead,
    which is what the driver's in-jail paths must work with.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    split = args.index("--")
    own, rest = args[:split], args[split + 1 :]
    opts: dict[str, list[str]] = {}
    i = 0
    while i < len(own):
        flag = own[i]
        if flag in ("--daemonize", "--new-pid-ns"):
            opts.setdefault(flag, []).append("")
            i += 1
            continue
        opts.setdefault(flag, []).append(own[i + 1])
        i += 2
    for required in ("--id", "--exec-file", "--uid", "--gid"):
        if required not in opts:
            print(f"jailer: missing {required}", file=sys.stderr)
            os._exit(1)
    exec_name = Path(opts["--exec-file"][0]).name
    base = Path(opts.get("--chroot-base-dir", ["/srv/jailer"])[0])
    root = base / exec_name / opts["--id"][0] / "root"
    (root / "jailer-argv.json").write_text(json.dumps(args))
    os.environ["FC_DOUBLE_CHROOT"] = str(root)
    main([*rest, "--id", opts["--id"][0]])


if __name__ == "__main__":
    main()
