"""Checks deploy/kubernetes against the schemas and against the real server (scripts/check-kubernetes.sh).

1. Renders the kustomize base and every overlay: with `kubectl kustomize` (or `kustomize build`) when
   one is installed, and always with the small renderer below; when both ran, their output must be
   the same documents.
2. `kubernetes-validate --strict` on every rendered document (and on the commented-out variants the
   files show: the grpc readiness probe, the HPA on a Sidecar metric), for each Kubernetes version in
   $K8S_VERSIONS.
3. The manifests against each other and against the server: labels and selectors, Service ports
   (never the admin port), probe ports and paths, container ports against the ConfigMap's
   sidecar.yaml, config paths on volumes, the Secret mount, the stop timing, every container
   argument against `sidecar serve --help`; then the real binary is started with the overlay's
   ConfigMap config (paths, addresses and ports rewritten to this machine) and the Deployment's
   args, following a model repository served over HTTP on loopback, with the worker runtime laid
   out as the Dockerfile lays it out; every probe path is fetched, grpc.health.v1 is asked, the admin
   token is tried, /repository/ and /metrics are read, and SIGTERM must stop it within the grace period.
4. The Dockerfile: COPY sources exist in the repository (tracked or new, not ignored, not excluded by
   Dockerfile.dockerignore), the binary is the `sidecar` product of `swift build -c release`, the
   worker runtime sits where SIDECAR_RUNTIME_DIR points, the shared libraries the binary links come
   from packages the runtime stage installs, the toolchain image is at least Package.swift's tools
   version, and the ENTRYPOINT/CMD flags parse.

Exit 0 when everything holds; 1 with one line per mismatch otherwise.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "kubernetes"
BASE = DEPLOY / "base"
OVERLAYS = sorted(p for p in (DEPLOY / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = DEPLOY / "Dockerfile.dockerignore"
SIDECAR_BIN = Path(os.environ.get("SIDECAR_BIN", ROOT / ".build" / "debug" / "sidecar"))
VENV_BIN = Path(sys.executable).parent
K8S_VERSIONS = os.environ.get("K8S_VERSIONS", "1.30.0 1.37.0").split()
WORK = ROOT / ".build" / "k8s-check"
READY_TIMEOUT_S = float(os.environ.get("K8S_CHECK_READY_TIMEOUT_S", "240"))

# From the README's sidecar.yaml table and Supervision: a stopping model's workers get
# timeouts.shutdown_grace_s (default 30 s) for their batches, then Shutdown, SIGTERM after 5 s and
# SIGKILL after 2 s more.
DEFAULT_SHUTDOWN_GRACE_S = 30
WORKER_STOP_ESCALATION_S = 7

failures: list[str] = []


def fail(message: str) -> None:
    failures.append(message)
    print(f"  FAIL {message}", flush=True)


def ok(message: str) -> None:
    print(f"  ok   {message}", flush=True)


def note(message: str) -> None:
    print(f"  note {message}", flush=True)


def section(title: str) -> None:
    print(f"== {title}", flush=True)


def rel(path: Path) -> str:
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


# ------------------------------------------------------------------------------------ rendering
#
# The fallback renderer: exactly what base/ and overlays/ use, and it refuses anything else rather
# than render it wrongly. Kustomize's order: resources (a directory is rendered first, recursively),
# then patches, images, replicas, namespace. Patches are strategic-merge patches given by `path`,
# matched to a resource by kind and name; the merge is recursive for mappings and, for lists of
# mappings that all have a `name` (containers, volumes, ports, env: their patch merge key), by
# name; any other list is replaced whole. `$patch` directives, `target:`, JSON 6902 patches,
# generators, name prefixes and label transformers are not implemented and stop the check.

KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources", "namespace", "images", "patches", "replicas"}
NAMESPACED = {
    "ConfigMap", "Secret", "Service", "Deployment", "StatefulSet", "PodDisruptionBudget",
    "HorizontalPodAutoscaler", "ServiceAccount", "NetworkPolicy", "PersistentVolumeClaim",
}
CLUSTER_SCOPED = {"Namespace"}


class RenderError(Exception):
    pass


def strategic_merge(target: Any, patch: Any, where: str) -> Any:
    if isinstance(patch, dict):
        if any(isinstance(k, str) and k.startswith("$") for k in patch):
            raise RenderError(f"{where}: '$' directives are not implemented by the fallback renderer")
        if not isinstance(target, dict):
            return copy.deepcopy(patch)
        result = dict(target)
        for key, value in patch.items():
            if value is None:
                result.pop(key, None)
            elif key in result:
                result[key] = strategic_merge(result[key], value, f"{where}.{key}")
            else:
                result[key] = copy.deepcopy(value)
        return result
    if isinstance(patch, list) and isinstance(target, list):
        named = lambda items: items and all(isinstance(i, dict) and "name" in i for i in items)  # noqa: E731
        if named(patch) and named(target):
            result = [copy.deepcopy(i) for i in target]
            for item in patch:
                for index, existing in enumerate(result):
                    if existing["name"] == item["name"]:
                        result[index] = strategic_merge(existing, item, f"{where}[{item['name']}]")
                        break
                else:
                    result.append(copy.deepcopy(item))
            return result
    return copy.deepcopy(patch)


def split_image(image: str) -> tuple[str, str | None, str | None]:
    digest = None
    if "@" in image:
        image, digest = image.split("@", 1)
    tag = None
    last = image.rsplit("/", 1)[-1]
    if ":" in last:
        image, tag = image.rsplit(":", 1)
    return image, tag, digest


def pod_containers(doc: dict) -> list[dict]:
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    return list(spec.get("containers", [])) + list(spec.get("initContainers", []))


def render_fallback(directory: Path) -> list[dict]:
    kfile = directory / "kustomization.yaml"
    k = yaml.safe_load(kfile.read_text())
    unknown = set(k) - KUSTOMIZATION_KEYS
    if unknown:
        raise RenderError(f"{rel(kfile)}: {sorted(unknown)} not implemented by the fallback renderer (install kubectl)")
    docs: list[dict] = []
    for resource in k.get("resources", []):
        path = (directory / resource).resolve()
        if path.is_dir():
            docs += render_fallback(path)
        elif path.is_file():
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
        else:
            raise RenderError(f"{rel(kfile)}: resource {resource} does not exist")
    for entry in k.get("patches", []):
        if set(entry) != {"path"}:
            raise RenderError(f"{rel(kfile)}: patches other than `- path: FILE` are not implemented by the fallback renderer")
        for patch in yaml.safe_load_all((directory / entry["path"]).read_text()):
            if not patch:
                continue
            kind, name = patch.get("kind"), patch.get("metadata", {}).get("name")
            matches = [d for d in docs if d.get("kind") == kind and d.get("metadata", {}).get("name") == name]
            if len(matches) != 1:
                raise RenderError(f"{rel(kfile)}: patch {entry['path']} matches {len(matches)} resources ({kind}/{name})")
            index = docs.index(matches[0])
            docs[index] = strategic_merge(matches[0], patch, f"{entry['path']}")
    for image in k.get("images", []):
        for doc in docs:
            for container in pod_containers(doc):
                name, tag, digest = split_image(container["image"])
                if name != image["name"]:
                    continue
                if "digest" in image:
                    container["image"] = f"{image.get('newName', name)}@{image['digest']}"
                else:
                    new_tag = image.get("newTag", tag)
                    container["image"] = image.get("newName", name) + (f":{new_tag}" if new_tag else "") + (f"@{digest}" if digest and "newTag" not in image else "")
    for replica in k.get("replicas", []):
        for doc in docs:
            if doc.get("kind") in ("Deployment", "StatefulSet", "ReplicaSet") and doc["metadata"]["name"] == replica["name"]:
                doc.setdefault("spec", {})["replicas"] = replica["count"]
    if "namespace" in k:
        for doc in docs:
            kind = doc.get("kind")
            if kind in CLUSTER_SCOPED:
                continue
            if kind not in NAMESPACED:
                raise RenderError(f"the fallback renderer does not know whether {kind} is namespaced")
            doc.setdefault("metadata", {})["namespace"] = k["namespace"]
    return docs


def kustomize_command() -> list[str] | None:
    if os.environ.get("K8S_CHECK_RENDERER") == "fallback":  # to check the fallback renderer alone
        return None
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    return None


def doc_key(doc: dict) -> tuple[str, str, str]:
    meta = doc.get("metadata", {})
    return (doc.get("kind", "?"), meta.get("namespace", ""), meta.get("name", "?"))


def render(directory: Path) -> list[dict]:
    try:
        fallback = render_fallback(directory)
    except RenderError as error:
        fallback = None
        fallback_error = str(error)
    command = kustomize_command()
    if command:
        run = subprocess.run(command + [str(directory)], capture_output=True, text=True)
        if run.returncode != 0:
            fail(f"{' '.join(command)} {rel(directory)} failed: {run.stderr.strip()}")
            return fallback or []
        real = [d for d in yaml.safe_load_all(run.stdout) if d]
        if fallback is None:
            note(f"fallback renderer: {fallback_error}; using {command[0]} only")
            return real
        a = {doc_key(d): d for d in real}
        b = {doc_key(d): d for d in fallback}
        if a != b:
            differing = sorted({k for k in a.keys() | b.keys() if a.get(k) != b.get(k)})
            fail(f"{rel(directory)}: the fallback renderer and `{' '.join(command)}` disagree on {differing}")
        else:
            ok(f"{rel(directory)}: {len(real)} documents; `{' '.join(command)}` and the fallback renderer agree")
        return real
    if fallback is None:
        fail(f"{rel(directory)}: no kubectl or kustomize, and {fallback_error}")
        return []
    note(f"{rel(directory)}: no kubectl or kustomize on PATH: rendered with the fallback renderer only")
    ok(f"{rel(directory)}: {len(fallback)} documents")
    return fallback


# ----------------------------------------------------------------------------- commented variants

def uncomment_block(path: Path, first_line: str) -> Any:
    """The YAML of a commented-out block: the comment line `first_line` and the comment lines after
    it that are indented deeper (after the '# '), uncommented."""
    lines = path.read_text().splitlines()
    for index, line in enumerate(lines):
        if line.strip() == "# " + first_line.strip():
            column = line.index("#")
            block = [line[column + 2:]]
            base_indent = len(block[0]) - len(block[0].lstrip())
            for following in lines[index + 1:]:
                stripped = following.strip()
                if not stripped.startswith("#") or following.index("#") != column:
                    break
                text = following[column + 2:] if len(following) > column + 1 else ""
                if text.strip() and len(text) - len(text.lstrip()) <= base_indent:
                    break
                block.append(text)
            return yaml.safe_load("\n".join(block))
    raise KeyError(f"{rel(path)}: no commented block starting '# {first_line.strip()}'")


# ---------------------------------------------------------------------------------- validation

def validate(documents: dict[str, list[dict]], tmp: Path) -> None:
    files = []
    for name, docs in documents.items():
        path = tmp / (re.sub(r"\W+", "_", name) + ".yaml")
        path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
        files.append(path)
    tool = VENV_BIN / "kubernetes-validate"
    for version in K8S_VERSIONS:
        run = subprocess.run([str(tool), "--strict", "--quiet", "-k", version] + [str(f) for f in files], capture_output=True, text=True)
        output = (run.stdout + run.stderr).strip()
        if run.returncode != 0:
            for line in output.splitlines():
                fail(f"kubernetes-validate --strict -k {version}: {line}")
        else:
            count = sum(len(d) for d in documents.values())
            ok(f"kubernetes-validate --strict -k {version}: {count} documents in {', '.join(documents)}")


# ------------------------------------------------------------------------------ serve --help flags

class Options:
    """`sidecar serve --help`'s options: which exist and which take a value."""

    def __init__(self, help_text: str):
        self.takes_value: dict[str, bool] = {}
        in_options = False
        for line in help_text.splitlines():
            if line.startswith("OPTIONS:"):
                in_options = True
                continue
            if in_options and line and not line.startswith(" "):
                in_options = False
            if not in_options:
                continue
            match = re.match(r"^  (?:-\w, )?(--[a-z0-9][a-z0-9-]*)(?: <[^>]+>)?", line)
            if match:
                self.takes_value[match.group(1)] = "<" in match.group(0)
        if "--config" not in self.takes_value or "--no-admin" not in self.takes_value:
            raise RuntimeError(f"could not read the options of `sidecar serve --help`:\n{help_text}")

    def parse(self, args: list[str], where: str) -> tuple[list[tuple[str, str | None]], list[str]] | None:
        """(option, value) pairs and positional arguments, or None after failing with a message."""
        pairs: list[tuple[str, str | None]] = []
        positional: list[str] = []
        i, good = 0, True
        while i < len(args):
            arg = str(args[i])
            if arg == "--":
                positional += [str(a) for a in args[i + 1:]]
                break
            if arg.startswith("-"):
                name, eq, value = arg.partition("=")
                if name not in self.takes_value:
                    fail(f"{where}: `sidecar serve` has no option {name} (sidecar serve --help)")
                    good = False
                elif self.takes_value[name]:
                    if not eq:
                        if i + 1 >= len(args):
                            fail(f"{where}: {name} needs a value")
                            good = False
                            break
                        value = str(args[i + 1])
                        if value.startswith("-") and name != "--pip-arg":
                            fail(f"{where}: {name} is followed by {value}, not by its value")
                            good = False
                        i += 1
                    pairs.append((name, value))
                elif eq:
                    fail(f"{where}: {name} is a flag and takes no value")
                    good = False
                else:
                    pairs.append((name, None))
            else:
                positional.append(arg)
            i += 1
        return (pairs, positional) if good else None


# ----------------------------------------------------------------------------------- manifests

def find(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d.get("kind") == kind]


def one(docs: list[dict], kind: str, where: str) -> dict | None:
    found = find(docs, kind)
    if len(found) != 1:
        fail(f"{where}: expected one {kind}, found {len(found)}")
        return None
    return found[0]


def matches(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def effective_config(config: dict, pairs: list[tuple[str, str | None]]) -> dict:
    """The server's settings after the command line overrides the file (ServeCommand.run)."""
    settings = {
        "host": config.get("host", "127.0.0.1"),
        "http_port": config.get("http_port", 8000),
        "grpc_port": config.get("grpc_port", 8001),
        "admin_host": config.get("admin_host", "127.0.0.1"),
        "admin_port": config.get("admin_port", 8002),
        "admin_token_file": config.get("admin_token_file"),
        "cache_dir": config.get("cache_dir"),
        "bundle_dir": config.get("bundle_dir"),
        "repository": config.get("repository"),
    }
    if settings["admin_port"] in ("off", None):
        settings["admin_port"] = None
    flag_keys = {
        "--host": "host", "--http-port": "http_port", "--grpc-port": "grpc_port", "--admin-host": "admin_host",
        "--admin-port": "admin_port", "--admin-token-file": "admin_token_file", "--cache-dir": "cache_dir",
        "--repository": "repository",
    }
    for name, value in pairs:
        if name in flag_keys:
            key = flag_keys[name]
            settings[key] = int(value) if key.endswith("_port") else value
        if name == "--no-admin":
            settings["admin_port"] = None
    # ServeCommand replaces the file's environment options whole when either flag is given: the
    # file's cache_dir is then lost unless --cache-dir is given too.
    flags = {name for name, _ in pairs}
    if flags & {"--cache-dir", "--pip-arg"} and "--cache-dir" not in flags:
        settings["cache_dir"] = None
    if isinstance(settings["repository"], dict):
        settings["repository"] = settings["repository"].get("source")
    return settings


def under(path: str, mount: str) -> bool:
    return path == mount or path.startswith(mount.rstrip("/") + "/")


def check_manifests(name: str, docs: list[dict], options: Options, dockerfile: "Dockerfile") -> dict | None:
    """Static checks of one rendered kustomization; returns what the live check needs."""
    where = name
    deployment = one(docs, "Deployment", where)
    if deployment is None:
        return None
    spec = deployment["spec"]
    template = spec["template"]
    pod_labels = template.get("metadata", {}).get("labels", {})
    pod = template["spec"]
    containers = pod.get("containers", [])
    container = next((c for c in containers if c.get("name") == "sidecar"), None)
    if container is None:
        fail(f"{where}: the Deployment has no container named sidecar")
        return None

    # Labels and selectors.
    selector = spec.get("selector", {}).get("matchLabels", {})
    if spec.get("selector", {}).get("matchExpressions"):
        fail(f"{where}: matchExpressions in the Deployment's selector are not checked; use matchLabels")
    if matches(selector, pod_labels):
        ok(f"{where}: Deployment selector {selector} matches its pod labels")
    else:
        fail(f"{where}: Deployment selector {selector} does not match its pod labels {pod_labels}")
    for constraint in pod.get("topologySpreadConstraints", []):
        if not matches(constraint.get("labelSelector", {}).get("matchLabels", {}), pod_labels):
            fail(f"{where}: a topologySpreadConstraint's labelSelector does not match the pod labels")
    services = find(docs, "Service")
    if len(services) < 2:
        fail(f"{where}: expected a Service and a headless Service, found {len(services)} Service(s)")
    ports_by_name = {p.get("name"): p for p in container.get("ports", [])}
    ports_by_number = {p.get("containerPort"): p for p in container.get("ports", [])}

    def container_port(ref: Any) -> dict | None:
        return ports_by_name.get(ref) if isinstance(ref, str) else ports_by_number.get(ref)

    # The server's ports, from the ConfigMap's sidecar.yaml and the args.
    config_path = None
    parsed = options.parse(container.get("args", []), f"{where}: container args")
    if container.get("command"):
        fail(f"{where}: the container sets `command`, replacing the image's ENTRYPOINT (tini -- sidecar serve)")
    if parsed is None:
        return None
    pairs, positional = parsed
    ok(f"{where}: container args parse with `sidecar serve --help`: {shlex.join(str(a) for a in container.get('args', []))}")
    if positional:
        fail(f"{where}: container args name model directories {positional}; the image has none (use the repository)")
    for flag, value in pairs:
        if flag == "--config":
            config_path = value
    if config_path is None:
        fail(f"{where}: the container args give no --config")
        return None
    mounts = container.get("volumeMounts", [])
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    config_mount = next((m for m in mounts if under(config_path, m["mountPath"])), None)
    if config_mount is None:
        fail(f"{where}: --config {config_path} is on no volume mount")
        return None
    config_volume = volumes.get(config_mount["name"], {})
    configmap_name = config_volume.get("configMap", {}).get("name")
    configmap = next((d for d in find(docs, "ConfigMap") if d["metadata"]["name"] == configmap_name), None)
    key = config_path[len(config_mount["mountPath"]):].lstrip("/")
    for item in config_volume.get("configMap", {}).get("items", []) or []:
        if item.get("path") == key:
            key = item["key"]
    if configmap is None or key not in configmap.get("data", {}):
        fail(f"{where}: --config {config_path} is not a key of a ConfigMap in the manifests (volume {config_mount['name']})")
        return None
    try:
        config = yaml.safe_load(configmap["data"][key]) or {}
    except yaml.YAMLError as error:
        fail(f"{where}: ConfigMap {configmap_name} key {key} is not YAML: {error}")
        return None
    ok(f"{where}: --config {config_path} is ConfigMap {configmap_name}'s {key}")
    settings = effective_config(config, pairs)
    given = {flag for flag, _ in pairs} & {"--cache-dir", "--pip-arg"}
    dropped = [k for k in ("cache_dir", "pip_args") if k in config]
    if given and dropped:
        fail(f"{where}: container args give {sorted(given)}, which makes the server ignore the ConfigMap's {dropped} "
             "(ServeCommand replaces both when either flag is given): set both in one place")

    expected = {"http": settings["http_port"], "grpc": settings["grpc_port"]}
    if settings["admin_port"] is not None:
        expected["admin"] = settings["admin_port"]
    for port_name, number in expected.items():
        declared = ports_by_name.get(port_name)
        if declared is None:
            fail(f"{where}: no container port named {port_name} (the server listens on {number})")
        elif declared.get("containerPort") != number:
            fail(f"{where}: container port {port_name} is {declared.get('containerPort')}, the server listens on {number}")
    for declared in container.get("ports", []):
        if declared.get("containerPort") not in expected.values():
            fail(f"{where}: container port {declared.get('name')}={declared.get('containerPort')} is not a port the server listens on")
    ok(f"{where}: container ports {{{', '.join(f'{p}: {n}' for p, n in expected.items())}}} are the server's")
    if settings["host"] in ("127.0.0.1", "localhost", "::1") or str(settings["host"]).startswith("127."):
        fail(f"{where}: the server binds {settings['host']}: nothing outside the pod (probes, Services) can reach it")
    elif settings["host"] != "0.0.0.0":
        note(f"{where}: the server binds {settings['host']}, not 0.0.0.0")
    else:
        ok(f"{where}: the server binds 0.0.0.0 in the pod")

    for service in services:
        sname = service["metadata"]["name"]
        sel = service.get("spec", {}).get("selector", {})
        if matches(sel, pod_labels):
            ok(f"{where}: Service {sname} selector {sel} matches the pod labels")
        else:
            fail(f"{where}: Service {sname} selector {sel} does not match the pod labels {pod_labels}")
        for port in service.get("spec", {}).get("ports", []):
            target = container_port(port.get("targetPort", port.get("port")))
            if target is None:
                fail(f"{where}: Service {sname} port {port.get('name')} targets {port.get('targetPort')}, which the container does not declare")
                continue
            if target.get("name") == "admin" or target.get("containerPort") == settings["admin_port"] or port.get("port") == settings["admin_port"]:
                fail(f"{where}: Service {sname} exposes the admin API (port {port.get('port')})")
        names = {container_port(p.get("targetPort", p.get("port")))["name"] for p in service.get("spec", {}).get("ports", []) if container_port(p.get("targetPort", p.get("port")))}
        if not {"http", "grpc"} <= names:
            fail(f"{where}: Service {sname} does not expose both http and grpc (it has {sorted(names)})")
        else:
            ok(f"{where}: Service {sname} exposes http and grpc, not the admin port")
    headless = [s for s in services if s.get("spec", {}).get("clusterIP") == "None"]
    if len(headless) != 1:
        fail(f"{where}: expected one headless Service (clusterIP: None), found {len(headless)}")
    elif headless[0]["spec"].get("publishNotReadyAddresses"):
        fail(f"{where}: the headless Service publishes pods that are not ready")

    # Probes: they go to the HTTP port and name paths the live check fetches.
    probes = {}
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container.get(kind)
        if probe is None:
            fail(f"{where}: no {kind}")
            continue
        if "httpGet" in probe:
            target = container_port(probe["httpGet"]["port"])
            if target is None or target.get("containerPort") != settings["http_port"]:
                fail(f"{where}: {kind} port {probe['httpGet']['port']} is not the HTTP port {settings['http_port']}")
            probes[kind] = ("http", probe["httpGet"]["path"])
        elif "grpc" in probe:
            if probe["grpc"]["port"] != settings["grpc_port"]:
                fail(f"{where}: {kind} grpc port {probe['grpc']['port']} is not the gRPC port {settings['grpc_port']}")
            probes[kind] = ("grpc", probe["grpc"].get("service", ""))
        else:
            fail(f"{where}: {kind} is neither httpGet nor grpc")
    expected_paths = {"startupProbe": "/v2/health/ready", "readinessProbe": "/v2/health/ready", "livenessProbe": "/v2/health/live"}
    for kind, path in expected_paths.items():
        if kind in probes and probes[kind][0] == "http" and probes[kind][1] != path:
            fail(f"{where}: {kind} fetches {probes[kind][1]}, expected {path}")
    if all(k in probes for k in expected_paths):
        ok(f"{where}: probes on the HTTP port: {', '.join(f'{k} {v[1]}' for k, v in probes.items())}")
    startup = container.get("startupProbe", {})
    budget = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
    if budget < 300:
        fail(f"{where}: the startupProbe allows {budget} s; a first start builds Python environments with pip (allow 5 minutes or more)")

    # Rolling update and stopping.
    rolling = spec.get("strategy", {}).get("rollingUpdate", {})
    if spec.get("strategy", {}).get("type", "RollingUpdate") != "RollingUpdate" or rolling.get("maxUnavailable") != 0 or rolling.get("maxSurge") != 1:
        fail(f"{where}: rolling update must be maxUnavailable 0, maxSurge 1; it is {spec.get('strategy')}")
    else:
        ok(f"{where}: rolling update maxUnavailable 0, maxSurge 1")
    grace = pod.get("terminationGracePeriodSeconds", 30)
    pre_stop = container.get("lifecycle", {}).get("preStop", {})
    sleep_s = 0
    if "exec" in pre_stop:
        command = pre_stop["exec"].get("command", [])
        if len(command) == 2 and command[0] in ("sleep", "/bin/sleep", "/usr/bin/sleep"):
            sleep_s = int(command[1])
        else:
            fail(f"{where}: preStop runs {command}, expected [sleep, N]")
    elif "sleep" in pre_stop:
        sleep_s = int(pre_stop["sleep"]["seconds"])
    else:
        fail(f"{where}: no preStop sleep: a pod gets SIGTERM while endpoints still send it traffic")
    needed = sleep_s + DEFAULT_SHUTDOWN_GRACE_S + WORKER_STOP_ESCALATION_S
    if not 5 <= sleep_s < grace or grace < needed:
        fail(f"{where}: preStop sleeps {sleep_s} s and terminationGracePeriodSeconds is {grace}: needs ≥ {needed} "
             f"(sleep + shutdown_grace_s {DEFAULT_SHUTDOWN_GRACE_S} + {WORKER_STOP_ESCALATION_S} s of worker SIGTERM/SIGKILL)")
    else:
        ok(f"{where}: preStop sleep {sleep_s} s, terminationGracePeriodSeconds {grace} ≥ {needed}")

    # Security and volumes.
    security = pod.get("securityContext", {})
    csecurity = container.get("securityContext", {})
    if not security.get("runAsNonRoot") and not csecurity.get("runAsNonRoot"):
        fail(f"{where}: runAsNonRoot is not set")
    uid = csecurity.get("runAsUser", security.get("runAsUser"))
    if dockerfile.user_uid is not None and uid is not None and uid != dockerfile.user_uid:
        fail(f"{where}: runAsUser {uid} is not the image's USER {dockerfile.user_uid}")
    read_only_root = csecurity.get("readOnlyRootFilesystem", False)
    if csecurity.get("allowPrivilegeEscalation", True):
        fail(f"{where}: allowPrivilegeEscalation is not false")
    mount_of = lambda path: max((m for m in mounts if under(path, m["mountPath"])), key=lambda m: len(m["mountPath"]), default=None)  # noqa: E731
    writable = {
        "cache_dir": settings["cache_dir"] or dockerfile.env.get("SIDECAR_CACHE_DIR"),
        "bundle_dir": settings["bundle_dir"] or (settings["cache_dir"] and settings["cache_dir"] + "/bundles"),
    }
    if read_only_root:
        writable["TMPDIR (/tmp: worker sockets, pip)"] = "/tmp"
    for what, path in writable.items():
        if not path:
            fail(f"{where}: {what} is not set in the ConfigMap, the args or the image")
            continue
        mount = mount_of(path)
        if mount is None:
            if read_only_root:
                fail(f"{where}: {what} {path} is on the read-only root filesystem (no volume mounted there)")
            else:
                note(f"{where}: {what} {path} is in the container's writable layer, lost on restart")
        elif mount.get("readOnly"):
            fail(f"{where}: {what} {path} is on read-only volume {mount['name']}")
        elif not any(k in volumes.get(mount["name"], {}) for k in ("emptyDir", "persistentVolumeClaim", "ephemeral")):
            fail(f"{where}: {what} {path} is on volume {mount['name']}, which is neither an emptyDir nor a PVC")
    if read_only_root:
        ok(f"{where}: readOnlyRootFilesystem, and cache, bundles and /tmp are on writable volumes")
    env_cache = dockerfile.env.get("SIDECAR_CACHE_DIR")
    if env_cache and settings["cache_dir"] and env_cache != settings["cache_dir"]:
        note(f"{where}: cache_dir {settings['cache_dir']} differs from the image's SIDECAR_CACHE_DIR {env_cache}")
    for path in (settings["cache_dir"], settings["bundle_dir"]):
        if path and dockerfile.volumes and not any(under(path, v) for v in dockerfile.volumes):
            fail(f"{where}: {path} is not under a VOLUME of the Dockerfile {dockerfile.volumes}")

    # The admin API: off loopback it needs the token, from the Secret.
    token_file = settings["admin_token_file"]
    if settings["admin_port"] is not None and settings["admin_host"] not in ("127.0.0.1", "localhost", "::1"):
        if not token_file:
            fail(f"{where}: the admin API binds {settings['admin_host']} without admin_token_file: the server refuses to start")
        else:
            mount = mount_of(token_file)
            volume = volumes.get(mount["name"], {}) if mount else {}
            secret = volume.get("secret")
            if not secret:
                fail(f"{where}: admin_token_file {token_file} is not on a Secret volume")
            else:
                file_name = token_file[len(mount["mountPath"]):].lstrip("/")
                items = secret.get("items")
                if items and not any(i.get("path") == file_name for i in items):
                    fail(f"{where}: admin_token_file {token_file}: Secret {secret.get('secretName')} mounts no {file_name}")
                elif secret.get("optional"):
                    fail(f"{where}: the admin token Secret is optional: without it the server refuses to start")
                else:
                    key = next((i["key"] for i in items or [] if i.get("path") == file_name), file_name)
                    ok(f"{where}: admin_token_file {token_file} is Secret {secret.get('secretName')}'s key {key}")

    # The repository.
    repository = settings["repository"]
    if not repository:
        note(f"{where}: no repository: pods serve only what is loaded through the admin API")
    elif repository.startswith(("http://", "https://")):
        parsed_url = urllib.parse.urlparse(repository)
        if not parsed_url.hostname:
            fail(f"{where}: repository {repository} has no host")
        else:
            ok(f"{where}: repository {repository}")
    elif repository.startswith("/"):
        if mount_of(repository) is None:
            fail(f"{where}: repository {repository} is on no volume mount")
    else:
        fail(f"{where}: repository {repository} is relative (to the config file's directory, a ConfigMap mount)")

    # Disruption budget and autoscaler.
    for pdb in find(docs, "PodDisruptionBudget"):
        if not matches(pdb.get("spec", {}).get("selector", {}).get("matchLabels", {}), pod_labels):
            fail(f"{where}: PodDisruptionBudget {pdb['metadata']['name']} does not select the pods")
        else:
            ok(f"{where}: PodDisruptionBudget {pdb['metadata']['name']} selects the pods")
    hpas = find(docs, "HorizontalPodAutoscaler")
    for hpa in hpas:
        ref = hpa["spec"]["scaleTargetRef"]
        if ref.get("kind") != "Deployment" or ref.get("name") != deployment["metadata"]["name"]:
            fail(f"{where}: HPA {hpa['metadata']['name']} targets {ref}, not the Deployment")
        elif "replicas" in spec:
            fail(f"{where}: the Deployment sets replicas and an HPA scales it: every apply resets the count")
        elif hpa["spec"].get("minReplicas", 1) < 2:
            fail(f"{where}: HPA minReplicas < 2: the PodDisruptionBudget then blocks every drain")
        else:
            ok(f"{where}: HPA {hpa['metadata']['name']} scales the Deployment {hpa['spec'].get('minReplicas')}..{hpa['spec']['maxReplicas']}")
    if not hpas and "replicas" not in spec:
        note(f"{where}: no HPA and no replicas: one pod")

    # The image.
    image = container.get("image", "")
    _, tag, digest = split_image(image)
    if name != "base" and not digest and tag in (None, "latest"):
        fail(f"{where}: image {image} has no pinned tag")

    annotations = template.get("metadata", {}).get("annotations", {})
    return {
        "container": container, "settings": settings, "config": config, "pairs": pairs, "probes": probes,
        "grace": grace, "pre_stop": sleep_s, "annotations": annotations, "ports_by_name": ports_by_name,
    }


# ------------------------------------------------------------------------------------ Dockerfile

class Dockerfile:
    def __init__(self, path: Path):
        self.path = path
        self.instructions: list[tuple[str, str, int]] = []  # (stage, instruction line, line number)
        self.args: dict[str, str] = {}
        self.stages: list[tuple[str, str | None]] = []  # (image, alias)
        self.env: dict[str, str] = {}
        self.volumes: list[str] = []
        self.user_uid: int | None = None
        self.entrypoint: list[str] = []
        self.cmd: list[str] = []
        self.expose: list[int] = []
        logical, start = "", 0
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not logical and (not line.strip() or line.lstrip().startswith("#")):
                continue
            if logical and line.lstrip().startswith("#"):
                continue
            if not logical:
                start = number
            if line.rstrip().endswith("\\"):
                logical += line.rstrip()[:-1] + " "
                continue
            logical += line
            self.instructions.append(("", logical.strip(), start))
            logical = ""
        stage = ""
        resolved = []
        for _, text, number in self.instructions:
            word, _, rest = text.partition(" ")
            word = word.upper()
            rest = rest.strip()
            if word == "ARG" and not self.stages:
                key, _, default = rest.partition("=")
                self.args[key] = default
            elif word == "FROM":
                parts = rest.split()
                image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: self.args.get(m.group(1) or m.group(2), ""), parts[0])
                alias = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
                self.stages.append((image, alias))
                stage = alias or str(len(self.stages) - 1)
                self.env = {}
            elif word == "ENV":
                for token in shlex.split(rest):
                    key, _, value = token.partition("=")
                    self.env[key] = value
            elif word == "VOLUME":
                self.volumes = json.loads(rest) if rest.startswith("[") else rest.split()
            elif word == "USER":
                user = rest.split(":")[0]
                self.user_uid = int(user) if user.isdigit() else None
                if self.user_uid is None:
                    fail(f"{rel(path)}:{number}: USER {rest} is a name: runAsNonRoot needs a numeric UID in the image")
            elif word == "ENTRYPOINT":
                self.entrypoint = json.loads(rest) if rest.startswith("[") else []
                if not rest.startswith("["):
                    fail(f"{rel(path)}:{number}: ENTRYPOINT in shell form: SIGTERM would go to /bin/sh, not the server")
            elif word == "CMD":
                self.cmd = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
            elif word == "EXPOSE":
                self.expose = [int(p.split("/")[0]) for p in rest.split()]
            resolved.append((stage, text, number))
        self.instructions = resolved

    def of(self, word: str, stage: str | None = None) -> list[tuple[str, str, int]]:
        return [(s, t, n) for s, t, n in self.instructions if t.split(" ", 1)[0].upper() == word and (stage is None or s == stage)]


class DockerIgnore:
    def __init__(self, path: Path):
        self.rules: list[tuple[bool, re.Pattern[str]]] = []
        if not path.is_file():
            return
        for line in path.read_text().splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            pattern = line[1:] if negate else line
            pattern = pattern.strip("/")
            regex = ""
            i = 0
            while i < len(pattern):
                if pattern.startswith("**/", i):
                    regex += "(?:.*/)?"
                    i += 3
                elif pattern.startswith("**", i):
                    regex += ".*"
                    i += 2
                elif pattern[i] == "*":
                    regex += "[^/]*"
                    i += 1
                elif pattern[i] == "?":
                    regex += "[^/]"
                    i += 1
                else:
                    regex += re.escape(pattern[i])
                    i += 1
            self.rules.append((negate, re.compile(regex + "$")))

    def excluded(self, path: str) -> bool:
        parts = path.split("/")
        result = False
        for negate, regex in self.rules:
            for depth in range(1, len(parts) + 1):
                if regex.match("/".join(parts[:depth])):
                    result = not negate
                    break
        return result


def git_files() -> set[str] | None:
    run = subprocess.run(["git", "-C", str(ROOT), "ls-files", "--cached", "--others", "--exclude-standard"], capture_output=True, text=True)
    return set(run.stdout.splitlines()) if run.returncode == 0 else None


def check_dockerfile(dockerfile: Dockerfile, options: Options, tmp: Path) -> Path | None:
    """Checks the Dockerfile; returns the worker runtime directory laid out as the image has it."""
    where = rel(dockerfile.path)
    ignore = DockerIgnore(DOCKERIGNORE)
    files = git_files()
    if files is None:
        note("not a git checkout: COPY sources are checked on disk only")
        files = {str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file() and ".build" not in p.parts and ".git" not in p.parts}
    context = {f for f in files if not ignore.excluded(f) and (ROOT / f).is_file()}

    # The toolchain: at least the tools version of Package.swift.
    tools = re.search(r"swift-tools-version:\s*(\d+)\.(\d+)", (ROOT / "Package.swift").read_text())
    build_image = dockerfile.stages[0][0] if dockerfile.stages else ""
    version = re.match(r"swift:(\d+)\.(\d+)", build_image)
    if not (tools and version):
        fail(f"{where}: the build stage {build_image!r} is not a swift:X.Y image")
    elif (int(version.group(1)), int(version.group(2))) < (int(tools.group(1)), int(tools.group(2))):
        fail(f"{where}: {build_image} is older than Package.swift's swift-tools-version {tools.group(1)}.{tools.group(2)}")
    else:
        ok(f"{where}: build stage {build_image} ≥ swift-tools-version {tools.group(1)}.{tools.group(2)}")
    if len(dockerfile.stages) < 2 or not dockerfile.stages[-1][0].startswith("debian:bookworm"):
        fail(f"{where}: the runtime stage is not debian:bookworm (Debian 12 has python3.11, what the binary links)")

    # COPY sources from the context.
    copies: list[tuple[list[str], str, str]] = []
    for stage, text, number in dockerfile.of("COPY"):
        tokens = shlex.split(text)[1:]
        flags = [t for t in tokens if t.startswith("--")]
        paths = [t for t in tokens if not t.startswith("--")]
        if any(f.startswith("--from") for f in flags):
            continue
        sources, dest = paths[:-1], paths[-1]
        for source in sources:
            matched = sorted(f for f in context if fnmatch.fnmatch(f, source) or f.startswith(source.rstrip("/") + "/"))
            if not matched:
                on_disk = (ROOT / source).exists() or any(ROOT.glob(source))
                why = "excluded by Dockerfile.dockerignore or ignored by git" if on_disk else "not in the repository"
                fail(f"{where}:{number}: COPY {source}: {why}")
            else:
                ok(f"{where}:{number}: COPY {source} ({len(matched)} file(s) in the build context)")
        copies.append((sources, dest, stage))
    if "Package.swift" not in {f for sources, _, _ in copies for s in sources for f in context if fnmatch.fnmatch(f, s)}:
        fail(f"{where}: Package.swift is not copied")
    for target in re.findall(r'path:\s*"([^"]+)"', (ROOT / "Package.swift").read_text()) + ["Sources", "Tests/SidecarTests", "Tests/SidecarFrontTests"]:
        if target.startswith("Fuzz/"):
            continue  # only with SIDECAR_FUZZ=1
        if not any(f.startswith(target + "/") for f in context) or not any(under(target, s) or fnmatch.fnmatch(target, s) for sources, _, _ in copies for s in sources):
            fail(f"{where}: the package's {target}/ is not in the build stage")

    # The product and the binary.
    products = re.findall(r'\.executable\(name:\s*"([^"]+)"', (ROOT / "Package.swift").read_text())
    runs = " ".join(t for _, t, _ in dockerfile.of("RUN", dockerfile.stages[0][1] if dockerfile.stages else None))
    build = re.search(r"swift build\b([^&;]*)", runs)
    product = re.search(r"--product\s+(\S+)", build.group(1)) if build else None
    if not build or "-c release" not in build.group(1) or not product:
        fail(f"{where}: the build stage does not run `swift build -c release --product NAME`")
        binary_out = None
    elif product.group(1) not in products or product.group(1) != "sidecar":
        fail(f"{where}: --product {product.group(1)} is not the `sidecar` executable product (Package.swift has {products})")
        binary_out = None
    else:
        ok(f"{where}: builds the `sidecar` executable product in release (Package.swift products {products})")
        moved = re.search(r"(?:install|cp)\s+(?:-\S+\s+(?:\d+\s+)?)*(\S*\.build/release/sidecar)\s+(\S+)", runs)
        if not moved:
            fail(f"{where}: the build stage does not install .build/release/sidecar anywhere")
            binary_out = None
        else:
            binary_out = moved.group(2)
            ok(f"{where}: .build/release/sidecar → {binary_out} in the build stage")
    from_build = [shlex.split(t)[1:] for _, t, _ in dockerfile.of("COPY") if "--from=" in t]
    binary_path = None
    for tokens in from_build:
        paths = [t for t in tokens if not t.startswith("--")]
        if binary_out and paths[0] == binary_out:
            binary_path = paths[-1]
    if binary_path is None:
        fail(f"{where}: no COPY --from=build of {binary_out}")
    elif not dockerfile.entrypoint or binary_path not in dockerfile.entrypoint:
        fail(f"{where}: ENTRYPOINT {dockerfile.entrypoint} does not run {binary_path}")
    else:
        index = dockerfile.entrypoint.index(binary_path)
        if dockerfile.entrypoint[index + 1:index + 2] != ["serve"]:
            fail(f"{where}: ENTRYPOINT {dockerfile.entrypoint} does not run `sidecar serve`")
        else:
            ok(f"{where}: ENTRYPOINT {shlex.join(dockerfile.entrypoint)} runs the copied binary")
        flags = dockerfile.entrypoint[index + 2:] + dockerfile.cmd
        parsed = options.parse(flags, f"{where}: ENTRYPOINT+CMD flags")
        if parsed is not None:
            ok(f"{where}: ENTRYPOINT+CMD flags parse with `sidecar serve --help`: {shlex.join(flags)}")

    # apt packages of the runtime stage: they exist, and they bring what the binary links.
    runtime_runs = " ".join(t for s, t, _ in dockerfile.instructions if t.upper().startswith("RUN") and s == str(len(dockerfile.stages) - 1))
    install = re.search(r"apt-get install ([^&;]*)", runtime_runs)
    packages = [p for p in install.group(1).split() if not p.startswith("-")] if install else []
    if not packages:
        fail(f"{where}: the runtime stage installs no apt packages")
    for required in ("python3.11", "python3.11-venv", "libpython3.11"):
        if required not in packages:
            fail(f"{where}: the runtime stage does not install {required}")
    if dockerfile.entrypoint and dockerfile.entrypoint[0].endswith("/tini") and "tini" not in packages:
        fail(f"{where}: ENTRYPOINT runs tini, which the runtime stage does not install")
    if shutil.which("apt-cache") and not any(Path("/var/lib/apt/lists").glob("*Packages*")):
        # A fresh machine has no package lists: apt-cache would find nothing.
        if os.geteuid() == 0:
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
    if shutil.which("apt-cache") and any(Path("/var/lib/apt/lists").glob("*Packages*")):
        missing = [p for p in packages if subprocess.run(["apt-cache", "show", p], capture_output=True).returncode != 0]
        if missing:
            fail(f"{where}: apt has no package {missing} (this machine's Debian: {Path('/etc/debian_version').read_text().strip()})")
        else:
            ok(f"{where}: runtime apt packages exist: {' '.join(packages)}")
        check_linked_libraries(where, packages)
    else:
        note("no apt package lists (not root, no apt-get update): the runtime packages and linked libraries are not checked")

    # The worker runtime where the binary looks for it.
    runtime_swift = ROOT / "Sources" / "Sidecar" / "Environment" / "WorkerRuntime.swift"
    source = runtime_swift.read_text()
    for needed in ('"SIDECAR_RUNTIME_DIR"', '"sidecar_worker"', '"runtime-requirements.txt"'):
        if needed not in source:
            fail(f"{rel(runtime_swift)} no longer mentions {needed}: update the Dockerfile and this check")
    runtime_dir = dockerfile.env.get("SIDECAR_RUNTIME_DIR")
    if not runtime_dir:
        fail(f"{where}: no ENV SIDECAR_RUNTIME_DIR: the binary would look for python/ in the build stage's source tree")
        return None
    image_root = tmp / "image"
    runtime_stage = str(len(dockerfile.stages) - 1)
    for sources, dest, stage in copies:
        if stage != runtime_stage:
            continue
        for source in sources:
            for f in sorted(context):
                if f == source or f.startswith(source.rstrip("/") + "/"):
                    target = Path(dest) / Path(f).relative_to(source) if f != source else (Path(dest) / Path(f).name if dest.endswith("/") else Path(dest))
                    out = image_root / str(target).lstrip("/")
                    out.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(ROOT / f, out)
    laid = image_root / runtime_dir.lstrip("/")
    for needed in ("sidecar_worker/__init__.py", "sidecar_worker/__main__.py", "runtime-requirements.txt"):
        if not (laid / needed).is_file():
            fail(f"{where}: the image has no {runtime_dir}/{needed} (SIDECAR_RUNTIME_DIR)")
            return None
    ok(f"{where}: the worker runtime is at SIDECAR_RUNTIME_DIR={runtime_dir} (sidecar_worker/, runtime-requirements.txt)")
    return laid


def check_linked_libraries(where: str, packages: list[str]) -> None:
    if not shutil.which("ldd") or not shutil.which("dpkg"):
        note("no ldd/dpkg: the binary's shared libraries are not checked")
        return
    run = subprocess.run(["ldd", str(SIDECAR_BIN)], capture_output=True, text=True)
    swift_dir = None
    swiftc = shutil.which("swiftc")
    if swiftc:
        swift_dir = str(Path(swiftc).resolve().parent.parent / "lib" / "swift")
    needed: dict[str, str] = {}
    for line in run.stdout.splitlines():
        match = re.match(r"\s*(\S+) => (\S+)", line)
        if not match:
            continue
        library, path = match.groups()
        if (swift_dir and path.startswith(swift_dir)) or "/swift/" in path:
            continue  # the Swift runtime: linked statically with --static-swift-stdlib
        needed[library] = path
    provided = set(packages) | {"libc6", "libgcc-s1"}  # libc6 and libgcc-s1 are in every Debian image
    for package in packages:
        depends = subprocess.run(["apt-cache", "depends", "--no-recommends", "--no-suggests", package], capture_output=True, text=True).stdout
        provided |= {m.split(":")[0] for m in re.findall(r"Depends: <?([\w.+-]+(?::\w+)?)>?", depends)}
    unresolved = []
    for library, path in needed.items():
        owner = subprocess.run(["dpkg", "-S", os.path.realpath(path)], capture_output=True, text=True)
        if owner.returncode != 0:
            owner = subprocess.run(["dpkg", "-S", path], capture_output=True, text=True)
        package = owner.stdout.split(":")[0].strip() if owner.returncode == 0 else None
        if package is None or package not in provided:
            unresolved.append(f"{library} ({package or 'no package'})")
    if unresolved:
        fail(f"{where}: the binary links {', '.join(unresolved)}, which the runtime stage does not install")
    else:
        ok(f"{where}: every shared library {SIDECAR_BIN.name} links outside the Swift runtime comes from the runtime packages: {', '.join(sorted(needed))}")


# ------------------------------------------------------------------------------- the real server

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, headers: dict[str, str] | None = None, data: bytes | None = None, timeout: float = 5) -> tuple[int, bytes, dict]:
    request = urllib.request.Request(url, headers=headers or {}, data=data)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, error.read(), dict(error.headers)


def check_live(found: dict, runtime_dir: Path | None, dockerfile: Dockerfile, tmp: Path) -> None:
    settings, config, pairs = found["settings"], found["config"], found["pairs"]
    container = found["container"]
    where = "live server"
    # The repository: the echo example published into a directory served over HTTP on loopback,
    # as a web server serves it to the pods.
    repo = tmp / "repository"
    publish = subprocess.run([str(SIDECAR_BIN), "publish", str(ROOT / "Examples" / "echo"), "--repository", str(repo)], capture_output=True, text=True)
    if publish.returncode != 0:
        fail(f"{where}: sidecar publish Examples/echo failed: {publish.stderr.strip()}")
        return
    web_port = free_port()
    web = subprocess.Popen([sys.executable, "-m", "http.server", str(web_port), "--bind", "127.0.0.1", "--directory", str(repo)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # The ConfigMap's file with this machine's paths, addresses and ports; every other key as it is.
    ports = {"http_port": free_port(), "grpc_port": free_port(), "admin_port": free_port()}
    token = "k8s-check-" + os.urandom(8).hex()
    token_file = tmp / "admin-token"
    token_file.write_text(token + "\n")
    cache = WORK / "cache"
    rewritten = dict(config)
    rewritten.update(host="127.0.0.1", admin_host="127.0.0.1", **ports)
    if "admin_token_file" in rewritten:
        rewritten["admin_token_file"] = str(token_file)
    rewritten["cache_dir"] = str(cache)
    rewritten["bundle_dir"] = str(tmp / "bundles")
    if isinstance(rewritten.get("repository"), dict):
        rewritten["repository"] = dict(rewritten["repository"], source=f"http://127.0.0.1:{web_port}/")
    else:
        rewritten["repository"] = f"http://127.0.0.1:{web_port}/"
    config_file = tmp / "sidecar.yaml"
    config_file.write_text(yaml.safe_dump(rewritten, sort_keys=False))
    replace = {
        "--config": str(config_file), "--host": "127.0.0.1", "--admin-host": "127.0.0.1", "--http-port": str(ports["http_port"]),
        "--grpc-port": str(ports["grpc_port"]), "--admin-port": str(ports["admin_port"]), "--admin-token-file": str(token_file),
        "--cache-dir": str(cache), "--repository": f"http://127.0.0.1:{web_port}/",
    }
    args: list[str] = []
    for flag, value in pairs:
        args.append(flag)
        if value is not None:
            args.append(replace.get(flag, value))
    # The image's environment, its paths mapped here; the container's env on top.
    env = dict(os.environ)
    env.pop("SIDECAR_ADMIN_TOKEN", None)
    for key, value in dockerfile.env.items():
        env[key] = value
    if runtime_dir is not None:
        env["SIDECAR_RUNTIME_DIR"] = str(runtime_dir)
    else:
        env.pop("SIDECAR_RUNTIME_DIR", None)
    env["SIDECAR_CACHE_DIR"] = str(cache)
    env["PIP_CACHE_DIR"] = str(WORK / "pip-cache")
    env["TMPDIR"] = str(tmp)
    for item in container.get("env", []) or []:
        if "value" in item:
            env[item["name"]] = item["value"]
    log_path = tmp / "server.log"
    print(f"  .... sidecar serve {shlex.join(args)}  (log: {log_path})", flush=True)
    with open(log_path, "wb") as log:
        server = subprocess.Popen([str(SIDECAR_BIN), "serve"] + args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{ports['http_port']}"

    def tail() -> str:
        return "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])

    try:
        started = time.monotonic()
        while True:
            if server.poll() is not None:
                fail(f"{where}: the server exited with {server.returncode} at start:\n{tail()}")
                return
            try:
                status, body, _ = get(base + "/v2/health/live", timeout=2)
                break
            except (urllib.error.URLError, OSError):
                if time.monotonic() - started > 60:
                    fail(f"{where}: nothing listens on the HTTP port after 60 s:\n{tail()}")
                    return
                time.sleep(0.2)
        # Ready is 503 until the repository's models are loaded (the first run builds the echo
        # environment with pip), then 200: the startup probe's condition.
        status, body, headers = get(base + "/v2/health/ready")
        if status not in (200, 503) or json.loads(body).get("ready") is not (status == 200):
            fail(f"{where}: GET /v2/health/ready answered {status} {body!r}, expected 200 or 503 with {{\"ready\": bool}}")
        while status != 200:
            if server.poll() is not None:
                fail(f"{where}: the server exited with {server.returncode} before it was ready:\n{tail()}")
                return
            if time.monotonic() - started > READY_TIMEOUT_S:
                fail(f"{where}: /v2/health/ready still {status} after {READY_TIMEOUT_S:.0f} s:\n{tail()}")
                return
            time.sleep(0.5)
            status, body, _ = get(base + "/v2/health/ready")
        ok(f"{where}: ready after {time.monotonic() - started:.1f} s, serving the repository's echo model")
        for kind, (protocol, path) in found["probes"].items():
            if protocol != "http":
                continue
            status, body, headers = get(base + path)
            if status != 200 or not headers.get("Content-Type", "").startswith("application/json"):
                fail(f"{where}: {kind} GET {path} answered {status} {body!r}")
            else:
                ok(f"{where}: {kind} GET {path} → {status} {body.decode()}")
        # gRPC health on the port the Services and the grpc probe variant use.
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(f"127.0.0.1:{ports['grpc_port']}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
                if reply.status != health_pb2.HealthCheckResponse.SERVING:
                    fail(f"{where}: grpc.health.v1 Check('') on the gRPC port answered {reply.status}")
                else:
                    ok(f"{where}: grpc.health.v1 Check('') on the gRPC port → SERVING")
            except grpc.RpcError as error:
                fail(f"{where}: grpc.health.v1 Check on the gRPC port failed: {error.code()} {error.details()}")
        # An inference request, so that the request counters exist.
        status, body, _ = get(base + "/v1/models/echo:predict", data=json.dumps({"instances": [{"x": 1}]}).encode(),
                              headers={"Content-Type": "application/json"})
        if status != 200:
            fail(f"{where}: POST /v1/models/echo:predict answered {status} {body!r}")
        # The Prometheus annotations, and the metrics hpa.yaml names.
        annotations = found["annotations"]
        if annotations.get("prometheus.io/scrape") == "true":
            port = int(annotations.get("prometheus.io/port", settings["http_port"]))
            if port != settings["http_port"]:
                fail(f"{where}: prometheus.io/port {port} is not the HTTP port {settings['http_port']}")
            path = annotations.get("prometheus.io/path", "/metrics")
            status, body, _ = get(base + path)
            text = body.decode(errors="replace")
            hpa_text = (BASE / "hpa.yaml").read_text()
            # Names a metrics adapter makes (`as: "NAME"`) are not the server's.
            named = set(re.findall(r"\b(sidecar_[a-z_]+)", hpa_text)) - set(re.findall(r'as:\s*"(sidecar_[a-z_]+)"', hpa_text))
            missing = sorted(n for n in named if not re.search(rf"^{n}(?:{{|\s)", text, re.M))
            if status != 200:
                fail(f"{where}: GET {path} (prometheus.io/path) answered {status}")
            elif missing:
                fail(f"{where}: hpa.yaml names metrics {missing} that {path} does not export")
            else:
                ok(f"{where}: GET {path} (prometheus.io annotations) exports the metrics hpa.yaml names: {', '.join(sorted(named))}")
        # What nodes fetch from each other through the headless Service.
        status, body, _ = get(base + "/repository/manifest.json")
        if status != 200 or "echo" not in json.loads(body).get("models", {}):
            fail(f"{where}: GET /repository/manifest.json answered {status}")
        else:
            ok(f"{where}: GET /repository/manifest.json → 200 (peers can follow this pod)")
        # The admin API: the token from the (Secret's) file is required and accepted.
        if settings["admin_port"] is not None:
            admin = f"http://127.0.0.1:{ports['admin_port']}/admin/v1/models"
            without, _, _ = get(admin)
            with_token, _, _ = get(admin, headers={"Authorization": f"Bearer {token}"})
            if without != 401 or with_token != 200:
                fail(f"{where}: admin API answered {without} without the token and {with_token} with it (expected 401, 200)")
            else:
                ok(f"{where}: admin API: 401 without the token, 200 with admin_token_file's")
        # SIGTERM (after preStop): the server must be gone within the rest of the grace period.
        budget = found["grace"] - found["pre_stop"]
        stop = time.monotonic()
        if server.poll() is not None:
            fail(f"{where}: the server had exited ({server.returncode}) before SIGTERM:\n{tail()}")
            return
        server.send_signal(signal.SIGTERM)
        try:
            code = server.wait(timeout=budget)
            took = time.monotonic() - stop
            if code != 0:
                fail(f"{where}: SIGTERM: exit code {code}:\n{tail()}")
            else:
                stopped = "model unloaded" in log_path.read_text(errors="replace")
                if not stopped:
                    fail(f"{where}: SIGTERM: exited 0 in {took:.1f} s without unloading its model:\n{tail()}")
                else:
                    ok(f"{where}: SIGTERM: drained, unloaded and exited 0 in {took:.2f} s (grace left after preStop: {budget} s)")
        except subprocess.TimeoutExpired:
            fail(f"{where}: still running {budget} s after SIGTERM: Kubernetes would SIGKILL it")
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        web.terminate()
        web.wait()


# -------------------------------------------------------------------------------------------- main

def main() -> int:
    started = time.monotonic()
    if not (SIDECAR_BIN.is_file() and os.access(SIDECAR_BIN, os.X_OK)):
        print(f"check-kubernetes: no sidecar binary at {SIDECAR_BIN}; build it (swift build --product sidecar) or set SIDECAR_BIN", file=sys.stderr)
        return 1
    WORK.mkdir(parents=True, exist_ok=True)
    help_run = subprocess.run([str(SIDECAR_BIN), "serve", "--help"], capture_output=True, text=True)
    options = Options(help_run.stdout + help_run.stderr)
    with tempfile.TemporaryDirectory(prefix="k8s-check-") as name:
        tmp = Path(name)
        dockerfile = Dockerfile(DOCKERFILE)

        section("render (kustomize)")
        rendered = {"base": render(BASE)}
        for overlay in OVERLAYS:
            rendered[f"overlays/{overlay.name}"] = render(overlay)

        section("kubernetes-validate --strict")
        variants: dict[str, list[dict]] = dict(rendered)
        try:
            deployment = copy.deepcopy(one(rendered["base"], "Deployment", "base") or {})
            probe = uncomment_block(BASE / "deployment.yaml", "readinessProbe:")
            deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"] = probe["readinessProbe"]
            hpa = copy.deepcopy(one(rendered["base"], "HorizontalPodAutoscaler", "base") or {})
            hpa["spec"]["metrics"] += uncomment_block(BASE / "hpa.yaml", "- type: Pods")
            variants["commented variants (grpc readinessProbe, HPA on a Sidecar metric)"] = [deployment, hpa]
            grpc_port = probe["readinessProbe"]["grpc"]["port"]
        except (KeyError, TypeError) as error:
            fail(f"the commented variants cannot be read: {error}")
            grpc_port = None
        validate(variants, tmp)

        section("manifests against each other and against `sidecar serve --help`")
        found_overlays = {}
        for name_, docs in rendered.items():
            found = check_manifests(name_, docs, options, dockerfile)
            if found is not None:
                found_overlays[name_] = found
                if grpc_port is not None and grpc_port != found["settings"]["grpc_port"]:
                    fail(f"{name_}: the commented grpc readinessProbe uses port {grpc_port}, the server's gRPC port is {found['settings']['grpc_port']}")
                exposed = set(dockerfile.expose)
                if exposed and exposed != {found["settings"]["http_port"], found["settings"]["grpc_port"]}:
                    fail(f"{name_}: the Dockerfile EXPOSEs {sorted(exposed)}, the server's HTTP and gRPC ports are {found['settings']['http_port']}, {found['settings']['grpc_port']}")

        section("Dockerfile")
        runtime_dir = check_dockerfile(dockerfile, options, tmp)

        section("the real server, started as the pod starts it")
        target = next((found_overlays[k] for k in found_overlays if k != "base"), found_overlays.get("base"))
        if target is None:
            fail("no Deployment to start the server from")
        else:
            try:
                check_live(target, runtime_dir, dockerfile, tmp)
            except Exception as error:  # a refused connection or a bad answer mid-check
                fail(f"live server: {type(error).__name__}: {error}")

    took = time.monotonic() - started
    if failures:
        print(f"check-kubernetes: {len(failures)} mismatch(es) in {took:.0f} s:", file=sys.stderr)
        for message in failures:
            print(f"  - {message}", file=sys.stderr)
        return 1
    print(f"check-kubernetes: all checks passed in {took:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
