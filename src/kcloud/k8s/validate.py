"""Validation of every manifest K-Cloud writes, before it is written.

- Core Kubernetes kinds: `kubernetes-validate` with its offline schemas for Kubernetes
  `K8S_VERSION`, strict (an unknown field is an error).
- Custom resources: their CRD's `openAPIV3Schema` (KubeRay's `RayCluster`) or, for KubeVirt,
  which ships no CRD YAML, its Swagger definitions (`VirtualMachine`, `KubeVirt`), checked with
  `jsonschema`. `x-kubernetes-*` keys are annotations; objects that list their properties
  and do not preserve unknown fields get `additionalProperties: false`, as the API server's
  strict field validation rejects unknown fields.

The schemas are carried in `schemas/` (copies of upstream Apache-2.0 files, extracted by
`build_schemas`; see schemas/README.md for their origin).
"""

from __future__ import annotations

import copy
import functools
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

from kcloud.errors import KCloudError

K8S_VERSION = "1.32.0"  # the Kubernetes version core kinds are validated for
SCHEMA_DIR = Path(__file__).with_name("schemas")

# (apiVersion, kind) -> (carried schema file, JSON pointer of the kind's schema in it or "")
CUSTOM: dict[tuple[str, str], tuple[str, str]] = {
    ("ray.io/v1", "RayCluster"): ("ray.io_rayclusters.v1.json", ""),
    ("kubevirt.io/v1", "VirtualMachine"): ("kubevirt.io.v1.json", "v1.VirtualMachine"),
    ("kubevirt.io/v1", "KubeVirt"): ("kubevirt.io.v1.json", "v1.KubeVirt"),
}
_KUBEVIRT_ROOTS = ("v1.VirtualMachine", "v1.KubeVirt")
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


class ManifestInvalid(KCloudError):
    """A generated manifest that its schema rejects (a K-Cloud bug, reported as such)."""


def _strict(schema: Any) -> Any:
    """A copy of an OpenAPI schema in which listed properties are the only ones allowed."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) if k != "enum" else v for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.cache
def _validator(api_version: str, kind: str) -> jsonschema.protocols.Validator:
    file, pointer = CUSTOM[(api_version, kind)]
    data = json.loads((SCHEMA_DIR / file).read_text())
    if pointer:  # Swagger 2.0 definitions: JSON Schema draft 4 with #/definitions refs
        schema = {"$ref": f"#/definitions/{pointer}", "definitions": _strict(data)}
        return jsonschema.Draft4Validator(schema)
    return jsonschema.Draft7Validator(_strict(data))


def _where(path: Any) -> str:
    return ".".join(str(p) for p in path) or "(top level)"


def validate_manifest(doc: dict[str, Any]) -> None:
    """Raise ManifestInvalid naming the kind, the object and the field, if `doc` is invalid."""
    api, kind = doc.get("apiVersion", ""), doc.get("kind", "")
    name = (doc.get("metadata") or {}).get("name", "")
    what = f"{kind} {name}".strip()
    if not isinstance(name, str) or len(name) > 253 or not _NAME.match(name):
        raise ManifestInvalid(f"generated {what}: metadata.name '{name}' is not a valid name",
                              "this is a K-Cloud bug: please report it")
    if (api, kind) in CUSTOM:
        errors = sorted(_validator(api, kind).iter_errors(doc), key=lambda e: list(e.path))
        if errors:
            e = errors[0]
            raise ManifestInvalid(f"generated {what} fails the {kind} schema at "
                                  f"{_where(e.absolute_path)}: {e.message[:200]}",
                                  "this is a K-Cloud bug: please report it")
        return
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        raise ManifestInvalid(f"generated {what} fails Kubernetes {K8S_VERSION} at "
                              f"{_where(exc.path)}: {exc.message[:200]}",
                              "this is a K-Cloud bug: please report it") from None
    except kubernetes_validate.SchemaNotFoundError:
        raise ManifestInvalid(f"no schema for {api} {kind} in Kubernetes {K8S_VERSION}",
                              "this is a K-Cloud bug: please report it") from None


def validate_file(path: str | Path) -> int:
    """Validate every document of a YAML file; the number of documents."""
    docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d]
    for d in docs:
        validate_manifest(d)
    return len(docs)


# -- the carried schemas -----------------------------------------------------------------------
def _refs(node: Any) -> set[str]:
    if isinstance(node, dict):
        out = {node["$ref"].rsplit("/", 1)[-1]} if isinstance(node.get("$ref"), str) else set()
        for v in node.values():
            out |= _refs(v)
        return out
    if isinstance(node, list):
        return set().union(*(_refs(v) for v in node)) if node else set()
    return set()


def build_schemas(shared: Path, out: Path = SCHEMA_DIR) -> list[Path]:
    """Extract the schemas K-Cloud validates against from the upstream files in `shared`
    (the project's shared/schemas folder): RayCluster v1's openAPIV3Schema from KubeRay's CRD,
    and the closure of KubeVirt's Swagger definitions under VirtualMachine and KubeVirt."""
    crd = yaml.safe_load((shared / "kuberay" / "ray.io_rayclusters.yaml").read_text())
    v1 = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    swagger = json.loads((shared / "kubevirt" / "swagger.json").read_text())
    defs = swagger["definitions"]
    keep: set[str] = set()
    todo = list(_KUBEVIRT_ROOTS)
    while todo:
        name = todo.pop()
        if name in keep:
            continue
        keep.add(name)
        todo.extend(_refs(defs[name]) - keep)
    files = {
        "ray.io_rayclusters.v1.json": v1["schema"]["openAPIV3Schema"],
        "kubevirt.io.v1.json": {k: copy.deepcopy(defs[k]) for k in sorted(keep)},
    }
    written = []
    for name, data in files.items():
        p = out / name
        p.write_text(json.dumps(data, sort_keys=True, separators=(",", ":")) + "\n")
        written.append(p)
    return written


if __name__ == "__main__":  # python -m kcloud.k8s.validate SHARED_SCHEMAS_DIR
    import sys

    for p in build_schemas(Path(sys.argv[1])):
        print(p)
