"""Kubernetes manifests from a plan: a KubeRay RayCluster with one worker group per device type,
the plan as a ConfigMap, a Service, a PodDisruptionBudget, the device plug-in as a DaemonSet with
its RBAC, a `kcloud serve` Deployment and Service (`serve=True`; see `build_manifests`), and per
tenant a Namespace, a ResourceQuota on the device resources and a NetworkPolicy that isolates it.
The output folder is a kustomize base (`kustomization.yaml` lists every file).

Every document is validated (`kcloud.k8s.validate`) before anything is written.

Sizing (a K-Cloud rule, from the plan's modeled figures): each device is driven by one worker
process, given `CPU_PER_DEVICE` cores and host memory for its shard's modeled memory (weights
are staged in host memory while they load) plus `HOST_MEMORY_PER_WORKER` of its own.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kcloud.errors import KCloudError
from kcloud.hardware.catalog import get_device
from kcloud.hardware.device import DeviceKind
from kcloud.k8s.plugin import DEFAULT_KUBELET_DIR
from kcloud.k8s.validate import validate_manifest
from kcloud.planner.plan import Plan

# Ray custom resource a K-Cloud worker asks for: `kcloud/<device type>`, as the runtime's Ray
# executor names it (kcloud.runtime.ray_executor.resource_name; a test keeps the two equal).
RAY_RESOURCE_PREFIX = "kcloud/"
PLAN_MOUNT = "/etc/kcloud"
PLAN_FILE = "plan.json"
SERVE_PORT = 8000
RAY_CLIENT_PORT = 10001
RAY_DASHBOARD_PORT = 8265
RAY_GCS_PORT = 6379
CPU_PER_DEVICE = 2
HOST_MEMORY_PER_WORKER = 2 * 2**30
HEAD_CPU = 2
HEAD_MEMORY = 4 * 2**30
DEFAULT_IMAGE = "ghcr.io/kcloud/kcloud:0.1.0"
GIB = 2**30


@dataclass(frozen=True)
class Tenant:
    name: str
    quota: Mapping[str, int] = field(default_factory=dict)  # device type -> devices


@dataclass(frozen=True)
class Group:
    """The devices of one type a plan uses: nodes, devices per node, modeled memory."""

    device_type: str
    nodes: tuple[str, ...]
    per_node: int  # the most any node holds (a worker group has one pod template)
    memory_bytes: float  # the most modeled memory the devices of one node need

    @property
    def resource(self) -> str:
        return get_device(self.device_type).k8s_resource

    @property
    def is_cpu(self) -> bool:
        return get_device(self.device_type).kind is DeviceKind.CPU


def dns_label(text: str, limit: int = 63) -> str:
    """`text` as a DNS-1123 label: lower case, [a-z0-9-], at most `limit` characters."""
    out = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    out = out[:limit].rstrip("-")
    if not out:
        raise KCloudError(f"'{text}' gives no usable Kubernetes name", "pass --name NAME")
    return out


def slot_parts(slot: str) -> tuple[str, str]:
    """(node, device type) of a plan's device slot `node/device-type/index`."""
    parts = slot.split("/")
    if len(parts) != 3:
        raise KCloudError(f"plan device '{slot}' is not node/device-type/index",
                          "give a file written by `kcloud plan -o`")
    return parts[0], parts[1]


def plan_groups(plan: Plan) -> list[Group]:
    """The plan's devices grouped by type, in the order the plan first uses them (the PIM
    devices of a stage's attention offload too: its pods ask for them)."""
    count: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    memory: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for r in plan.replicas:
        for st in r.stages:
            pim = st.attention_offload.devices if st.attention_offload else ()
            for slot in (*st.devices, *pim):
                node, dtype = slot_parts(slot)
                count[dtype][node] += 1
                memory[dtype][node] += 0.0 if slot in pim else st.memory_bytes
    return [Group(t, tuple(by_node), max(by_node.values()), max(memory[t].values()))
            for t, by_node in count.items()]


def host_resources(devices: int, memory_bytes: float, cpu_devices: int = 0) -> tuple[int, int]:
    """(cores, host memory bytes) for workers driving `devices` accelerators and `cpu_devices`
    CPU cores whose shards need `memory_bytes` of modeled memory in all."""
    workers = devices + cpu_devices
    cores = CPU_PER_DEVICE * devices + cpu_devices
    return cores, int(memory_bytes + HOST_MEMORY_PER_WORKER * workers)


def _resources(g: Group) -> dict[str, Any]:
    cpu, mem_bytes = host_resources(0 if g.is_cpu else g.per_node, g.memory_bytes,
                                    g.per_node if g.is_cpu else 0)
    mem = math.ceil(mem_bytes / GIB)
    req: dict[str, Any] = {"cpu": str(cpu), "memory": f"{mem}Gi"}
    lim: dict[str, Any] = {"memory": f"{mem}Gi"}
    if not g.is_cpu and g.resource:
        req[g.resource] = str(g.per_node)  # extended resources: requests == limits
        lim[g.resource] = str(g.per_node)
    return {"requests": req, "limits": lim}


@dataclass(frozen=True)
class Options:
    name: str
    namespace: str = "kcloud"
    image: str = DEFAULT_IMAGE
    serve: bool = False
    tenants: tuple[Tenant, ...] = ()
    ray_version: str = "2.40.0"
    kubelet_dir: str = DEFAULT_KUBELET_DIR


def _labels(o: Options, component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "kcloud", "app.kubernetes.io/instance": o.name,
            "app.kubernetes.io/component": component}


def _meta(o: Options, name: str, component: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "namespace": o.namespace, "labels": _labels(o, component), **extra}


def _plan_volume(o: Options) -> tuple[dict[str, Any], dict[str, Any]]:
    vol = {"name": "plan", "configMap": {"name": f"{o.name}-plan"}}
    mount = {"name": "plan", "mountPath": PLAN_MOUNT, "readOnly": True}
    return vol, mount


def _env(o: Options) -> list[dict[str, Any]]:
    return [{"name": "KCLOUD_PLAN", "value": f"{PLAN_MOUNT}/{PLAN_FILE}"}]


def raycluster(plan: Plan, o: Options, groups: list[Group]) -> dict[str, Any]:
    vol, mount = _plan_volume(o)
    head = {
        "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"},  # no work on the head
        "template": {
            "metadata": {"labels": _labels(o, "ray-head")},
            "spec": {
                "containers": [{
                    "name": "ray-head", "image": o.image, "env": _env(o),
                    "ports": [{"name": "gcs", "containerPort": RAY_GCS_PORT},
                              {"name": "dashboard", "containerPort": RAY_DASHBOARD_PORT},
                              {"name": "client", "containerPort": RAY_CLIENT_PORT}],
                    "resources": {"requests": {"cpu": str(HEAD_CPU),
                                               "memory": f"{HEAD_MEMORY // GIB}Gi"},
                                  "limits": {"memory": f"{HEAD_MEMORY // GIB}Gi"}},
                    "volumeMounts": [mount],
                }],
                "volumes": [vol],
            },
        },
    }
    workers = []
    for g in groups:
        ray_resources = json.dumps({f"{RAY_RESOURCE_PREFIX}{g.device_type}": g.per_node})
        n = len(g.nodes)
        workers.append({
            "groupName": dns_label(g.device_type.replace(":", "-")),
            "replicas": n, "minReplicas": n, "maxReplicas": n,
            # KubeRay passes each value to `ray start --<key>=<value>`; a JSON value is quoted
            "rayStartParams": {"resources": f"'{ray_resources}'"},
            "template": {
                "metadata": {"labels": {**_labels(o, "ray-worker"),
                                        "kcloud.io/device-type": dns_label(
                                            g.device_type.replace(":", "."))}},
                "spec": {
                    "containers": [{
                        "name": "ray-worker", "image": o.image, "env": _env(o),
                        "resources": _resources(g), "volumeMounts": [mount],
                    }],
                    "volumes": [vol],
                },
            },
        })
    return {
        "apiVersion": "ray.io/v1", "kind": "RayCluster",
        "metadata": _meta(o, o.name, "ray-cluster",
                          annotations={"kcloud.io/model": plan.model,
                                       "kcloud.io/cluster": plan.cluster,
                                       "kcloud.io/objective": plan.objective}),
        "spec": {"rayVersion": o.ray_version, "headGroupSpec": head,
                 "workerGroupSpecs": workers},
    }


def plan_configmap(plan: Plan, o: Options) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": _meta(o, f"{o.name}-plan", "plan"),
            "data": {PLAN_FILE: plan.to_json() + "\n"}}


def ray_service(o: Options) -> dict[str, Any]:
    """The Ray head's client and dashboard ports under a stable name (`<name>-ray`)."""
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": _meta(o, f"{o.name}-ray", "ray-head"),
            "spec": {"type": "ClusterIP",
                     "selector": {"ray.io/cluster": o.name, "ray.io/node-type": "head"},
                     "ports": [{"name": "client", "port": RAY_CLIENT_PORT,
                                "targetPort": RAY_CLIENT_PORT},
                               {"name": "dashboard", "port": RAY_DASHBOARD_PORT,
                                "targetPort": RAY_DASHBOARD_PORT}]}}


def worker_pdb(o: Options, groups: list[Group]) -> dict[str, Any]:
    """Every worker pod holds part of every pipeline: a voluntary eviction may take none."""
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": _meta(o, f"{o.name}-workers", "ray-worker"),
            "spec": {"minAvailable": sum(len(g.nodes) for g in groups),
                     "selector": {"matchLabels": {"ray.io/cluster": o.name,
                                                  "ray.io/node-type": "worker"}}}}


def serve_deployment(o: Options, groups: list[Group] | None) -> dict[str, Any]:
    """`kcloud serve` of the plan. `groups` given: the plan fits one node, and the pod holds
    every device of it and runs the workers itself; None: the workers are the RayCluster's,
    reached through the Ray head's client port (`kcloud serve --ray`)."""
    vol, mount = _plan_volume(o)
    probe = {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 10}
    ready = {"httpGet": {"path": "/ready", "port": "http"}, "periodSeconds": 5}
    labels = _labels(o, "serve")
    cmd = ["kcloud", "serve", "--plan", f"{PLAN_MOUNT}/{PLAN_FILE}", "--mode", "real",
           "--host", "0.0.0.0", "--port", str(SERVE_PORT)]
    if groups is None:
        cmd += ["--ray", f"ray://{o.name}-ray:{RAY_CLIENT_PORT}"]
        resources: dict[str, Any] = {"requests": {"cpu": "2", "memory": "4Gi"},
                                     "limits": {"memory": "4Gi"}}
    else:
        resources = {"requests": {}, "limits": {}}
        cpu = mem = 0
        for g in groups:
            r = _resources(g)
            cpu += int(r["requests"].pop("cpu"))
            mem += int(r["requests"].pop("memory").removesuffix("Gi"))
            r["limits"].pop("memory")
            resources["requests"].update(r["requests"])
            resources["limits"].update(r["limits"])
        resources["requests"].update({"cpu": str(cpu), "memory": f"{mem}Gi"})
        resources["limits"]["memory"] = f"{mem}Gi"
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": _meta(o, f"{o.name}-serve", "serve"),
            "spec": {"replicas": 1, "selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": labels}, "spec": {
                         "containers": [{
                             "name": "serve", "image": o.image, "command": cmd, "env": _env(o),
                             "ports": [{"name": "http", "containerPort": SERVE_PORT}],
                             "livenessProbe": probe, "readinessProbe": ready,
                             "resources": resources, "volumeMounts": [mount]}],
                         "volumes": [vol]}}}}


def serve_pdb(o: Options) -> dict[str, Any]:
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": _meta(o, f"{o.name}-serve", "serve"),
            "spec": {"minAvailable": 1, "selector": {"matchLabels": _labels(o, "serve")}}}


def serve_service(o: Options) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": _meta(o, o.name, "serve"),
            "spec": {"type": "ClusterIP", "selector": _labels(o, "serve"),
                     "ports": [{"name": "http", "port": SERVE_PORT, "targetPort": "http"}]}}


def device_plugin(o: Options, partitions: Mapping[str, str]) -> list[dict[str, Any]]:
    """The device plug-in on every node, with its ServiceAccount and `get` on nodes (it reads
    its node's `kcloud.io/partition.<type>` labels; `--partition` flags from the plan win)."""
    name = "kcloud-device-plugin"
    labels = {"app.kubernetes.io/name": "kcloud-device-plugin",
              "app.kubernetes.io/instance": o.name}
    args = ["kcloud", "k8s", "device-plugin", "--discover", "--partitions-from-node",
            "--kubelet-dir", o.kubelet_dir]
    for dtype, profile in sorted(partitions.items()):
        args += ["--partition", f"{dtype}={profile}"]
    role = f"{o.namespace}-{name}"
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": name, "namespace": o.namespace, "labels": labels}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": role, "labels": labels},
         "rules": [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": role, "labels": labels},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                     "name": role},
         "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": o.namespace}]},
        {"apiVersion": "apps/v1", "kind": "DaemonSet",
         "metadata": {"name": name, "namespace": o.namespace, "labels": labels},
         "spec": {
             "selector": {"matchLabels": labels},
             "updateStrategy": {"type": "RollingUpdate"},
             "template": {"metadata": {"labels": labels}, "spec": {
                 "serviceAccountName": name,
                 "tolerations": [{"operator": "Exists"}],  # accelerator nodes are often tainted
                 "containers": [{
                     "name": "device-plugin", "image": o.image, "command": args,
                     "env": [{"name": "NODE_NAME",
                              "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}],
                     "securityContext": {"allowPrivilegeEscalation": False,
                                         "readOnlyRootFilesystem": True,
                                         "capabilities": {"drop": ["ALL"]}},
                     "resources": {"requests": {"cpu": "50m", "memory": "64Mi"},
                                   "limits": {"memory": "256Mi"}},
                     "volumeMounts": [
                         {"name": "device-plugins", "mountPath": o.kubelet_dir},
                         {"name": "sys", "mountPath": "/sys", "readOnly": True},
                         {"name": "dev", "mountPath": "/dev", "readOnly": True}]}],
                 "volumes": [
                     {"name": "device-plugins",
                      "hostPath": {"path": o.kubelet_dir, "type": "Directory"}},
                     {"name": "sys", "hostPath": {"path": "/sys", "type": "Directory"}},
                     {"name": "dev", "hostPath": {"path": "/dev", "type": "Directory"}}]}}}},
    ]


def tenant_docs(t: Tenant, o: Options) -> list[dict[str, Any]]:
    ns = dns_label(t.name)
    labels = {"app.kubernetes.io/name": "kcloud", "kcloud.io/tenant": ns}
    hard: dict[str, str] = {}
    for dtype, n in sorted(t.quota.items()):
        dev = get_device(dtype)
        key = "requests.cpu" if dev.kind is DeviceKind.CPU or not dev.k8s_resource \
            else f"requests.{dev.k8s_resource}"
        hard[key] = str(int(hard.get(key, "0")) + n)
    dns = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
           "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": labels}},
        {"apiVersion": "v1", "kind": "ResourceQuota",
         "metadata": {"name": "kcloud-devices", "namespace": ns, "labels": labels},
         "spec": {"hard": hard}},
        {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
         "metadata": {"name": "kcloud-isolate", "namespace": ns, "labels": labels},
         "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"],
                  # only the tenant's own pods reach its pods; its pods reach their own
                  # namespace and cluster DNS, nothing else
                  "ingress": [{"from": [{"podSelector": {}}]}],
                  "egress": [{"to": [{"podSelector": {}}]},
                             {"to": [dns], "ports": [{"protocol": "UDP", "port": 53},
                                                     {"protocol": "TCP", "port": 53}]}]}},
    ]


def plan_partitions(groups: Iterable[Group]) -> dict[str, str]:
    """The partition profile per catalog device the plan's device types name (`id:part`)."""
    out: dict[str, str] = {}
    for g in groups:
        dev_id, _, part = g.device_type.partition(":")
        if part and not g.is_cpu:
            if out.get(dev_id, part) != part:
                raise KCloudError(f"the plan uses two partition profiles of {dev_id} "
                                  f"({out[dev_id]}, {part})",
                                  "a node advertises one profile per device type")
            out[dev_id] = part
    return out


def build_manifests(plan: Plan, o: Options) -> dict[str, list[dict[str, Any]]]:
    """File name -> documents, each validated.

    Without `serve`: the RayCluster that runs the plan's workers, its head's Service and the
    workers' PodDisruptionBudget. With `serve`, a plan on one node becomes one `kcloud serve`
    pod holding all its devices (no Ray); a plan across nodes keeps the RayCluster and adds the
    `kcloud serve` Deployment that drives it."""
    groups = plan_groups(plan)
    one_node = len({n for g in groups for n in g.nodes}) == 1
    files: dict[str, list[dict[str, Any]]] = {"plan-configmap.yaml": [plan_configmap(plan, o)]}
    if o.serve and one_node:
        files["serve.yaml"] = [serve_deployment(o, groups), serve_service(o)]
        files["pdb.yaml"] = [serve_pdb(o)]
    else:
        files["raycluster.yaml"] = [raycluster(plan, o, groups)]
        files["ray-service.yaml"] = [ray_service(o)]
        files["pdb.yaml"] = [worker_pdb(o, groups)]
        if o.serve:
            files["serve.yaml"] = [serve_deployment(o, None), serve_service(o)]
    files["device-plugin.yaml"] = device_plugin(o, plan_partitions(groups))
    for t in o.tenants:
        files[f"tenant-{dns_label(t.name)}.yaml"] = tenant_docs(t, o)
    for docs in files.values():
        for d in docs:
            validate_manifest(d)
    return files


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:  # a repeated volume is written out again
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump(docs: list[dict[str, Any]]) -> str:
    return yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False, width=100)


def write(files: Mapping[str, list[dict[str, Any]]], out: Path,
          kustomization: bool = True) -> list[Path]:
    """Write the files (already validated) and a kustomization.yaml listing them."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, docs in files.items():
        p = out / name
        p.write_text(dump(docs))
        written.append(p)
    if kustomization:
        k = out / "kustomization.yaml"
        k.write_text(dump([{"apiVersion": "kustomize.config.k8s.io/v1beta1",
                            "kind": "Kustomization", "resources": list(files)}]))
        written.append(k)
    return written
