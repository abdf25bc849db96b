"""Power control through a node's BMC: IPMI with pyghmi, Redfish with sushy.

Theory of operation
-------------------

Both libraries are blocking, and pyghmi keeps per-BMC sessions in process-wide state
that hangs when two threads use one BMC (measured here: the second action on a BMC from
another thread never returned). So each action runs in a child process
(`python -m bootd.power.bmc`), which also makes a timeout real: the child is killed.
asyncio bounds how many run at once.

Rules:

1. A node's `power:` (merged like its other settings) is templated per node when it is
   used: `{name}`, `{mac}`, `{ip}`, `{ip_last}` and `{pool}` in the IPMI host or the
   Redfish URL.
2. Actions: `status`; `on`; `off` (hard); `cycle` (on when off, a hard reset when on);
   `pxe` (a one-time boot from the network, then `cycle`).
3. Every node gets one typed result: ok with the power state seen, or the error in
   words. A BMC that does not answer within the node's `power.timeout` is an error for
   that node only.
4. Credentials are read from their file at each use (rotation needs no reload), reach
   the child on its stdin (never its command line), and never appear in a result, a log
   line or a repr.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from bootd.fleet.config import PowerConfig, SecretConfig
from bootd.fleet.inventory import NodeProfile

Action = Literal["status", "on", "off", "cycle", "pxe"]
ACTIONS: tuple[Action, ...] = ("status", "on", "off", "cycle", "pxe")
DEFAULT_PARALLEL = 8


class PowerError(Exception):
    """What a BMC (or the way to it) said, for the operator."""


@dataclass(frozen=True)
class PowerTarget:
    """One node's BMC, templated (rule 1)."""

    node: str
    kind: Literal["ipmi", "redfish"]
    address: str  # IPMI host, or the Redfish service's URL
    port: int
    username: str
    password: SecretConfig = field(repr=False)
    verify: bool | str = True  # Redfish: verify TLS (True), or with this CA bundle
    system: str | None = None
    timeout: float = 30.0

    @property
    def where(self) -> str:
        return f"ipmi {self.address}:{self.port}" if self.kind == "ipmi" else \
            f"redfish {self.address}"


@dataclass(frozen=True)
class PowerResult:
    node: str
    action: Action
    ok: bool
    state: str | None  # the power state after the action ("on" / "off"), when known
    error: str | None
    seconds: float
    where: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"node": self.node, "action": self.action, "ok": self.ok, "state": self.state,
                "error": self.error, "seconds": round(self.seconds, 3), "bmc": self.where}


def target_for(node: NodeProfile, power: PowerConfig | None = None) -> PowerTarget:
    """The node's BMC (rule 1); PowerError when it has none or a template cannot be
    filled (a catch-all node has no reserved address)."""
    power = power if power is not None else node.power
    if power is None:
        raise PowerError(f"{node.name} has no `power:` in its pool, tags or node config")
    ip = str(node.ip) if node.ip is not None else None
    fields = {"name": node.name, "mac": node.macs[0] if node.macs else None, "ip": ip,
              "ip_last": ip.rsplit(".", 1)[1] if ip else None, "pool": node.pool}

    def fill(template: str) -> str:
        try:
            return template.format_map({k: v for k, v in fields.items() if v is not None})
        except KeyError as exc:
            raise PowerError(f"{node.name}: the BMC address {template!r} needs "
                             f"{{{exc.args[0]}}}, which this node does not have") from None

    if power.ipmi is not None:
        ipmi = power.ipmi
        return PowerTarget(node.name, "ipmi", fill(ipmi.host), ipmi.port, ipmi.username,
                           ipmi.password, timeout=power.timeout)
    assert power.redfish is not None
    rf = power.redfish
    verify: bool | str = str(rf.ca) if rf.ca is not None and rf.verify_tls else rf.verify_tls
    return PowerTarget(node.name, "redfish", fill(rf.url), 0, rf.username, rf.password,
                       verify, rf.system, power.timeout)


def _password(secret: SecretConfig) -> str:
    if secret.value is not None:
        return secret.value
    assert secret.file is not None
    try:
        return secret.file.read_text().rstrip("\r\n")
    except OSError as exc:
        raise PowerError(f"cannot read the BMC password file {secret.file}: "
                         f"{exc.strerror}") from None


def _ipmi(target: PowerTarget, action: Action) -> str:
    from pyghmi import exceptions as ipmi_errors
    from pyghmi.ipmi import command

    try:
        bmc = command.Command(bmc=target.address, userid=target.username,
                              password=_password(target.password), port=target.port,
                              keepalive=False)
    except ipmi_errors.IpmiException as exc:
        raise PowerError(f"IPMI session to {target.address}:{target.port}: {exc}") from None
    try:
        if action == "pxe":
            bmc.set_bootdev("network", persist=False)
        if action != "status":
            bmc.set_power({"on": "on", "off": "off", "cycle": "boot", "pxe": "boot"}[action],
                          wait=False)
        return str(bmc.get_power()["powerstate"])
    except ipmi_errors.IpmiException as exc:
        raise PowerError(f"IPMI {action} at {target.address}:{target.port}: {exc}") from None


def _redfish(target: PowerTarget, action: Action) -> str:
    import sushy
    from sushy import exceptions as redfish_errors

    try:
        root = sushy.Sushy(target.address + "/redfish/v1", username=target.username,
                           password=_password(target.password), verify=target.verify,
                           server_side_retries=1, read_timeout=int(target.timeout),
                           connect_timeout=min(10, int(target.timeout)))
        if target.system is not None:
            path = target.system if target.system.startswith("/") else \
                f"/redfish/v1/Systems/{target.system}"
        else:
            members = root.get_system_collection().members_identities
            if len(members) != 1:
                raise PowerError(f"the Redfish service at {target.address} has "
                                 f"{len(members)} systems; name one in power.redfish.system")
            path = members[0]
        system = root.get_system(path)
        if action == "pxe":
            system.set_system_boot_options(target=sushy.BOOT_SOURCE_TARGET_PXE,
                                           enabled=sushy.BOOT_SOURCE_ENABLED_ONCE)
        if action == "on":
            system.reset_system(sushy.RESET_ON)
        elif action == "off":
            system.reset_system(sushy.RESET_FORCE_OFF)
        elif action in ("cycle", "pxe"):
            on = system.power_state == sushy.PowerState.ON
            system.reset_system(sushy.RESET_FORCE_RESTART if on else sushy.RESET_ON)
        system.refresh()
        return str(getattr(system.power_state, "value", system.power_state) or "unknown")
    except redfish_errors.SushyError as exc:
        raise PowerError(f"Redfish {action} at {target.address}: {exc}") from None
    except OSError as exc:  # requests' connection errors
        raise PowerError(f"Redfish {action} at {target.address}: {exc}") from None


def act(target: PowerTarget, action: Action) -> str:
    """Blocking: do `action` at the node's BMC, return the power state it reports."""
    if action not in ACTIONS:
        raise PowerError(f"unknown power action {action!r}")
    state = _ipmi(target, action) if target.kind == "ipmi" else _redfish(target, action)
    return state.lower()


def _child_main() -> int:
    """The child: one action, the target on stdin as JSON, the outcome on stdout."""
    request = json.loads(sys.stdin.read())
    target = PowerTarget(**{**request["target"],
                            "password": SecretConfig(value=request["password"])})
    try:
        out = {"ok": True, "state": act(target, request["action"])}
    except PowerError as exc:
        out = {"ok": False, "error": str(exc)}
    except Exception as exc:  # a library's surprise is this node's error
        out = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    sys.stdout.write(json.dumps(out))
    return 0


class PowerControl:
    """Runs actions on many BMCs at once, at most `parallel` at a time (rule 3)."""

    def __init__(self, parallel: int = DEFAULT_PARALLEL) -> None:
        self.parallel = parallel
        self._slots = asyncio.Semaphore(parallel)

    async def one(self, target: PowerTarget, action: Action) -> PowerResult:
        started = time.monotonic()

        def result(ok: bool, state: str | None, error: str | None) -> PowerResult:
            return PowerResult(target.node, action, ok, state, error,
                               time.monotonic() - started, target.where)

        try:
            password = _password(target.password)
        except PowerError as exc:
            return result(False, None, str(exc))
        fields = {k: v for k, v in vars(target).items() if k != "password"}
        request = json.dumps({"target": fields, "password": password, "action": action})
        async with self._slots:
            child = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bootd.power.bmc", stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            try:
                out, err = await asyncio.wait_for(child.communicate(request.encode()),
                                                  target.timeout)
            except TimeoutError:
                child.kill()
                await child.wait()
                return result(False, None, f"{target.where} did not answer within "
                                           f"{target.timeout:g}s")
            except asyncio.CancelledError:
                child.kill()
                await child.wait()
                raise
        try:
            answer = json.loads(out)
        except ValueError:
            tail = err.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
            return result(False, None, f"{target.where}: the power helper failed: {tail[0]}")
        return result(bool(answer["ok"]), answer.get("state"), answer.get("error"))

    async def many(self, targets: Sequence[PowerTarget], action: Action,
                   ) -> list[PowerResult]:
        return list(await asyncio.gather(*(self.one(t, action) for t in targets)))


if __name__ == "__main__":
    sys.exit(_child_main())
