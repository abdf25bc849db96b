"""The Deployment in deploy/kubernetes/, run under podman as a kubelet would run it, so the
container tests run what the manifests say and cannot drift from them.

Not a kubelet. Rules:
1. Every field of the pod template is either translated to podman or named below as not
   applying to one host (scheduling: nodeSelector, tolerations; cluster DNS: dnsPolicy).
   Any other field raises UnsupportedField: a field added to the manifest must be taught
   here, or the test fails and says which.
2. Volumes get the kubelet's semantics that matter to a non-root process: a hostPath
   `DirectoryOrCreate` is made root-owned 0755 when absent, `Directory` must exist; an
   emptyDir is 0777; a Secret's files are group fsGroup with the group read bit added
   (the kubelet's SetVolumeOwnership for read-only volumes); ConfigMap keys are files.
3. `hostNetwork: true` is the pod sharing the host's network namespace: here, a network
   namespace the test made (`--network ns:`), never the machine's own.
4. Init containers run to completion, in order, before the main container starts.
5. Probes are asked the way the kubelet asks a hostNetwork pod's httpGet probe: from the
   pod's network namespace (curl in the namespace), and also from inside the container.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "deploy" / "kubernetes"
CONTAINERS_CONF = ROOT / "deploy" / "podman" / "containers.conf"

Doc = dict[str, Any]

# rule 1: fields with nothing to do on one host
NOT_FOR_ONE_HOST = {"nodeSelector", "tolerations", "dnsPolicy"}
POD_FIELDS = {"hostNetwork", "securityContext", "terminationGracePeriodSeconds",
              "containers", "initContainers", "volumes"} | NOT_FOR_ONE_HOST
CONTAINER_FIELDS = {"name", "image", "command", "args", "securityContext", "readinessProbe",
                    "livenessProbe", "resources", "volumeMounts"}
SECURITY_FIELDS = {"runAsUser", "runAsGroup", "runAsNonRoot", "fsGroup", "seccompProfile",
                   "allowPrivilegeEscalation", "readOnlyRootFilesystem", "capabilities"}


class UnsupportedField(Exception):
    pass


def podman_env() -> dict[str, str]:
    """podman's settings for this machine kind (cgroup v1: runc, cgroupfs; no ulimits)."""
    return {**os.environ, "CONTAINERS_CONF": os.environ.get("CONTAINERS_CONF",
                                                            str(CONTAINERS_CONF))}


def podman(*args: str, timeout: float = 120, check: bool = True,
           ) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["podman", *args], capture_output=True, text=True,
                          timeout=timeout, env=podman_env(), check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args)} failed ({proc.returncode}): "
                           f"{proc.stderr.strip()}")
    return proc


@dataclass(frozen=True)
class Manifests:
    deployment: Doc
    configmaps: dict[str, Doc]
    secrets: dict[str, Doc]

    @classmethod
    def load(cls, directory: Path = MANIFESTS) -> Manifests:
        docs = [d for path in sorted(directory.glob("*.yaml"))
                for d in yaml.safe_load_all(path.read_text()) if d]
        by_kind: dict[str, list[Doc]] = {}
        for doc in docs:
            by_kind.setdefault(doc["kind"], []).append(doc)
        (deployment,) = by_kind["Deployment"]
        return cls(deployment,
                   {d["metadata"]["name"]: d for d in by_kind.get("ConfigMap", [])},
                   {d["metadata"]["name"]: d for d in by_kind.get("Secret", [])})

    @property
    def pod(self) -> Doc:
        spec: Doc = self.deployment["spec"]["template"]["spec"]
        return spec

    @property
    def container(self) -> Doc:
        (container,) = self.pod["containers"]
        found: Doc = container
        return found

    def config_text(self, volume: str = "config") -> str:
        """The text of the ConfigMap key the main container mounts from `volume`."""
        source = next(v for v in self.pod["volumes"] if v["name"] == volume)["configMap"]
        mount = next(m for m in self.container["volumeMounts"] if m["name"] == volume)
        text: str = self.configmaps[source["name"]]["data"][mount["subPath"]]
        return text


def _check_fields(where: str, doc: Doc, known: set[str]) -> None:
    unknown = set(doc) - known
    if unknown:
        raise UnsupportedField(f"{where}: {sorted(unknown)} not translated to podman "
                               f"(tests/e2e/pods.py)")


@dataclass
class PodRun:
    """One pod of the Deployment on this host. `host` stands in for the host's root
    filesystem (hostPath volumes live under it); `config_text` replaces the ConfigMap's
    bootd.yaml when a test must (None: the ConfigMap's own)."""

    manifests: Manifests
    image: str
    netns: str
    host: Path
    name: str = field(default_factory=lambda: f"bootd-test-{os.getpid()}")
    config_text: str | None = None
    started: list[str] = field(default_factory=list)  # container names, to remove at the end

    def __post_init__(self) -> None:
        _check_fields("pod spec", self.manifests.pod, POD_FIELDS)
        if not self.manifests.pod.get("hostNetwork"):
            raise UnsupportedField("only hostNetwork pods are translated")
        self.volumes = self._volumes()

    # -- volumes (rule 2)

    def _volumes(self) -> dict[str, Path]:
        root = self.host / "pod-volumes"
        fs_group = self.manifests.pod.get("securityContext", {}).get("fsGroup")
        out: dict[str, Path] = {}
        for volume in self.manifests.pod["volumes"]:
            name = volume["name"]
            if "configMap" in volume:
                path = root / name
                path.mkdir(parents=True, exist_ok=True)
                data = self.manifests.configmaps[volume["configMap"]["name"]]["data"]
                for key, value in data.items():
                    if key == "bootd.yaml" and self.config_text is not None:
                        value = self.config_text
                    (path / key).write_text(value)
                    (path / key).chmod(volume["configMap"].get("defaultMode", 0o644))
            elif "secret" in volume:
                path = root / name
                path.mkdir(parents=True, exist_ok=True)
                secret = self.manifests.secrets[volume["secret"]["secretName"]]
                items = {k: v.encode() for k, v in secret.get("stringData", {}).items()}
                items |= {k: base64.b64decode(v) for k, v in secret.get("data", {}).items()}
                mode = volume["secret"].get("defaultMode", 0o644)
                for key, value in items.items():
                    (path / key).write_bytes(value)
                    if fs_group is not None:
                        os.chown(path / key, 0, fs_group)
                        mode |= 0o440
                    (path / key).chmod(mode)
            elif "hostPath" in volume:
                path = self.host / volume["hostPath"]["path"].lstrip("/")
                kind = volume["hostPath"].get("type", "")
                if kind == "DirectoryOrCreate" and not path.exists():
                    path.mkdir(parents=True, mode=0o755)
                elif kind == "Directory" and not path.is_dir():
                    raise FileNotFoundError(f"hostPath {path} (type Directory) is missing")
            elif "emptyDir" in volume:
                path = root / name
                path.mkdir(parents=True, exist_ok=True)
                path.chmod(0o777)
            else:
                raise UnsupportedField(f"volume {name}: {sorted(volume)}")
            out[name] = path
        return out

    # -- containers

    def args(self, container: Doc, name: str) -> list[str]:
        """`podman run` arguments for `container` (without the image and its args)."""
        _check_fields(f"container {container['name']}", container, CONTAINER_FIELDS)
        pod_security = self.manifests.pod.get("securityContext", {})
        security = {**pod_security, **container.get("securityContext", {})}
        _check_fields(f"securityContext of {container['name']}", security, SECURITY_FIELDS)
        args = ["--name", name, "--network", f"ns:/run/netns/{self.netns}",
                "--stop-timeout", str(self.manifests.pod.get("terminationGracePeriodSeconds",
                                                               30))]
        uid, gid = security.get("runAsUser"), security.get("runAsGroup")
        if security.get("runAsNonRoot") and uid in (None, 0):
            raise UnsupportedField(f"{container['name']}: runAsNonRoot needs a runAsUser")
        if uid is not None:
            args += ["--user", f"{uid}:{gid if gid is not None else uid}"]
        if (fs_group := pod_security.get("fsGroup")) is not None:
            args += ["--group-add", str(fs_group)]
        seccomp = security.get("seccompProfile", {}).get("type", "RuntimeDefault")
        if seccomp == "Unconfined":
            args += ["--security-opt", "seccomp=unconfined"]
        elif seccomp != "RuntimeDefault":  # RuntimeDefault: podman's own default profile
            raise UnsupportedField(f"seccompProfile {seccomp}")
        if security.get("allowPrivilegeEscalation") is False:
            args += ["--security-opt", "no-new-privileges"]
        if security.get("readOnlyRootFilesystem"):
            args += ["--read-only", "--read-only-tmpfs=false"]  # Kubernetes adds no tmpfs
        caps = security.get("capabilities", {})
        args += [f"--cap-drop={c}" for c in caps.get("drop", [])]
        args += [f"--cap-add={c}" for c in caps.get("add", [])]
        limits = container.get("resources", {}).get("limits", {})
        if "memory" in limits:
            args += ["--memory", _bytes(limits["memory"])]
        if "cpu" in limits:
            args += ["--cpus", _cpus(limits["cpu"])]
        for mount in container.get("volumeMounts", []):
            source = self.volumes[mount["name"]]
            if "subPath" in mount:
                source = source / mount["subPath"]
            args += ["-v", f"{source}:{mount['mountPath']}"
                     + (":ro" if mount.get("readOnly") else "")]
        if "command" in container:
            args += ["--entrypoint", container["command"][0]]
        return args

    def command(self, container: Doc) -> list[str]:
        return [*container.get("command", [])[1:], *container.get("args", [])]

    def start(self, timeout: float = 60) -> str:
        """Run the init containers to completion, then start the main container (rule 4);
        returns its name."""
        for index, init in enumerate(self.manifests.pod.get("initContainers", [])):
            name = f"{self.name}-init{index}"
            podman("rm", "-f", name, check=False)
            self.started.append(name)
            done = podman("run", *self.args(init, name), self.image, *self.command(init),
                          timeout=timeout, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"init container {init['name']} failed "
                                   f"({done.returncode}): {done.stderr.strip()}")
        podman("rm", "-f", self.name, check=False)
        self.started.append(self.name)
        container = self.manifests.container
        podman("run", "-d", *self.args(container, self.name), self.image,
               *self.command(container), timeout=timeout)
        return self.name

    def stop(self) -> tuple[int, float]:
        """SIGTERM as the kubelet sends it (`podman stop`, the grace period as timeout):
        the exit code and how long the container took to exit."""
        grace = self.manifests.pod.get("terminationGracePeriodSeconds", 30)
        began = time.monotonic()
        podman("stop", "-t", str(grace), self.name, timeout=grace + 30)
        took = time.monotonic() - began
        code = podman("inspect", "--format", "{{.State.ExitCode}}", self.name).stdout
        return int(code.strip()), took

    def logs(self) -> str:
        out = podman("logs", self.name, check=False)
        return out.stdout + out.stderr

    def exec(self, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return podman("exec", self.name, *cmd, timeout=timeout, check=False)

    def host_path(self, container_path: str) -> Path | None:
        """Where a path inside the main container is on the host, by its volume mounts
        (None: in the image itself)."""
        best: tuple[int, Path] | None = None
        for mount in self.manifests.container.get("volumeMounts", []):
            where = mount["mountPath"].rstrip("/")
            if container_path == where or container_path.startswith(where + "/"):
                source = self.volumes[mount["name"]] / mount.get("subPath", "")
                rest = container_path[len(where):].lstrip("/")
                if best is None or len(where) > best[0]:
                    best = (len(where), source / rest if rest else source)
        return None if best is None else best[1]

    def pid(self) -> int:
        """The main container's first process, as the host sees it."""
        return int(podman("inspect", "--format", "{{.State.Pid}}", self.name).stdout)

    def remove(self) -> None:
        for name in self.started:
            podman("rm", "-f", "-t", "0", name, check=False)

    # -- probes (rule 5)

    def probe_urls(self) -> dict[str, str]:
        out = {}
        for kind in ("readinessProbe", "livenessProbe"):
            get = self.manifests.container.get(kind, {}).get("httpGet")
            if get is not None:
                scheme = get.get("scheme", "HTTP").lower()
                out[kind] = f"{scheme}://{get.get('host', '127.0.0.1')}:{get['port']}" \
                            f"{get.get('path', '/')}"
        return out

    def probe_from_namespace(self, url: str) -> int:
        """The HTTP status curl gets from the pod's network namespace (0: no answer)."""
        proc = subprocess.run(["ip", "netns", "exec", self.netns, "curl", "-s", "-o",
                               "/dev/null", "-w", "%{http_code}", "--max-time", "1", url],
                              capture_output=True, text=True, timeout=10, check=False)
        return int(proc.stdout or 0)

    def probe_from_container(self, url: str) -> int:
        """The HTTP status the container's own interpreter gets (0: no answer)."""
        code = ("import sys, urllib.request\n"
                "try:\n"
                f"    print(urllib.request.urlopen({url!r}, timeout=1).status)\n"
                "except Exception as exc:\n"
                "    print(getattr(exc, 'code', 0))\n")
        proc = self.exec("/opt/bootd/bin/python3", "-c", code)
        return int(proc.stdout.strip() or 0)

    def wait_ready(self, timeout: float = 60) -> None:
        url = self.probe_urls()["readinessProbe"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.probe_from_namespace(url) == 200:
                return
            state = podman("inspect", "--format", "{{.State.Status}}", self.name).stdout
            if state.strip() != "running":
                break
            time.sleep(0.2)
        raise AssertionError(f"{self.name} not ready at {url}; its log:\n"
                             + self.logs()[-3000:])


def stage_host(root: Path, image: Path) -> Path:
    """A host for the ConfigMap's bootd.yaml at `root`: the test image where the ConfigMap
    points (/srv/bootd/images/k8s-node/...), an empty TFTP root (iPXE comes from the
    image's /usr/lib/ipxe)."""
    images = root / "srv/bootd/images/k8s-node"
    images.mkdir(parents=True)
    (root / "srv/bootd/tftp").mkdir()
    for name in ("vmlinuz", "initrd.img", "rootfs.squashfs"):
        shutil.copy(image / name, images / name)
    return root


def lab_config(manifests: Manifests) -> tuple[str, str, str]:
    """The ConfigMap's bootd.yaml, changed only where the test image needs it, and the
    boot network's interface and address in CIDR form, as the lab must make them."""
    config = yaml.safe_load(manifests.config_text())
    # The test image's rootfs carries no kernel module tree: the ConfigMap's modprobes
    # (br_netfilter, overlay) would fail the join script. Nothing else is changed.
    config["defaults"]["kernel_modules"] = []
    (interface,) = config["server"]["interfaces"]
    prefix = ipaddress.ip_network(config["network"]["subnet"]).prefixlen
    return yaml.safe_dump(config), interface, f"{config['server']['address']}/{prefix}"


def _bytes(quantity: str) -> str:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return str(int(quantity[:-2]) * factor)
    return str(int(quantity))


def _cpus(quantity: str) -> str:
    return str(int(quantity[:-1]) / 1000) if quantity.endswith("m") else quantity
