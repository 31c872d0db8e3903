"""K-Cloud on Kubernetes and VMs: the kubelet device plug-in for a node's accelerators and
their partitions (`plugin`, `inventory`), and KubeRay / Kubernetes / KubeVirt / libvirt specs
from a plan, each validated before it is written (`manifests`, `vm`, `validate`).

Depends on `kcloud.planner` and `kcloud.hardware` only.
"""
