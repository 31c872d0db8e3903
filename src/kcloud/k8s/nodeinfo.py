"""A node's partition profiles from its labels, read from the Kubernetes API as the device
plug-in's ServiceAccount (the only API access its RBAC grants: `get` on nodes).

An operator picks a node's partitioning by labelling it, as NVIDIA's MIG manager reads
`nvidia.com/mig.config`:

    kubectl label node npu-0 kcloud.io/partition.furiosa-rngd=2core.12gb

and the plug-in, started with `--partitions-from-node`, advertises that node's RNGDs as
`furiosa.ai/rngd-2core.12gb` instances. In a pod, the API address, token and CA come from the
standard in-cluster locations (`KUBERNETES_SERVICE_HOST`/`_PORT`, the ServiceAccount folder).
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx

from kcloud.errors import KCloudError

LABEL_PREFIX = "kcloud.io/partition."
SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


def in_cluster_api() -> str:
    host = os.environ.get("KUBERNETES_SERVICE_HOST")
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    if not host:
        raise KCloudError("--partitions-from-node needs the Kubernetes API, and "
                          "KUBERNETES_SERVICE_HOST is not set",
                          "run it in a pod (the DaemonSet), or give --partition TYPE=PROFILE")
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    return f"https://{host}:{port}"


def node_partitions(node: str, api: str | None = None, token_file: Path | None = None,
                    ca_file: Path | None = None, timeout_s: float = 10.0) -> dict[str, str]:
    """{catalog device id: partition profile} from the `kcloud.io/partition.<id>` labels of
    Node `node`."""
    url = f"{api or in_cluster_api()}/api/v1/nodes/{node}"
    token_file = token_file or SA_DIR / "token"
    try:
        token = token_file.read_text().strip()
    except OSError as exc:
        raise KCloudError(f"cannot read the ServiceAccount token at {token_file} "
                          f"({exc.strerror})", "mount the ServiceAccount token") from None
    ca = ca_file or SA_DIR / "ca.crt"
    verify: str | bool = str(ca) if url.startswith("https://") else False
    try:
        resp = httpx.get(url, headers={"Authorization": f"Bearer {token}"}, verify=verify,
                         timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise KCloudError(f"cannot reach the Kubernetes API at {url}: {exc}",
                          "check the pod's network and the API address") from None
    if resp.status_code != 200:
        hint = ("grant the ServiceAccount `get` on nodes (the DaemonSet's ClusterRole)"
                if resp.status_code in (401, 403) else "check the node name ($NODE_NAME)")
        raise KCloudError(f"the Kubernetes API answered {resp.status_code} for node {node}",
                          hint)
    labels = (resp.json().get("metadata") or {}).get("labels") or {}
    return {k.removeprefix(LABEL_PREFIX): v for k, v in sorted(labels.items())
            if k.startswith(LABEL_PREFIX)}
