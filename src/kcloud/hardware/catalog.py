"""The device catalog: one YAML data file per device, validated and turned into `Device` values.

Built-in files live in the `catalog/` folder next to this module. More folders (or single
files) can be added with the environment variable `KCLOUD_CATALOG_PATH` (entries separated by
`os.pathsep`): adding a device is adding a data file, and a user file with the same id as a
built-in one replaces it (among user entries, the first one listed wins, as with `PATH`).

Files use engineering units; the loader converts them to the SI base units of `Device`:

| file key | meaning | converted to |
|---|---|---|
| `tflops.<precision>` | dense peak, TFLOPS (TOPS for int8/int4) | FLOP/s (x 1e12) |
| `sram_mb` | on-chip SRAM, MB (binary, JEDEC) | bytes (x 2^20) |
| `memory_gb` | device memory, GB (binary, JEDEC) | bytes (x 2^30) |
| `memory_bw_gbps` | memory bandwidth, GB/s | bytes/s (x 1e9) |
| `host_link_gbps`, `chip_link_gbps` | link bandwidth, GB/s, one direction | bytes/s (x 1e9) |
| `power_w.max`, `power_w.idle` | board power, W | W |
| `price_usd_per_hour` | USD per device-hour | USD/h |
| `pci.vendor`, `pci.device` | PCI vendor and device ids, 4 hex digits | lower-case text |
| `k8s.resource` | Kubernetes extended-resource name (`furiosa.ai/rngd`) | text |

Memory capacities follow the DRAM vendors' (JEDEC) convention that 1 GB = 2^30 bytes, so an
"80 GB" GPU holds 80 GiB; bandwidths and link rates are decimal (1 GB/s = 1e9 B/s).

Every figure is `{value, source, estimated, note}`. `source` is either a key of the file's
`sources:` map (resolved to the full citation) or a citation written out.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
)

from kcloud import inputs
from kcloud.errors import CatalogError, KCloudError
from kcloud.hardware.device import (
    DEFAULT_PARTITION_RESOURCE,
    Device,
    DeviceKind,
    Figure,
    Partition,
    PciId,
)
from kcloud.hardware.host import HOST_ID
from kcloud.precision import Precision

ENV_CATALOG_PATH = "KCLOUD_CATALOG_PATH"
BUILTIN_DIR = Path(__file__).with_name("catalog")

TERA = 1e12
GIGA = 1e9
GIB = float(2**30)
MIB = float(2**20)

_HINT_FILE = "fix the file or remove it"
_HINT_LIST = "run `kcloud devices` to list them"
_SOURCE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_KIND_ORDER = {kind: i for i, kind in enumerate(DeviceKind)}

# Units of each figure as `Device.figures` names them (values are in SI base units).
FIGURE_UNITS: dict[str, str] = {
    "memory_bytes": "B",
    "sram_bytes": "B",
    "memory_bw": "B/s",
    "host_link_bw": "B/s",
    "chip_link_bw": "B/s",
    "max_power_w": "W",
    "idle_power_w": "W",
    "price_per_hour": "USD/h",
}


def figure_unit(name: str) -> str:
    """The SI unit of the figure called `name` in `Device.figures` (e.g. 'peak_int8' -> 'OP/s')."""
    if name.startswith("peak_"):
        return "OP/s" if name.removeprefix("peak_").startswith("int") else "FLOP/s"
    return FIGURE_UNITS.get(name, "")


# -- file schema (pydantic, only at the edge) --------------------------------------------------
def _number(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("must be a number, not true/false")
    return value  # numbers, and numeric text such as 1e3 (which YAML reads as a string)


_Positive = Annotated[float, BeforeValidator(_number), Field(gt=0, allow_inf_nan=False)]
_Text = Annotated[str, Field(min_length=1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _FigureIn(_Strict):
    value: _Positive
    source: _Text
    estimated: StrictBool = False
    note: str = ""


class _PowerIn(_Strict):
    max: _FigureIn
    idle: _FigureIn


class _PartitionIn(_Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
    count: Annotated[StrictInt, Field(ge=1)]
    compute_fraction: Annotated[float, Field(gt=0, le=1)] | None = None
    memory_gb: _Positive
    source: str = ""


_Hex4 = Annotated[str, Field(pattern=r"^[0-9a-fA-F]{4}$")]
# A Kubernetes extended-resource name: a DNS subdomain prefix, '/', a name of at most 63
# characters (Kubernetes' IsQualifiedName).
_RESOURCE = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"


class _PciIn(_Strict):
    vendor: _Hex4
    device: _Hex4
    source: _Text
    estimated: StrictBool = False
    note: str = ""


class _K8sIn(_Strict):
    resource: Annotated[str, Field(pattern=_RESOURCE)]
    partition_resource: Annotated[str, Field(min_length=1)] = DEFAULT_PARTITION_RESOURCE


class _DeviceIn(_Strict):
    id: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")]
    name: _Text
    vendor: _Text
    kind: DeviceKind
    year: Annotated[StrictInt, Field(ge=1990, le=2100)]
    domestic: StrictBool
    pci: _PciIn | None = None
    k8s: _K8sIn | None = None
    projected: StrictBool = False
    sources: dict[str, _Text] = Field(default_factory=dict)
    tflops: Annotated[dict[Precision, _FigureIn], Field(min_length=1)]
    sram_mb: _FigureIn | None = None
    memory_gb: _FigureIn
    memory_bw_gbps: _FigureIn
    host_link_gbps: _FigureIn | None = None
    chip_link_gbps: _FigureIn | None = None
    power_w: _PowerIn
    price_usd_per_hour: _FigureIn | None = None
    partitions: list[_PartitionIn] = Field(default_factory=list)
    notes: str = ""


class _FieldProblem(Exception):
    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def _file_error(path: Path, field: str | None, reason: str) -> CatalogError:
    where = f"catalog file {path}" + (f": field {field}" if field else "")
    return CatalogError(_one_line(f"{where}: {reason}"), _HINT_FILE)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _describe(err: Any) -> tuple[str, str]:
    """(field path, reason) for one pydantic error, in the file's own terms."""
    loc = [str(part) for part in err["loc"]]
    kind = err["type"]
    ctx = err.get("ctx") or {}
    if loc and loc[-1] == "[key]":
        loc = loc[:-1]
        if loc and loc[0] == "tflops":
            names = ", ".join(p.value for p in Precision)
            return ".".join(loc), f"unknown precision '{loc[-1]}' (use one of: {names})"
        return ".".join(loc), "bad key"
    field = ".".join(loc) or "(top level)"
    if kind == "value_error" and ctx.get("error") is not None:
        return field, str(ctx["error"])
    if kind == "extra_forbidden":
        return field, "unknown field"
    if kind == "model_type":
        if field == "power_w":
            return field, "must be a mapping with max and idle figures"
        if loc[0] == "partitions":
            return field, "must be a mapping of name, count, memory_gb and source"
        return field, "must be a figure: {value: <number>, source: <key or citation>}"
    if kind == "dict_type":
        return field, "must be a mapping"
    if kind == "list_type":
        return field, "must be a list"
    if kind == "missing":
        return field, "required field is missing"
    if kind == "greater_than":
        return field, f"must be > {ctx.get('gt')}"
    if kind == "greater_than_equal":
        return field, f"must be >= {ctx.get('ge')}"
    if kind == "less_than_equal":
        return field, f"must be <= {ctx.get('le')}"
    if kind == "string_pattern_mismatch":
        return field, f"'{err.get('input')}' has characters that are not allowed here"
    if kind == "enum" and loc == ["kind"]:
        kinds = ", ".join(k.value for k in DeviceKind)
        return field, f"unknown kind '{err.get('input')}' (use one of: {kinds})"
    msg = str(err.get("msg", "invalid value"))
    return field, msg[:1].lower() + msg[1:]


# -- conversion --------------------------------------------------------------------------------
def _check(raw: _DeviceIn, path: Path) -> None:
    """Checks that span fields; raises _FieldProblem."""
    if raw.id != path.stem:
        raise _FieldProblem("id", f"'{raw.id}' does not match the file name '{path.name}'")
    if raw.power_w.idle.value > raw.power_w.max.value:
        raise _FieldProblem("power_w.idle.value", "idle power is above max power")
    names: set[str] = set()
    memory = raw.memory_gb.value
    for i, p in enumerate(raw.partitions):
        if p.name in names:
            raise _FieldProblem(f"partitions.{i}.name", f"duplicate partition '{p.name}'")
        names.add(p.name)
        share = p.compute_fraction if p.compute_fraction is not None else 1.0 / p.count
        if share * p.count > 1.0 + 1e-3:
            raise _FieldProblem(f"partitions.{i}.count",
                                f"{p.count} x {share:g} of the compute is more than one device")
        if p.memory_gb * p.count > memory * (1.0 + 1e-6):
            raise _FieldProblem(f"partitions.{i}.memory_gb",
                                f"{p.count} x {p.memory_gb:g} GB is more than the device's "
                                f"{memory:g} GB")
    if raw.k8s is not None:
        for p in raw.partitions or [None]:
            try:
                name = raw.k8s.partition_resource.format_map(
                    {"resource": raw.k8s.resource, "partition": p.name if p else "x"})
            except (KeyError, ValueError, IndexError):
                raise _FieldProblem("k8s.partition_resource",
                                    "only {resource} and {partition} may be filled in") from None
            if not re.match(_RESOURCE, name):
                raise _FieldProblem("k8s.partition_resource",
                                    f"'{name}' is not a Kubernetes resource name")
    if raw.projected:
        for field, fig in _figures_in(raw):
            if not fig.estimated:
                raise _FieldProblem(f"{field}.estimated",
                                    "a projected device's figures are estimates: set it to true")


def _figures_in(raw: _DeviceIn) -> Iterable[tuple[str, _FigureIn]]:
    for p, fig in raw.tflops.items():
        yield f"tflops.{p.value}", fig
    for field in ("sram_mb", "memory_gb", "memory_bw_gbps", "host_link_gbps", "chip_link_gbps",
                  "price_usd_per_hour"):
        fig = getattr(raw, field)
        if fig is not None:
            yield field, fig
    yield "power_w.max", raw.power_w.max
    yield "power_w.idle", raw.power_w.idle


def _resolve_source(text: str, sources: dict[str, str], field: str) -> str:
    if text in sources:
        return sources[text]
    if _SOURCE_KEY.match(text):
        keys = ", ".join(sources) or "none"
        raise _FieldProblem(field, f"unknown source key '{text}' (keys in sources: {keys}); "
                                   "add it to sources or write the citation out")
    return text


def _to_device(raw: _DeviceIn) -> Device:
    def fig(f: _FigureIn | None, scale: float, field: str) -> Figure | None:
        if f is None:
            return None
        source = _resolve_source(f.source, raw.sources, f"{field}.source")
        return Figure(f.value * scale, source, f.estimated or raw.projected, _one_line(f.note))

    def req(f: _FigureIn, scale: float, field: str) -> Figure:
        out = fig(f, scale, field)
        assert out is not None
        return out

    partitions = []
    for i, p in enumerate(raw.partitions):
        source = _resolve_source(p.source, raw.sources, f"partitions.{i}.source") if p.source \
            else ""
        share = p.compute_fraction if p.compute_fraction is not None else 1.0 / p.count
        partitions.append(Partition(p.name, p.count, share, p.memory_gb * GIB, source))

    pci = None
    if raw.pci is not None:
        pci = PciId(raw.pci.vendor.lower(), raw.pci.device.lower(),
                    _resolve_source(raw.pci.source, raw.sources, "pci.source"),
                    raw.pci.estimated or raw.projected, _one_line(raw.pci.note))
    return Device(
        id=raw.id,
        name=raw.name,
        vendor=raw.vendor,
        kind=raw.kind,
        year=raw.year,
        domestic=raw.domestic,
        peak_flops={p: req(f, TERA, f"tflops.{p.value}") for p, f in raw.tflops.items()},
        memory_bytes=req(raw.memory_gb, GIB, "memory_gb"),
        memory_bw=req(raw.memory_bw_gbps, GIGA, "memory_bw_gbps"),
        max_power_w=req(raw.power_w.max, 1.0, "power_w.max"),
        idle_power_w=req(raw.power_w.idle, 1.0, "power_w.idle"),
        sram_bytes=fig(raw.sram_mb, MIB, "sram_mb"),
        host_link_bw=fig(raw.host_link_gbps, GIGA, "host_link_gbps"),
        chip_link_bw=fig(raw.chip_link_gbps, GIGA, "chip_link_gbps"),
        price_per_hour=fig(raw.price_usd_per_hour, 1.0, "price_usd_per_hour"),
        partitions=tuple(partitions),
        projected=raw.projected,
        notes=_one_line(raw.notes),
        sources=dict(raw.sources),
        pci=pci,
        k8s_resource=raw.k8s.resource if raw.k8s else f"kcloud.io/{raw.id}",
        k8s_partition_resource=(raw.k8s.partition_resource if raw.k8s
                                else DEFAULT_PARTITION_RESOURCE),
    )


def load_device_file(path: str | os.PathLike[str]) -> Device:
    """Read, validate and convert one catalog file; raises CatalogError naming file and field."""
    path = Path(path)
    try:
        text = inputs.read_text(path, "catalog file", _HINT_FILE)
    except KCloudError as exc:
        raise CatalogError(exc.problem, exc.hint) from None
    try:
        data = inputs.yaml_data(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "syntax error"
        raise _file_error(path, None, f"not valid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise _file_error(path, None, "must hold a mapping of fields (id, name, kind, ...)")
    try:
        raw = _DeviceIn.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        field, reason = _describe(errors[0])
        if len(errors) > 1:
            reason += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
        raise _file_error(path, field, reason) from None
    try:
        _check(raw, path)
        return _to_device(raw)
    except _FieldProblem as exc:
        raise _file_error(path, exc.field, exc.reason) from None


def _files_in(entry: Path) -> list[Path]:
    if entry.is_file():
        return [entry]
    return sorted([*entry.glob("*.yaml"), *entry.glob("*.yml")])


def _load_dir(entry: Path) -> dict[str, Device]:
    out: dict[str, Device] = {}
    for path in _files_in(entry):
        dev = load_device_file(path)
        if dev.id in out:
            raise _file_error(path, "id", f"device '{dev.id}' is defined twice in {entry}")
        out[dev.id] = dev
    return out


def catalog_path() -> list[Path]:
    """The user catalog entries from KCLOUD_CATALOG_PATH, in order of precedence."""
    raw = os.environ.get(ENV_CATALOG_PATH, "")
    entries = [Path(p).expanduser() for p in raw.split(os.pathsep) if p.strip()]
    for entry in entries:
        if not entry.exists():
            raise CatalogError(f"{ENV_CATALOG_PATH} entry '{entry}' does not exist",
                               f"fix {ENV_CATALOG_PATH} (folders of <id>.yaml files, "
                               f"separated by '{os.pathsep}')")
    return entries


_CACHE: dict[tuple[str, bool], dict[str, Device]] = {}


def load_catalog(*, include_host: bool = True) -> dict[str, Device]:
    """Every device by id: built-in files, the host CPU (`host-cpu`), then user files.

    Cached per value of KCLOUD_CATALOG_PATH; `reset_catalog()` drops the cache. The host CPU is
    measured by a short micro-benchmark on first use (then cached on disk); pass
    `include_host=False` to leave it out.
    """
    key = (os.environ.get(ENV_CATALOG_PATH, ""), include_host)
    cached = _CACHE.get(key)
    if cached is not None:
        return dict(cached)
    devices = _load_dir(BUILTIN_DIR)
    if include_host:
        from kcloud.hardware.host import host_device

        devices[HOST_ID] = host_device()
    user: dict[str, Device] = {}
    for entry in catalog_path():
        for dev_id, dev in _load_dir(entry).items():
            user.setdefault(dev_id, dev)  # the first entry listed wins
    devices.update(user)
    _CACHE[key] = devices
    return dict(devices)


def reset_catalog() -> None:
    """Forget the loaded catalog (and the host measurement held in memory)."""
    _CACHE.clear()
    from kcloud.hardware import host

    host.reset_host_cache()


def list_devices(*, include_host: bool = True) -> list[Device]:
    """Every device, sorted by kind (npu, pim, gpu, cpu) then id."""
    devices = load_catalog(include_host=include_host).values()
    return sorted(devices, key=lambda d: (_KIND_ORDER[d.kind], d.id))


def _suggest(query: str, names: Iterable[str]) -> str | None:
    names = sorted(set(names))
    q = query.lower()
    # A name that holds the query (at least 4 characters: "rngd"), else a close spelling.
    contains = [n for n in names if len(q) >= 4 and q in n]
    if len(contains) >= 1:
        return min(contains, key=len)
    close = difflib.get_close_matches(q, names, n=1, cutoff=0.75)
    return close[0] if close else None


def get_device(spec: str) -> Device:
    """One device by id, or one partition of it as "id:partition" (e.g. "furiosa-rngd:4core.24gb").

    `host-cpu:<n>core` gives n cores' share of the host CPU. Unknown ids and partitions raise
    CatalogError with a suggestion.
    """
    spec = spec.strip()
    dev_id, colon, part = spec.partition(":")
    devices = load_catalog(include_host=False)
    dev = devices.get(dev_id)
    if dev is None and dev_id == HOST_ID:
        dev = load_catalog(include_host=True)[HOST_ID]
    if dev is None:
        guess = _suggest(dev_id, [*devices, HOST_ID])
        hint = (f"did you mean '{guess}'? " if guess else "") + _HINT_LIST
        raise CatalogError(f"unknown device '{dev_id}'", hint)
    if not colon:
        return dev
    if not part:
        names = ", ".join(p.name for p in dev.partitions) or "none"
        raise CatalogError(f"empty partition name in '{spec}'",
                           f"write '{dev_id}' alone or '{dev_id}:PARTITION' (its partitions: "
                           f"{names})")
    try:
        return dev.partition(part)
    except KeyError:
        pass
    cores = re.fullmatch(r"(\d+)core", part)
    if dev_id == HOST_ID and cores and dev.kind is DeviceKind.CPU:
        from kcloud.hardware.host import host_core_device

        return host_core_device(int(cores.group(1)))
    names = [p.name for p in dev.partitions]
    if not names:
        raise CatalogError(f"device '{dev_id}' has no partitions", f"use '{dev_id}' alone")
    guess = _suggest(part, names)
    hint = (f"did you mean '{dev_id}:{guess}'? " if guess else "") + \
        f"its partitions: {', '.join(names)}"
    raise CatalogError(f"device '{dev_id}' has no partition '{part}'", hint)


# -- plain data (JSON) -------------------------------------------------------------------------
def figure_to_dict(name: str, fig: Figure, projected: bool = False) -> dict[str, Any]:
    return {
        "value": fig.value,
        "unit": figure_unit(name),
        "source": fig.source,
        "estimated": bool(fig.estimated or projected),
        "note": fig.note,
    }


def device_to_dict(dev: Device) -> dict[str, Any]:
    """A device as plain JSON-ready data: every figure as {value, unit, source, estimated, note}."""
    return {
        "id": dev.id,
        "name": dev.name,
        "vendor": dev.vendor,
        "kind": dev.kind.value,
        "year": dev.year,
        "domestic": dev.domestic,
        "projected": dev.projected,
        "figures": {k: figure_to_dict(k, f, dev.projected) for k, f in dev.figures.items()},
        "estimated_fields": dev.estimated_fields,
        "partitions": [
            {
                "name": p.name,
                "count": p.count,
                "compute_fraction": p.compute_fraction,
                "memory_bytes": p.memory_bytes,
                "source": p.source,
            }
            for p in dev.partitions
        ],
        "pci": None if dev.pci is None else {
            "vendor": dev.pci.vendor, "device": dev.pci.device, "source": dev.pci.source,
            "estimated": dev.pci.estimated, "note": dev.pci.note},
        "k8s_resource": dev.k8s_resource,
        "notes": dev.notes,
        "sources": dict(dev.sources),
    }


def best_peak(dev: Device) -> tuple[Precision, Figure]:
    """The highest peak rate the device offers and its precision (ties: the wider precision)."""
    order = list(Precision)
    return max(dev.peak_flops.items(), key=lambda kv: (kv[1].value, -order.index(kv[0])))


__all__ = [
    "BUILTIN_DIR",
    "ENV_CATALOG_PATH",
    "FIGURE_UNITS",
    "HOST_ID",
    "best_peak",
    "catalog_path",
    "device_to_dict",
    "figure_to_dict",
    "figure_unit",
    "get_device",
    "list_devices",
    "load_catalog",
    "load_device_file",
    "reset_catalog",
]
