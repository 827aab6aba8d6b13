#!/usr/bin/env python3
"""Checks deploy/ against Kubernetes and against the autopipe binaries (run by scripts/check-deploy).

1. render   every kustomization under deploy/k8s (`kubectl kustomize`); every component is used by an overlay
2. schema   every rendered object against the Kubernetes OpenAPI schemas (kubernetes-validate, strict:
            unknown fields fail), for the oldest supported and the newest Kubernetes version
3. refs     names that point at other objects resolve: ConfigMaps, PVCs, ServiceAccounts, Service and
            PDB/NetworkPolicy selectors, Service target ports, HPA targets, ServiceMonitor ports
4. binaries every container running an autopipe binary: each --flag it passes and each AUTOPIPE_* variable
            it gets is one that binary's `--help` lists; listen ports = container ports = probe ports; gRPC
            probe services exist in proto/; the orchestrator's --store is a store in the pod (same socket on
            a shared volume) or a Service in front of one; the grace period covers preStop + --drain-timeout;
            a CUDA store gets a GPU, a memory budget inside its limit, threads within its CPU
            Dockerfile: it builds exactly the workspace's three binaries and runs each in the runtime stage
5. self-test deliberate mistakes (a misspelt variable, a probe on the wrong port, a short grace period, …)
            must each make a check fail
6. smoke    the real binaries started with each overlay's ConfigMaps (addresses moved to loopback/temp dir,
            CUDA -> CPU here), on the image's library layout; every probe run as the kubelet would run it;
            metrics answer GET on both daemons; SIGTERM -> readiness not SERVING, clean exit
Prints `N passed, N failed` last; exits non-zero on any failure.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

AUTOPIPE_BINARIES = {"autopipe-store", "autopipe-orchestrator", "autopipe"}
# Kubernetes versions the manifests must validate against: native sidecars need 1.29 (beta, on by default).
K8S_VERSIONS = ["1.29.0", "1.37.0"]
# Kinds without a bundled schema (CRDs); checked structurally in refs instead.
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
# Variables a container may get that are not flags of the binary.
NON_FLAG_ENV = {"RUST_LOG", "HF_HOME", "HF_TOKEN", "HF_HUB_OFFLINE", "HF_ENDPOINT", "NVIDIA_DRIVER_CAPABILITIES"}
# Which gRPC service each daemon registers with grpc.health.v1 besides "".
HEALTH_SERVICE = {"autopipe-store": "Store", "autopipe-orchestrator": "Orchestrator"}
NAMESPACED_EXEMPT = {"Namespace"}


class Report:
    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0
        self.notes: list[str] = []

    def ok(self, what: str) -> None:
        self.passed += 1
        print(f"  ok    {what}")

    def fail(self, what: str, why: str) -> None:
        self.failed += 1
        print(f"  FAIL  {what}: {why}")

    def check(self, cond: bool, what: str, why: str = "") -> bool:
        if cond:
            self.ok(what)
        else:
            self.fail(what, why or "false")
        return cond

    def note(self, msg: str) -> None:
        self.notes.append(msg)
        print(f"  note  {msg}")


R = Report()


# ----------------------------------------------------------------------------------------- helpers
def section(title: str) -> None:
    print(f"\n== {title}")


def kind_name(obj: dict) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


def pod_spec(obj: dict) -> dict | None:
    kind = obj.get("kind")
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        return obj["spec"]["template"]["spec"]
    if kind == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    if kind == "Pod":
        return obj["spec"]
    return None


def pod_labels(obj: dict) -> dict:
    if obj.get("kind") == "Pod":
        return obj["metadata"].get("labels", {})
    if obj.get("kind") == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["metadata"].get("labels", {})
    return obj["spec"]["template"].get("metadata", {}).get("labels", {})


def all_containers(spec: dict) -> list[tuple[dict, bool]]:
    """(container, is_native_sidecar) for every init and regular container."""
    out = [(c, c.get("restartPolicy") == "Always") for c in spec.get("initContainers") or []]
    out += [(c, False) for c in spec.get("containers") or []]
    return out


def selector_matches(selector: dict, labels: dict) -> bool:
    if not selector:
        return False
    for k, v in (selector.get("matchLabels") or selector).items():
        if k == "matchExpressions":
            continue
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions") or []:
        val, op = labels.get(e["key"]), e["operator"]
        if op == "In" and val not in e.get("values", []):
            return False
        if op == "NotIn" and val in e.get("values", []):
            return False
        if op == "Exists" and e["key"] not in labels:
            return False
        if op == "DoesNotExist" and e["key"] in labels:
            return False
    return True


def parse_quantity(q) -> float:
    """Kubernetes quantity -> number (bytes for memory, cores for CPU)."""
    s = str(q)
    suffixes = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "m": 1e-3}
    for suf, mul in sorted(suffixes.items(), key=lambda kv: -len(kv[0])):
        if s.endswith(suf):
            return float(s[: -len(suf)]) * mul
    return float(s)


def parse_budget(s: str) -> float | None:
    """autopipe-store --memory-budget in bytes, as crates/store parses it (K/M/G/T are powers of 1024)."""
    s = s.strip()
    mult = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}.get(s[-1:].lower())
    try:
        return float(s[:-1]) * mult if mult else float(s)
    except ValueError:
        return None


def split_address(addr: str) -> tuple[str, str]:
    """('unix', path) or ('tcp', 'host:port'), as crates/proto's transport::Address reads it
    (https:// is TCP with TLS)."""
    addr = addr.strip()
    if addr.startswith("unix://"):
        return "unix", addr[len("unix://") :]
    for scheme in ("http://", "https://"):
        if addr.startswith(scheme):
            addr = addr[len(scheme) :]
    return "tcp", addr.rstrip("/")


def prestop_seconds(c: dict) -> float:
    h = (c.get("lifecycle") or {}).get("preStop") or {}
    if "sleep" in h:
        return float(h["sleep"].get("seconds", 0))
    cmd = (h.get("exec") or {}).get("command") or []
    if len(cmd) == 2 and os.path.basename(cmd[0]) == "sleep":
        return float(cmd[1])
    if len(cmd) == 3 and cmd[1] == "-c":
        m = re.fullmatch(r"\s*sleep\s+(\d+)\s*", cmd[2])
        if m:
            return float(m.group(1))
    return 0.0


# ------------------------------------------------------------------------------------- binary help
@dataclass
class Option:
    flag: str
    env: str | None = None
    default: str | None = None
    text: str = ""


@dataclass
class Help:
    options: dict[str, Option] = field(default_factory=dict)
    subcommands: set[str] = field(default_factory=set)

    def by_env(self) -> dict[str, Option]:
        return {o.env: o for o in self.options.values() if o.env}


class Binaries:
    def __init__(self, bin_dir: Path, lib_path: str) -> None:
        self.bin_dir = bin_dir
        self.env = {"PATH": "/usr/bin:/bin", "LD_LIBRARY_PATH": lib_path, "COLUMNS": "400", "NO_COLOR": "1"}
        self.cache: dict[tuple[str, ...], Help] = {}

    def path(self, name: str) -> Path:
        return self.bin_dir / name

    def help(self, cmd: tuple[str, ...]) -> Help:
        if cmd in self.cache:
            return self.cache[cmd]
        out = subprocess.run(
            [str(self.path(cmd[0])), *cmd[1:], "--help"], env=self.env, capture_output=True, text=True, timeout=60
        )
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} --help exited {out.returncode}: {out.stderr.strip()[:400]}")
        self.cache[cmd] = parse_help(out.stdout)
        return self.cache[cmd]


def parse_help(text: str) -> Help:
    h = Help()
    blocks: list[list[str]] = []
    section_name = ""
    for line in text.splitlines():
        if re.match(r"^[A-Z][A-Za-z ]*:\s*$", line) or line.startswith("Usage:"):
            section_name = line.strip().rstrip(":")
            continue
        if section_name == "Commands":
            m = re.match(r"^\s{2}([a-z][a-z0-9-]*)\s", line + " ")
            if m and m.group(1) != "help":
                h.subcommands.add(m.group(1))
            continue
        if re.match(r"^\s+(-\w, )?--[a-z0-9][a-z0-9-]*", line):
            blocks.append([line])
        elif blocks:
            blocks[-1].append(line)
    for b in blocks:
        body = " ".join(x.strip() for x in b)
        flag = re.match(r"^(?:-\w, )?(--[a-z0-9][a-z0-9-]*)", body).group(1)
        opt = Option(flag=flag, text=body)
        if m := re.search(r"\[env: ([A-Z0-9_]+)=", body):
            opt.env = m.group(1)
        if m := re.search(r"\[default: ([^\]]*)\]", body):
            opt.default = m.group(1)
        h.options[flag] = opt
    return h


# ------------------------------------------------------------------------------------------ render
@dataclass
class Render:
    name: str
    path: Path
    objects: list[dict]

    def find(self, kind: str, name: str) -> dict | None:
        for o in self.objects:
            if o.get("kind") == kind and o["metadata"].get("name") == name:
                return o
        return None

    def of_kind(self, *kinds: str) -> list[dict]:
        return [o for o in self.objects if o.get("kind") in kinds]

    def workloads(self) -> list[dict]:
        return [o for o in self.objects if pod_spec(o) is not None]


def render_all(kubectl: str, k8s_dir: Path) -> list[Render]:
    section("render (kubectl kustomize)")
    renders = []
    roots, components = [], []
    for k in sorted(k8s_dir.rglob("kustomization.yaml")):
        doc = yaml.safe_load(k.read_text())
        (components if doc.get("kind") == "Component" else roots).append(k.parent)
    used_components = set()
    for root in roots:
        doc = yaml.safe_load((root / "kustomization.yaml").read_text())
        for c in doc.get("components") or []:
            used_components.add((root / c).resolve())
        rel = root.relative_to(k8s_dir)
        out = subprocess.run([kubectl, "kustomize", str(root)], capture_output=True, text=True, timeout=120)
        if not R.check(out.returncode == 0, f"render {rel}", out.stderr.strip()[:600]):
            continue
        objs = [d for d in yaml.safe_load_all(out.stdout) if d]
        renders.append(Render(str(rel), root, objs))
    for c in components:
        R.check(c.resolve() in used_components, f"component {c.relative_to(k8s_dir)} is rendered by an overlay",
                "no kustomization includes it, so nothing validates it")
    return renders


# ------------------------------------------------------------------------------------------ schema
def check_schemas(renders: list[Render]) -> None:
    section(f"schema (kubernetes-validate, strict, Kubernetes {', '.join(K8S_VERSIONS)})")
    import kubernetes_validate

    for r in renders:
        for version in K8S_VERSIONS:
            errors = []
            for o in r.objects:
                if (o.get("apiVersion"), o.get("kind")) in CRD_KINDS:
                    continue
                try:
                    kubernetes_validate.validate(o, version, strict=True)
                except kubernetes_validate.ValidationError as e:
                    path = "/".join(str(p) for p in e.path)
                    errors.append(f"{kind_name(o)} at {path}: {e.message}")
                except kubernetes_validate.SchemaNotFoundError as e:
                    errors.append(f"{kind_name(o)}: {e}")
            R.check(not errors, f"{r.name}: {len(r.objects)} objects valid for Kubernetes {version}", "; ".join(errors))


# -------------------------------------------------------------------------------------------- refs
def check_refs(renders: list[Render], base: Render | None = None) -> None:
    """Names that point at other objects resolve; `base` lends its objects to add-ons like prepull."""
    base = base or next((r for r in renders if r.name == "base"), None)
    for r in renders:
        # a standalone add-on (the pre-pull Job) may lean on objects the serving layout creates
        def lookup(kind: str, name: str) -> dict | None:
            return r.find(kind, name) or (base.find(kind, name) if base and not r.of_kind("Namespace") else None)

        namespaces = {o["metadata"]["name"] for o in r.of_kind("Namespace")} or {"autopipe"}
        bad_ns = [kind_name(o) for o in r.objects
                  if o["kind"] not in NAMESPACED_EXEMPT and o["metadata"].get("namespace") not in namespaces]
        R.check(not bad_ns, f"{r.name}: every object in namespace {'/'.join(sorted(namespaces))}", ", ".join(bad_ns))

        errors = []
        for w in r.workloads():
            spec = pod_spec(w)
            sa = spec.get("serviceAccountName")
            if sa and not lookup("ServiceAccount", sa):
                errors.append(f"{kind_name(w)}: ServiceAccount {sa} missing")
            for v in spec.get("volumes") or []:
                if "persistentVolumeClaim" in v and not lookup("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"]):
                    errors.append(f"{kind_name(w)}: PVC {v['persistentVolumeClaim']['claimName']} missing")
                if "configMap" in v and not lookup("ConfigMap", v["configMap"]["name"]):
                    errors.append(f"{kind_name(w)}: ConfigMap {v['configMap']['name']} missing")
            volumes = {v["name"] for v in spec.get("volumes") or []}
            for c, _ in all_containers(spec):
                for ef in c.get("envFrom") or []:
                    ref = ef.get("configMapRef")
                    if ref and not lookup("ConfigMap", ref["name"]):
                        errors.append(f"{kind_name(w)}/{c['name']}: ConfigMap {ref['name']} missing")
                for m in c.get("volumeMounts") or []:
                    if m["name"] not in volumes:
                        errors.append(f"{kind_name(w)}/{c['name']}: volume {m['name']} missing")
                if c.get("image", "").split(":")[0].split("/")[-1] != "autopipe":
                    errors.append(f"{kind_name(w)}/{c['name']}: image {c.get('image')} is not the autopipe image")
            if w["kind"] == "StatefulSet":
                svc = r.find("Service", w["spec"]["serviceName"])
                if not svc or svc["spec"].get("clusterIP") != "None":
                    errors.append(f"{kind_name(w)}: serviceName {w['spec']['serviceName']} is not a headless Service")
            if w["kind"] in ("Deployment", "StatefulSet") and not selector_matches(w["spec"]["selector"], pod_labels(w)):
                errors.append(f"{kind_name(w)}: selector does not match its own pod labels")

        for svc in r.of_kind("Service"):
            pods = [w for w in r.workloads() if selector_matches(svc["spec"].get("selector") or {}, pod_labels(w))]
            if not pods:
                errors.append(f"{kind_name(svc)}: selector matches no pod template")
            for p in svc["spec"].get("ports") or []:
                target = p.get("targetPort", p["port"])
                for w in pods:
                    ports = [cp for c, _ in all_containers(pod_spec(w)) for cp in c.get("ports") or []]
                    if not any(cp.get("name") == target or cp["containerPort"] == target for cp in ports):
                        errors.append(f"{kind_name(svc)} port {p.get('name')}: {w['kind']}/{w['metadata']['name']} has no container port {target}")
        for o in r.of_kind("PodDisruptionBudget", "NetworkPolicy"):
            sel = o["spec"].get("selector") or o["spec"].get("podSelector")
            if not any(selector_matches(sel, pod_labels(w)) for w in r.workloads()):
                errors.append(f"{kind_name(o)}: selector matches no pod template")
        for np in r.of_kind("NetworkPolicy"):
            for rule in np["spec"].get("ingress") or []:
                for peer in rule.get("from") or []:
                    if "podSelector" in peer and not any(selector_matches(peer["podSelector"], pod_labels(w)) for w in r.workloads()):
                        errors.append(f"{kind_name(np)}: ingress peer selector matches no pod template")
        for hpa in r.of_kind("HorizontalPodAutoscaler"):
            ref = hpa["spec"]["scaleTargetRef"]
            target = r.find(ref["kind"], ref["name"])
            if not target:
                errors.append(f"{kind_name(hpa)}: target {ref['kind']}/{ref['name']} missing")
                continue
            containers = {c["name"]: c for c, _ in all_containers(pod_spec(target))}
            for m in hpa["spec"].get("metrics") or []:
                if m["type"] == "ContainerResource":
                    cr = m["containerResource"]
                    c = containers.get(cr["container"])
                    if not c:
                        errors.append(f"{kind_name(hpa)}: container {cr['container']} not in {kind_name(target)}")
                    elif cr["name"] not in ((c.get("resources") or {}).get("requests") or {}):
                        errors.append(f"{kind_name(hpa)}: container {cr['container']} requests no {cr['name']}")
            if hpa["spec"].get("minReplicas", 1) > hpa["spec"]["maxReplicas"]:
                errors.append(f"{kind_name(hpa)}: minReplicas > maxReplicas")
        for sm in r.of_kind("ServiceMonitor"):
            svcs = [s for s in r.of_kind("Service") if selector_matches(sm["spec"]["selector"], s["metadata"].get("labels", {}))]
            if not svcs:
                errors.append(f"{kind_name(sm)}: selector matches no Service")
            for ep in sm["spec"].get("endpoints") or []:
                if not any(p.get("name") == ep.get("port") for s in svcs for p in s["spec"]["ports"]):
                    errors.append(f"{kind_name(sm)}: no selected Service has port {ep.get('port')}")
        R.check(not errors, f"{r.name}: references resolve", "; ".join(errors))


# ---------------------------------------------------------------------------------------- binaries
@dataclass
class Daemon:
    """One container of a rendered pod that runs an autopipe binary, with its effective settings."""

    render: Render
    workload: dict
    container: dict
    sidecar: bool
    cmd: tuple[str, ...]  # binary [+ subcommand]
    help: Help
    env: dict[str, str]  # what the container gets, ConfigMaps and env merged
    settings: dict[str, str]  # flag -> effective value (default < env < argument)

    @property
    def label(self) -> str:
        return f"{self.render.name}: {kind_name(self.workload)}/{self.container['name']}"

    @property
    def binary(self) -> str:
        return self.cmd[0]


def container_env(r: Render, c: dict) -> dict[str, str]:
    env: dict[str, str] = {}
    for ef in c.get("envFrom") or []:
        ref = ef.get("configMapRef")
        cm = r.find("ConfigMap", ref["name"]) if ref else None
        if cm:
            env.update({k: str(v) for k, v in (cm.get("data") or {}).items()})
    for e in c.get("env") or []:
        env[e["name"]] = str(e.get("value", ""))
    return env


def expand(arg: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), arg)


def daemons_of(r: Render, bins: Binaries) -> list[Daemon]:
    out = []
    for w in r.workloads():
        for c, sidecar in all_containers(pod_spec(w)):
            argv = list(c.get("command") or []) + list(c.get("args") or [])
            if not argv or os.path.basename(argv[0]) not in AUTOPIPE_BINARIES:
                continue
            binary = os.path.basename(argv[0])
            env = container_env(r, c)
            rest = argv[1:]
            cmd: tuple[str, ...] = (binary,)
            top = bins.help(cmd)
            if top.subcommands:
                if not R.check(bool(rest) and rest[0] in top.subcommands, f"{r.name}: {kind_name(w)}/{c['name']} runs `{binary} {rest[0] if rest else ''}`",
                               f"{binary} has subcommands {sorted(top.subcommands)}"):
                    continue
                cmd, rest = (binary, rest[0]), rest[1:]
            h = bins.help(cmd)
            settings = {f: o.default for f, o in h.options.items() if o.default is not None}
            for var, val in env.items():
                if var in h.by_env():
                    settings[h.by_env()[var].flag] = val
            i = 0
            unknown = []
            while i < len(rest):
                a = rest[i]
                if a.startswith("--"):
                    flag, _, val = a.partition("=")
                    if flag not in h.options:
                        unknown.append(flag)
                    elif not _ and i + 1 < len(rest) and not rest[i + 1].startswith("--"):
                        val = rest[i + 1]
                        i += 1
                    settings[flag] = expand(val, env) if val else "true"
                i += 1
            d = Daemon(r, w, c, sidecar, cmd, h, env, settings)
            used = " ".join(a.split("=")[0] for a in rest if a.startswith("--")) or "(none)"
            R.check(not unknown, f"{d.label}: command-line flags {used} exist in `{' '.join(cmd)} --help`",
                    f"unknown: {', '.join(unknown)}")
            out.append(d)
    return out


def proto_services(proto_dir: Path) -> set[str]:
    services = set()
    for p in proto_dir.rglob("*.proto"):
        text = p.read_text()
        pkg = re.search(r"^package\s+([\w.]+);", text, re.M)
        for s in re.findall(r"^service\s+(\w+)", text, re.M):
            services.add(f"{pkg.group(1)}.{s}" if pkg else s)
    return services


def image_binaries(docker: str) -> set[str]:
    """The binaries the Dockerfile builds: its `for pkg_bin in PACKAGE:BIN ...; do` list."""
    m = re.search(r"for pkg_bin in (.*?); do", docker.replace("\\\n", " "), re.S)
    return {pair.split(":")[1] for pair in m.group(1).split()} if m else set()


def workspace_binaries(repo: Path) -> dict[str, str]:
    """bin name -> package name, for every [[bin]] (or default bin) of the workspace's members."""
    import tomllib

    root = tomllib.loads((repo / "Cargo.toml").read_text())
    out = {}
    for member in root["workspace"]["members"]:
        manifest = repo / member / "Cargo.toml"
        if not manifest.exists():
            continue
        pkg = tomllib.loads(manifest.read_text())
        name = pkg["package"]["name"]
        for b in pkg.get("bin") or ([{"name": name}] if (repo / member / "src/main.rs").exists() else []):
            out[b["name"]] = name
    return out


def check_dockerfile(repo: Path) -> None:
    section("Dockerfile against the workspace")
    docker = (repo / "deploy/docker/Dockerfile").read_text()
    m = re.search(r"for pkg_bin in (.*?); do", docker.replace("\\\n", " "), re.S)
    pairs = [p.split(":") for p in m.group(1).split()] if m else []
    ws = workspace_binaries(repo)
    R.check({b for _, b in pairs} == AUTOPIPE_BINARIES, f"Dockerfile builds {', '.join(sorted(b for _, b in pairs))}",
            f"expected {sorted(AUTOPIPE_BINARIES)}")
    for pkg, b in pairs:
        R.check(ws.get(b) == pkg, f"Dockerfile: package {pkg} has binary {b}", f"workspace: {b} is in {ws.get(b)}")
    for b in sorted(AUTOPIPE_BINARIES):
        R.check(re.search(rf"^\s*(RUN|&&) {re.escape(b)} --help", docker, re.M) is not None,
                f"Dockerfile: the runtime stage runs `{b} --help` (fails the build on a missing library)")


def check_daemons(renders: list[Render], bins: Binaries, proto_dir: Path, dockerfile: Path) -> dict[str, list[Daemon]]:
    section("manifests against the binaries (--help) and proto/")
    services = proto_services(proto_dir)
    R.check(bool(services), f"proto services found: {', '.join(sorted(services))}", f"no service in {proto_dir}")
    docker = dockerfile.read_text()
    by_render: dict[str, list[Daemon]] = {}
    for r in renders:
        daemons = daemons_of(r, bins)
        by_render[r.name] = daemons
        for d in daemons:
            check_daemon(d, daemons, r, services, docker)
        for w in r.workloads():
            check_termination(w, [d for d in daemons if d.workload is w], r)
            check_scrape(w, [d for d in daemons if d.workload is w], r)
    return by_render


def check_daemon(d: Daemon, all_daemons: list[Daemon], r: Render, services: set[str], docker: str) -> None:
    """Checks one daemon container against its binary's --help, proto/ and the rest of its render."""
    c, h, s = d.container, d.help, d.settings
    errors = []
    # environment: every AUTOPIPE_* variable is a flag of this binary; others are known or used in args
    argv = " ".join(list(c.get("command") or []) + list(c.get("args") or []))
    for var in sorted(d.env):
        if var in h.by_env():
            continue
        if var.startswith("AUTOPIPE_") or (var not in NON_FLAG_ENV and f"$({var})" not in argv):
            errors.append(f"{var} is not an environment variable of `{' '.join(d.cmd)}`")
    R.check(not errors, f"{d.label}: its {len(d.env)} variables are flags of `{' '.join(d.cmd)}` (or RUST_LOG/HF_*)", "; ".join(errors))
    R.check(d.binary in image_binaries(docker), f"{d.label}: the image builds {d.binary}",
            f"deploy/docker/Dockerfile builds {sorted(image_binaries(docker))}")

    ports = {p["containerPort"]: p for p in c.get("ports") or []}
    mounts = {m["mountPath"].rstrip("/"): m["name"] for m in c.get("volumeMounts") or []}

    def mounted(path: str) -> str | None:
        best = None
        for mp, name in mounts.items():
            if path == mp or path.startswith(mp + "/"):
                if best is None or len(mp) > len(best[0]):
                    best = (mp, name)
        return best[1] if best else None

    listen = s.get("--listen")
    if listen and d.binary != "autopipe":
        kind, where = split_address(listen)
        if kind == "tcp":
            port = int(where.rsplit(":", 1)[1])
            R.check(port in ports, f"{d.label}: listens on {listen}, a container port", f"container ports {sorted(ports)}")
            R.check(where.rsplit(":", 1)[0] in ("0.0.0.0", "[::]", "::"), f"{d.label}: {listen} reachable from the pod network",
                    "kubelet probes and Services connect to the pod IP")
        else:
            R.check(mounted(where) is not None, f"{d.label}: socket {where} on a volume", "not under any volumeMount")
    for flag in ("--metrics-listen", "--health-listen"):
        if flag in s and s[flag]:
            kind, where = split_address(s[flag])
            if kind == "tcp":
                R.check(int(where.rsplit(":", 1)[1]) in ports, f"{d.label}: {flag} {s[flag]} is a container port", f"container ports {sorted(ports)}")
    # probes: gRPC ones hit the daemon's TCP listen port and ask for a service it registers
    own = {svc for svc in services if svc.split(".")[-1] == HEALTH_SERVICE.get(d.binary)}
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        p = c.get(kind)
        if not p:
            if d.binary != "autopipe":
                R.fail(f"{d.label}: no {kind}", "every daemon needs startup, readiness and liveness probes")
            continue
        if "grpc" in p:
            port = p["grpc"]["port"]
            svc = p["grpc"].get("service", "")
            # The kubelet's gRPC probes speak no TLS: with --tls-cert they need --health-listen.
            target_flag = "--health-listen" if s.get("--tls-cert") else "--listen"
            target = s.get(target_flag) or ""
            lk, lw = split_address(target)
            R.check(lk == "tcp" and lw.endswith(f":{port}"), f"{d.label}: {kind} gRPC port {port} = {target_flag} {target}",
                    "a TLS listener cannot answer the kubelet's plaintext probe" if s.get("--tls-cert") else "")
            R.check(svc == "" or svc in own, f"{d.label}: {kind} asks for service {svc!r}",
                    f"{d.binary} reports health for '' and {sorted(own)} (from proto/)")
        elif "exec" in p:
            cmd = p["exec"]["command"]
            check_exec_probe(d, kind, cmd)
    # orchestrator -> store
    if d.binary == "autopipe-orchestrator":
        check_store_link(d, all_daemons, r)
    if d.binary == "autopipe-store":
        check_store_resources(d)


def check_exec_probe(d: Daemon, kind: str, cmd: list[str]) -> None:
    if os.path.basename(cmd[0]) not in AUTOPIPE_BINARIES:
        R.note(f"{d.label}: {kind} runs {cmd[0]}, not checked")
        return
    bins_help = d_help_for(cmd)
    if bins_help is None:
        R.fail(f"{d.label}: {kind} `{' '.join(cmd)}`", "unknown subcommand")
        return
    h, rest = bins_help
    flags = [a.split("=")[0] for a in rest if a.startswith("--")]
    R.check(all(f in h.options for f in flags), f"{d.label}: {kind} `{' '.join(cmd)}` flags exist",
            f"unknown: {[f for f in flags if f not in h.options]}")
    if "--store" in flags and d.binary == "autopipe-store":
        i = rest.index("--store")
        R.check(split_address(rest[i + 1]) == split_address(d.settings.get("--listen", "")),
                f"{d.label}: {kind} asks the store at its --listen {d.settings.get('--listen')}", f"probe asks {rest[i + 1]}")


BINS: Binaries | None = None


def d_help_for(cmd: list[str]) -> tuple[Help, list[str]] | None:
    binary = os.path.basename(cmd[0])
    top = BINS.help((binary,))
    if top.subcommands:
        if len(cmd) < 2 or cmd[1] not in top.subcommands:
            return None
        return BINS.help((binary, cmd[1])), cmd[2:]
    return top, cmd[1:]


def check_store_link(d: Daemon, all_daemons: list[Daemon], r: Render) -> None:
    store = d.settings.get("--store", "")
    kind, where = split_address(store)
    if kind == "unix":
        peers = [p for p in all_daemons if p.workload is d.workload and p.binary == "autopipe-store"
                 and split_address(p.settings.get("--listen", "")) == ("unix", where)]
        if not R.check(bool(peers), f"{d.label}: --store {store} is the socket of a store in the same pod",
                       "no store container of this pod listens there"):
            return
        peer = peers[0]
        sock_dir = os.path.dirname(where)
        vols = []
        for c in (d.container, peer.container):
            best = max((m for m in c.get("volumeMounts") or [] if sock_dir == m["mountPath"].rstrip("/") or sock_dir.startswith(m["mountPath"].rstrip("/") + "/")),
                       key=lambda m: len(m["mountPath"]), default=None)
            vols.append((best["name"], best["mountPath"]) if best else None)
        R.check(vols[0] is not None and vols[0] == vols[1], f"{d.label}: socket directory {sock_dir} is one volume shared with {peer.container['name']}",
                f"mounts {vols}")
        R.check(peer.sidecar and not d.sidecar, f"{d.label}: its store (container {peer.container['name']}) is a native sidecar",
                "a store in the orchestrator's pod must be an init container with restartPolicy: Always, so it starts "
                "first and stops only after the orchestrator has drained")
    else:
        host, _, port = where.rpartition(":")
        svc = r.find("Service", host.split(".")[0])
        if not R.check(svc is not None, f"{d.label}: --store {store} names a Service", f"no Service {host.split('.')[0]}"):
            return
        sp = [p for p in svc["spec"]["ports"] if str(p["port"]) == port]
        R.check(bool(sp), f"{d.label}: Service {svc['metadata']['name']} has port {port}")
        stores = [p for p in all_daemons if p.binary == "autopipe-store" and selector_matches(svc["spec"]["selector"], pod_labels(p.workload))]
        ok = False
        for st in stores:
            lk, lw = split_address(st.settings.get("--listen", ""))
            for p in sp:
                tp = p.get("targetPort", p["port"])
                cport = next((cp["containerPort"] for cp in st.container.get("ports") or [] if cp.get("name") == tp or cp["containerPort"] == tp), None)
                ok |= lk == "tcp" and cport is not None and lw.endswith(f":{cport}")
        R.check(ok, f"{d.label}: Service {host} reaches a store listening on its target port", "no selected store listens there")


def check_store_resources(d: Daemon) -> None:
    s, c = d.settings, d.container
    res = c.get("resources") or {}
    limits, requests = res.get("limits") or {}, res.get("requests") or {}
    device = s.get("--device", "cpu")
    gpus = int(str(limits.get("nvidia.com/gpu", 0)))
    image_tag = c.get("image", "").rpartition(":")[2]
    R.check(re.fullmatch(r"cpu|cuda(:\d+)?", device) is not None and device.split(":")[0] in d.help.options["--device"].text,
            f"{d.label}: --device {device} is one --help lists")
    dtype = s.get("--dtype", "")
    R.check(dtype in d.help.options["--dtype"].text, f"{d.label}: --dtype {dtype} is one --help lists")
    if device.startswith("cuda"):
        R.check(gpus >= 1, f"{d.label}: --device {device} gets an nvidia.com/gpu", "no nvidia.com/gpu limit")
        R.check("cpu" not in image_tag, f"{d.label}: CUDA store runs the CUDA image", f"image tag {image_tag}")
    else:
        R.check(gpus == 0, f"{d.label}: --device cpu requests no GPU", f"nvidia.com/gpu: {gpus}")
    budget = s.get("--memory-budget")
    if budget:
        if budget.strip().endswith("%"):
            R.fail(f"{d.label}: --memory-budget {budget}", "a percentage is of host memory (cpu) or unsupported (cuda): give bytes")
        else:
            b = parse_budget(budget)
            if R.check(b is not None and b > 0, f"{d.label}: --memory-budget {budget} parses"):
                if device == "cpu" and "memory" in limits:
                    lim = parse_quantity(limits["memory"])
                    R.check(b <= 0.9 * lim, f"{d.label}: --memory-budget {budget} fits in the memory limit {limits['memory']} (<= 90%)")
    else:
        R.note(f"{d.label}: no --memory-budget (unlimited)")
    R.check("memory" in limits, f"{d.label}: has a memory limit")
    threads = s.get("--threads")
    if threads:
        cpu = limits.get("cpu") or requests.get("cpu")
        R.check(cpu is not None and int(threads) <= parse_quantity(cpu), f"{d.label}: --threads {threads} <= its CPUs {cpu}")


def check_scrape(w: dict, daemons: list[Daemon], r: Render) -> None:
    """prometheus.io/port names a container port where a daemon of the pod serves --metrics-listen."""
    ann = (w["spec"]["template"].get("metadata") or {}).get("annotations") or {} if w["kind"] != "Pod" else {}
    if ann.get("prometheus.io/scrape") != "true":
        return
    port = int(ann.get("prometheus.io/port", "0"))
    label = f"{r.name}: {kind_name(w)}"
    owners = [d for d in daemons if any(p["containerPort"] == port for p in d.container.get("ports") or [])]
    if not R.check(bool(owners), f"{label}: prometheus.io/port {port} is a container port", "no container has it"):
        return
    d = owners[0]
    lk, lw = split_address(d.settings.get("--metrics-listen") or "")
    R.check(lk == "tcp" and lw.endswith(f":{port}"), f"{label}: prometheus.io/port {port} = {d.container['name']} --metrics-listen",
            f"--metrics-listen is {d.settings.get('--metrics-listen')!r}")


def check_termination(w: dict, daemons: list[Daemon], r: Render) -> None:
    if not daemons or w["kind"] in ("Job", "CronJob"):
        return
    spec = pod_spec(w)
    grace = spec.get("terminationGracePeriodSeconds", 30)
    main = [d for d in daemons if not d.sidecar and "--drain-timeout" in d.settings]
    if not main:
        return
    need = max(prestop_seconds(d.container) + float(d.settings["--drain-timeout"]) for d in main)
    label = f"{r.name}: {kind_name(w)}"
    R.check(need + 5 <= grace <= need + 60, f"{label}: terminationGracePeriodSeconds {grace} = preStop + --drain-timeout ({need:g}) + 5..60 s",
            "update terminationGracePeriodSeconds with the drain timeout")
    for d in main:
        R.check(prestop_seconds(d.container) > 0, f"{d.label}: preStop waits before SIGTERM (endpoints removal)", "no preStop sleep")


# --------------------------------------------------------------------------------------- self-test
def _cm(objs: list[dict], prefix: str) -> dict:
    return next(o for o in objs if o["kind"] == "ConfigMap" and re.fullmatch(rf"{prefix}(-[a-z0-9]{{10}})?", o["metadata"]["name"]))


def _wl(objs: list[dict], kind: str, name: str) -> dict:
    return next(o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name)


def _ctr(w: dict, name: str) -> dict:
    return next(c for c, _ in all_containers(pod_spec(w)) if c["name"] == name)


def _unshare_socket(objs: list[dict]) -> None:
    for m in _ctr(_wl(objs, "Deployment", "autopipe"), "orchestrator")["volumeMounts"]:
        if m["name"] == "run":
            m["mountPath"] = "/scratch"


def _plain_store(objs: list[dict]) -> None:
    spec = pod_spec(_wl(objs, "Deployment", "autopipe"))
    store = spec["initContainers"].pop(0)
    store.pop("restartPolicy")
    spec["containers"].append(store)


def _set(d: dict, path: list, value) -> None:
    for k in path[:-1]:
        d = d[k]
    d[path[-1]] = value


MUTATIONS = [
    ("overlays/cpu", "a misspelt flag variable (AUTOPIPE_MAX_CONCURENCY)",
     lambda o: _cm(o, "autopipe-orchestrator")["data"].update(AUTOPIPE_MAX_CONCURENCY=_cm(o, "autopipe-orchestrator")["data"].pop("AUTOPIPE_MAX_CONCURRENCY"))),
    ("overlays/cpu", "a readiness probe on another port than --listen",
     lambda o: _set(_ctr(_wl(o, "Deployment", "autopipe"), "orchestrator"), ["readinessProbe", "grpc", "port"], 50052)),
    ("overlays/cpu", "a readiness probe for a service the daemon does not serve",
     lambda o: _set(_ctr(_wl(o, "Deployment", "autopipe"), "orchestrator"), ["readinessProbe", "grpc", "service"], "autopipe.v1.Orchestrater")),
    ("overlays/cpu", "a grace period shorter than preStop + drain",
     lambda o: _set(pod_spec(_wl(o, "Deployment", "autopipe")), ["terminationGracePeriodSeconds"], 20)),
    ("overlays/cpu", "a drain timeout raised without the grace period",
     lambda o: _cm(o, "autopipe-orchestrator")["data"].update(AUTOPIPE_DRAIN_TIMEOUT="120")),
    ("overlays/cpu", "the store's socket moved away from the orchestrator's --store",
     lambda o: _cm(o, "autopipe-store")["data"].update(AUTOPIPE_STORE_LISTEN="unix:///tmp/store/store.sock")),
    ("overlays/cpu", "the socket's volume not shared with the orchestrator", _unshare_socket),
    ("overlays/cpu", "the store as a plain container (no shutdown ordering)", _plain_store),
    ("overlays/cpu", "a store exec probe asking another socket",
     lambda o: _set(_ctr(_wl(o, "Deployment", "autopipe"), "store"), ["startupProbe", "exec", "command", 3], "unix:///tmp/other.sock")),
    ("overlays/cpu", "a memory budget above the memory limit",
     lambda o: _cm(o, "autopipe-store")["data"].update(AUTOPIPE_MEMORY_BUDGET="20G")),
    ("overlays/cpu", "more libtorch threads than CPUs", lambda o: _cm(o, "autopipe-store")["data"].update(AUTOPIPE_THREADS="16")),
    ("overlays/cpu", "a Service target port no container has",
     lambda o: _set(_wl(o, "Service", "autopipe")["spec"]["ports"][0], ["targetPort"], "grpc-api")),
    ("overlays/gpu", "a CUDA store without a GPU",
     lambda o: _ctr(_wl(o, "Deployment", "autopipe"), "store")["resources"]["limits"].pop("nvidia.com/gpu")),
    ("overlays/split", "--store naming no Service",
     lambda o: _cm(o, "autopipe-orchestrator")["data"].update(AUTOPIPE_STORE="autopipe-stor:50052")),
    ("overlays/split", "a store listening on another port than its Service targets",
     lambda o: _cm(o, "autopipe-store")["data"].update(AUTOPIPE_STORE_LISTEN="0.0.0.0:50053")),
    ("prepull", "a flag `autopipe generate` does not have (--step)",
     lambda o: _set(_ctr(_wl(o, "Job", "autopipe-prepull"), "prepull"), ["command", _ctr(_wl(o, "Job", "autopipe-prepull"), "prepull")["command"].index("--steps")], "--step")),
]


def static_failures(r: Render, base: Render | None, bins: Binaries, services: set[str], docker: str) -> int:
    """How many of the static checks (refs + binaries) fail on `r`, without printing or counting them."""
    import contextlib
    import io

    saved = (R.passed, R.failed, list(R.notes))
    with contextlib.redirect_stdout(io.StringIO()):
        check_refs([r], base)
        daemons = daemons_of(r, bins)
        for d in daemons:
            check_daemon(d, daemons, r, services, docker)
        for w in r.workloads():
            check_termination(w, [d for d in daemons if d.workload is w], r)
    failed = R.failed - saved[1]
    R.passed, R.failed, R.notes = saved
    return failed


def selftest(renders: list[Render], bins: Binaries, proto_dir: Path, dockerfile: Path) -> None:
    section("self-test: the checks catch deliberate mistakes")
    import copy

    by_name = {r.name: r for r in renders}
    base = by_name.get("base")
    services, docker = proto_services(proto_dir), dockerfile.read_text()
    for name, what, mutate in MUTATIONS:
        if name not in by_name:
            R.fail(f"mutation on {name}", "render missing")
            continue
        orig = by_name[name]
        if static_failures(orig, base, bins, services, docker):
            R.fail(f"{name}: {what}", "the unmodified render already fails, the mutation proves nothing")
            continue
        objs = copy.deepcopy(orig.objects)
        try:
            mutate(objs)
        except (StopIteration, KeyError, IndexError, ValueError) as e:
            R.fail(f"{name}: {what}", f"mutation no longer applies ({e!r}): update MUTATIONS")
            continue
        n = static_failures(Render(orig.name, orig.path, objs), base, bins, services, docker)
        R.check(n > 0, f"{name}: catches {what} ({n} failing checks)", "no check failed")
    import kubernetes_validate

    if "overlays/cpu" in by_name:
        dep = copy.deepcopy(_wl(by_name["overlays/cpu"].objects, "Deployment", "autopipe"))
        c = _ctr(dep, "orchestrator")
        c["readinesProbe"] = c.pop("readinessProbe")
        try:
            kubernetes_validate.validate(dep, K8S_VERSIONS[0], strict=True)
            caught = False
        except kubernetes_validate.ValidationError:
            caught = True
        R.check(caught, "overlays/cpu: schema validation catches a misspelt field (readinesProbe)", "it validated")


# ------------------------------------------------------------------------------------------- smoke
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health(target: str, service: str, timeout: float = 3.0) -> str:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as ch:
        try:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
            return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
        except grpc.RpcError as e:
            return f"rpc error {e.code().name}"


def smoke(renders: list[Render], bins: Binaries, by_render: dict[str, list[Daemon]]) -> None:
    section("smoke: the binaries run with each overlay's settings; the probes pass as the kubelet runs them")
    for r in renders:
        pods = {}
        for d in by_render.get(r.name, []):
            if d.binary in ("autopipe-store", "autopipe-orchestrator"):
                pods.setdefault(id(d.workload), []).append(d)
        if not pods:
            continue
        with tempfile.TemporaryDirectory(prefix="autopipe-smoke-") as tmp:
            smoke_render(r, [d for ds in pods.values() for d in ds], bins, Path(tmp))


def smoke_render(r: Render, daemons: list[Daemon], bins: Binaries, tmp: Path) -> None:
    # one loopback port per (workload, container port); Services resolve to their store's port
    portmap: dict[tuple[int, int], int] = {}
    for d in daemons:
        for p in d.container.get("ports") or []:
            portmap[(id(d.workload), p["containerPort"])] = free_port()
    svc_map: dict[str, int] = {}
    for svc in r.of_kind("Service"):
        for d in daemons:
            if selector_matches(svc["spec"].get("selector") or {}, pod_labels(d.workload)):
                for sp in svc["spec"]["ports"]:
                    tp = sp.get("targetPort", sp["port"])
                    for cp in d.container.get("ports") or []:
                        if cp.get("name") == tp or cp["containerPort"] == tp:
                            svc_map[f"{svc['metadata']['name']}:{sp['port']}"] = portmap[(id(d.workload), cp["containerPort"])]

    def local_dir(d: Daemon) -> Path:
        return tmp / f"{d.workload['metadata']['name']}"  # pod-local filesystem (the shared emptyDir)

    def move(d: Daemon, addr: str) -> str:
        kind, where = split_address(addr)
        if kind == "unix":
            return f"unix://{local_dir(d)}{where}"
        scheme = "https://" if addr.strip().startswith("https://") else ""
        host, _, port = where.rpartition(":")
        if host in ("0.0.0.0", "[::]", "::", "127.0.0.1", "localhost"):
            return f"{scheme}127.0.0.1:{portmap.get((id(d.workload), int(port)), port)}"
        key = f"{host.split('.')[0]}:{port}"
        return f"{scheme}127.0.0.1:{svc_map[key]}" if key in svc_map else addr

    procs = []
    order = sorted(daemons, key=lambda d: d.binary != "autopipe-store")  # stores first, as the sidecar starts first
    try:
        for d in order:
            env = dict(bins.env)
            env.update(d.env)
            for var in ("AUTOPIPE_LISTEN", "AUTOPIPE_STORE_LISTEN", "AUTOPIPE_STORE", "AUTOPIPE_METRICS_LISTEN", "AUTOPIPE_HEALTH_LISTEN"):
                if var in env and var in d.help.by_env():
                    env[var] = move(d, env[var])
            stand_ins = volume_stand_ins(d, tmp)
            for var, val in list(env.items()):  # paths on Secrets and claims: their local stand-ins
                for mount, local in stand_ins.items():
                    mount = mount.rstrip("/")
                    if val == mount or val.startswith(mount + "/"):
                        env[var] = local + val[len(mount):]
            if env.get("AUTOPIPE_DEVICE", "cpu").startswith("cuda"):
                env["AUTOPIPE_DEVICE"] = "cpu"  # no GPU here; the CUDA path is for a GPU runner
            args = [a for a in list(d.container.get("command") or [])[1:] + list(d.container.get("args") or [])]
            log = open(local_dir(d).with_suffix(f".{d.container['name']}.log"), "w+")
            local_dir(d).mkdir(parents=True, exist_ok=True)
            p = subprocess.Popen([str(bins.path(d.binary)), *args], env=env, stdout=log, stderr=subprocess.STDOUT)
            procs.append((d, p, log, env))
            if not wait_probes(d, p, log, env, "startupProbe", move, bins, deadline=60):
                return
        for d, p, log, env in procs:
            if env.get("AUTOPIPE_METRICS_LISTEN") and "AUTOPIPE_METRICS_LISTEN" in d.help.by_env():
                ann = (d.workload["spec"]["template"].get("metadata") or {}).get("annotations") or {}
                url = f"http://{split_address(env['AUTOPIPE_METRICS_LISTEN'])[1]}{ann.get('prometheus.io/path', '/metrics')}"
                R.check(http_ok(url), f"{d.label}: metrics answer GET {ann.get('prometheus.io/path', '/metrics')}", f"{url}; log: {tail(log)}")
            for kind in ("readinessProbe", "livenessProbe"):
                R.check(run_probe(d, d.container.get(kind), env, move, bins) is True, f"{d.label}: {kind} passes on the running binary",
                        f"{run_probe(d, d.container.get(kind), env, move, bins)}; log: {tail(log)}")
        # SIGTERM in the order the kubelet stops them: orchestrators, then stores (sidecars last)
        for d, p, log, env in sorted(procs, key=lambda t: t[0].binary == "autopipe-store"):
            p.send_signal(signal.SIGTERM)
            probe = d.container.get("readinessProbe") or {}
            if "grpc" in probe:
                status = "?"
                for _ in range(20):
                    status = health(move(d, f"0.0.0.0:{probe['grpc']['port']}"), probe["grpc"].get("service", ""), timeout=1)
                    if status != "SERVING":
                        break
                    time.sleep(0.1)
                R.check(status != "SERVING", f"{d.label}: after SIGTERM readiness is no longer SERVING", status)
            try:
                rc = p.wait(timeout=float(d.settings.get("--drain-timeout", 30)) + 5)
            except subprocess.TimeoutExpired:
                rc = "still running"
            R.check(rc == 0, f"{d.label}: exits cleanly after SIGTERM with nothing in flight", f"exit {rc}; log: {tail(log)}")
    finally:
        for d, p, log, env in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            log.close()


def stand_in_pki(tmp: Path) -> dict[str, bytes]:
    """One CA for the whole render (what a cluster's cert-manager issuer is) and a certificate from
    it valid for 127.0.0.1 and localhost, where the smoke run reaches every daemon: PEM by key
    name, for the kubernetes.io/tls keys tls.crt, tls.key and ca.crt."""
    cached = tmp / "secrets" / ".pki"
    if cached.is_dir():
        return {f.name: f.read_bytes() for f in cached.iterdir()}
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def pem_key(k) -> bytes:
        return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("check-deploy CA")).issuer_name(name("check-deploy CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(name("autopipe")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pki = {"ca.crt": ca.public_bytes(serialization.Encoding.PEM),
           "tls.crt": cert.public_bytes(serialization.Encoding.PEM), "tls.key": pem_key(key)}
    cached.mkdir(parents=True)
    for k, v in pki.items():
        (cached / k).write_bytes(v)
    return pki


def volume_stand_ins(d: Daemon, tmp: Path) -> dict[str, str]:
    """A container's Secret and PersistentVolumeClaim mounts -> local folders standing in for them:
    a Secret's folder holds a stand-in for each key (one token per Secret, so an orchestrator and
    the store it authenticates to share it, as they share the Secret; real PEM from one CA for the
    TLS keys, so every TLS hop of the render handshakes); a claim's folder is empty."""
    volumes = {v["name"]: v for v in d.workload["spec"]["template"]["spec"].get("volumes") or []}
    out: dict[str, str] = {}
    for m in d.container.get("volumeMounts") or []:
        volume = volumes.get(m["name"], {})
        if secret := volume.get("secret"):
            local = tmp / "secrets" / secret["secretName"]
            local.mkdir(parents=True, exist_ok=True)
            for item in secret.get("items") or []:
                if item["key"] in ("tls.crt", "tls.key", "ca.crt"):
                    (local / item["path"]).write_bytes(stand_in_pki(tmp)[item["key"]])
                else:
                    (local / item["path"]).write_text(f"check-deploy-{secret['secretName']}\n")
        elif claim := volume.get("persistentVolumeClaim"):
            local = tmp / "claims" / claim["claimName"]
            local.mkdir(parents=True, exist_ok=True)
        else:
            continue
        out[m["mountPath"]] = str(local)
    return out


def http_ok(url: str) -> bool:
    import urllib.request

    for _ in range(20):
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return resp.status == 200
        except OSError:
            time.sleep(0.2)
    return False


def tail(log) -> str:
    log.flush()
    log.seek(0)
    return " | ".join(log.read().strip().splitlines()[-5:])


def run_probe(d: Daemon, probe: dict | None, env: dict, move, bins: Binaries):
    if not probe:
        return "no probe"
    if "grpc" in probe:
        status = health(move(d, f"0.0.0.0:{probe['grpc']['port']}"), probe["grpc"].get("service", ""))
        return True if status == "SERVING" else status
    if "exec" in probe:
        cmd = list(probe["exec"]["command"])
        cmd = [move(d, a) if a.startswith("unix://") else a for a in cmd]
        if os.path.basename(cmd[0]) in AUTOPIPE_BINARIES:
            cmd[0] = str(bins.path(os.path.basename(cmd[0])))
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=probe.get("timeoutSeconds", 1) + 10)
        return True if out.returncode == 0 else f"exit {out.returncode}: {out.stderr.strip()[-300:]}"
    return "probe kind not run here"


def wait_probes(d: Daemon, p: subprocess.Popen, log, env: dict, kind: str, move, bins: Binaries, deadline: float) -> bool:
    end = time.time() + deadline
    result = None
    while time.time() < end:
        if p.poll() is not None:
            break
        result = run_probe(d, d.container.get(kind), env, move, bins)
        if result is True:
            break
        time.sleep(0.2)
    return R.check(result is True, f"{d.label}: starts with the overlay's settings and its {kind} passes",
                   f"exit {p.poll()}, probe: {result}; log: {tail(log)}")


# -------------------------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", type=Path, required=True)
    ap.add_argument("--kubectl", required=True)
    ap.add_argument("--bin-dir", type=Path, required=True)
    ap.add_argument("--lib-path", required=True, help="LD_LIBRARY_PATH for the binaries (the image's layout)")
    ap.add_argument("--no-smoke", action="store_true")
    a = ap.parse_args()
    global BINS
    BINS = bins = Binaries(a.bin_dir, a.lib_path)
    k8s = a.repo / "deploy/k8s"
    renders = render_all(a.kubectl, k8s)
    check_schemas(renders)
    section("references between objects")
    check_refs(renders)
    section("binaries answer --help")
    for b in sorted(AUTOPIPE_BINARIES):
        try:
            h = bins.help((b,))
            R.ok(f"{b} --help: {len(h.options)} options{', subcommands ' + ' '.join(sorted(h.subcommands)) if h.subcommands else ''}")
        except Exception as e:  # noqa: BLE001 - reported as a failure
            R.fail(f"{b} --help", str(e))
            return finish()
    check_dockerfile(a.repo)
    by_render = check_daemons(renders, bins, a.repo / "proto", a.repo / "deploy/docker/Dockerfile")
    selftest(renders, bins, a.repo / "proto", a.repo / "deploy/docker/Dockerfile")
    if not a.no_smoke:
        smoke(renders, bins, by_render)
    return finish()


def finish() -> int:
    print()
    for n in R.notes:
        print(f"note: {n}")
    print(f"manifests: {R.passed} passed, {R.failed} failed")
    return 1 if R.failed else 0


if __name__ == "__main__":
    sys.exit(main())
