"""The device catalog: data files, loader, registry, host CPU device and `kcloud devices`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kcloud.errors import CatalogError
from kcloud.hardware import catalog, host
from kcloud.hardware.catalog import (
    BUILTIN_DIR,
    ENV_CATALOG_PATH,
    GIB,
    device_to_dict,
    get_device,
    list_devices,
    load_catalog,
    load_device_file,
    reset_catalog,
)
from kcloud.hardware.device import DeviceKind
from kcloud.precision import FALLBACK, Precision

BUILTIN_IDS = {
    "rebellions-atom", "rebellions-atom-max", "rebellions-rebel-quad", "furiosa-warboy",
    "furiosa-rngd", "sapeon-x220-compact", "sapeon-x220-enterprise", "sapeon-x330",
    "deepx-dx-m1", "samsung-hbm-pim", "samsung-lpddr5-pim", "skhynix-gddr6-aim", "skhynix-aimx",
    "nvm-analog-pim", "nvidia-a100-sxm-80gb", "nvidia-h100-sxm", "nvidia-l40s", "nvidia-l4",
    "nvidia-t4",
}

USER_DEVICE = """\
id: {id}
name: Test NPU
vendor: Example
kind: npu
year: 2027
domestic: true
sources:
  sheet: example datasheet
tflops:
  int8: {{value: 100, source: sheet}}
memory_gb: {{value: {memory}, source: sheet}}
memory_bw_gbps: {{value: 500, source: sheet}}
power_w:
  max: {{value: 75, source: sheet}}
  idle: {{value: 10, source: sheet, estimated: true}}
"""


@pytest.fixture(autouse=True)
def _fresh_catalog(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(ENV_CATALOG_PATH, raising=False)
    reset_catalog()
    yield
    reset_catalog()


def _user_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, files: dict[str, str]) -> Path:
    folder = tmp_path / "user-catalog"
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")
    monkeypatch.setenv(ENV_CATALOG_PATH, str(folder))
    reset_catalog()
    return folder


# -- built-in files --------------------------------------------------------------------------
def test_every_builtin_file_loads() -> None:
    files = sorted(BUILTIN_DIR.glob("*.yaml"))
    ids = {load_device_file(f).id for f in files}
    assert ids == BUILTIN_IDS
    assert set(load_catalog(include_host=False)) == BUILTIN_IDS


@pytest.mark.parametrize("dev_id", sorted(BUILTIN_IDS))
def test_every_device_has_memory_bandwidth_power_and_sources(dev_id: str) -> None:
    dev = get_device(dev_id)
    assert dev.memory_bytes.value > 0
    assert dev.memory_bw.value > 0
    assert 0 < dev.idle_power_w.value <= dev.max_power_w.value
    assert dev.peak_flops
    for name, fig in dev.figures.items():
        assert fig.value > 0, name
        assert fig.source and fig.source not in dev.sources, f"{name}: unresolved source key"
        if fig.estimated:
            assert fig.note, f"{name} is estimated but says nothing about how"
    domestic_vendors = {"Rebellions", "FuriosaAI", "SAPEON", "DEEPX", "Samsung", "SK hynix"}
    if dev.vendor in domestic_vendors:
        assert dev.domestic
    if dev.kind is DeviceKind.GPU:
        assert not dev.domestic
        assert dev.price_per_hour is not None and dev.price_per_hour.estimated


def test_facts_round_trip() -> None:
    rngd = get_device("furiosa-rngd")
    assert rngd.peak(Precision.BF16) == 256e12
    assert rngd.peak(Precision.FP8) == 512e12
    assert rngd.peak(Precision.INT4) == 1024e12
    assert rngd.memory_bw.value == 1.5e12
    assert rngd.memory_bytes.value == 48 * GIB
    assert rngd.max_power_w.value == 180
    assert not rngd.peak_flops[Precision.BF16].estimated
    assert rngd.sram_bytes is not None and rngd.sram_bytes.estimated
    assert "developer.furiosa.ai" in rngd.peak_flops[Precision.BF16].source

    atom = get_device("rebellions-atom")
    assert atom.memory_bw.value == 256e9 and atom.memory_bw.estimated
    assert atom.peak(Precision.FP16) == 32e12 and not atom.peak_flops[Precision.FP16].estimated
    assert atom.sram_bytes is not None and atom.sram_bytes.value == 64 * 2**20

    warboy = get_device("furiosa-warboy")
    assert warboy.memory_bw.value == 66e9
    assert warboy.peak(Precision.INT8) == 64e12
    assert set(warboy.peak_flops) == {Precision.INT8}

    a100 = get_device("nvidia-a100-sxm-80gb")
    assert a100.memory_bw.value == 2039e9
    assert Precision.FP8 not in a100.peak_flops
    assert a100.chip_link_bw is not None and a100.chip_link_bw.value == 300e9  # one direction

    h100 = get_device("nvidia-h100-sxm")
    assert h100.peak(Precision.BF16) == 989e12 and h100.peak(Precision.FP8) == 1979e12
    assert h100.memory_bw.value == 3.35e12

    quad = get_device("rebellions-rebel-quad")
    assert quad.memory_bw.value == 4.8e12 and quad.memory_bytes.value == 144 * GIB

    aim = get_device("skhynix-gddr6-aim")
    assert aim.peak(Precision.BF16) == 1e12 and aim.memory_bw.value == 512e9

    analog = get_device("nvm-analog-pim")
    assert analog.projected
    assert set(analog.estimated_fields) == set(analog.figures)
    assert all(f.estimated for f in analog.figures.values())


@pytest.mark.parametrize(("dev_id", "figure"), [
    ("rebellions-atom", "memory_bw"),
    ("rebellions-atom", "max_power_w"),
    ("rebellions-atom-max", "peak_fp16"),
    ("rebellions-atom-max", "memory_bytes"),
    ("furiosa-rngd", "sram_bytes"),
    ("sapeon-x220-compact", "peak_int8"),
    ("sapeon-x330", "memory_bw"),
    ("skhynix-aimx", "peak_bf16"),
])
def test_figures_marked_est_in_the_facts_are_estimated(dev_id: str, figure: str) -> None:
    assert figure in get_device(dev_id).estimated_fields


# -- registry --------------------------------------------------------------------------------
def test_list_is_sorted_by_kind_then_id() -> None:
    devs = list_devices(include_host=False)
    order = list(DeviceKind)
    keys = [(order.index(d.kind), d.id) for d in devs]
    assert keys == sorted(keys)
    assert devs[0].kind is DeviceKind.NPU


def test_unknown_id_suggests_and_points_to_the_list() -> None:
    with pytest.raises(CatalogError) as err:
        get_device("furiosa-rngdd")
    msg = err.value.message
    assert "unknown device 'furiosa-rngdd'" in msg
    assert "did you mean 'furiosa-rngd'" in msg
    assert "kcloud devices" in msg
    assert "\n" not in msg


def test_partitions_scale_compute_and_memory() -> None:
    rngd = get_device("furiosa-rngd")
    quarter = get_device("furiosa-rngd:4core.24gb")
    assert quarter.id == "furiosa-rngd:4core.24gb"
    assert quarter.peak(Precision.BF16) == pytest.approx(rngd.peak(Precision.BF16) / 2)
    assert quarter.memory_bytes.value == 24 * GIB
    assert quarter.memory_bw.value == pytest.approx(rngd.memory_bw.value / 2)
    one = get_device("furiosa-rngd:1core.6gb")
    assert one.peak(Precision.BF16) == pytest.approx(32e12)
    assert one.memory_bytes.value == 6 * GIB
    assert {p.name: p.count for p in rngd.partitions} == {
        "1core.6gb": 8, "2core.12gb": 4, "4core.24gb": 2}

    die = get_device("rebellions-atom-max:1die.16gb")
    assert die.peak(Precision.FP16) == pytest.approx(32e12)
    assert die.peak_flops[Precision.FP16].estimated  # estimated stays estimated

    mig = get_device("nvidia-a100-sxm-80gb:1g.10gb")
    assert mig.memory_bytes.value == 10 * GIB
    assert mig.peak(Precision.BF16) == pytest.approx(312e12 / 7, rel=1e-4)

    with pytest.raises(CatalogError, match=r"no partition '4core'.*4core\.24gb"):
        get_device("furiosa-rngd:4core")
    with pytest.raises(CatalogError, match="has no partitions"):
        get_device("nvidia-t4:half")


def test_resolve_precision_falls_back() -> None:
    a100 = get_device("nvidia-a100-sxm-80gb")
    first_supported = next(p for p in FALLBACK[Precision.FP8] if p in a100.peak_flops)
    assert a100.resolve_precision(Precision.FP8) == first_supported
    assert a100.resolve_precision(Precision.FP8) != Precision.FP8
    assert get_device("furiosa-warboy").resolve_precision(Precision.FP16) is None
    assert get_device("nvidia-t4").resolve_precision(Precision.BF16) == Precision.FP16
    assert get_device("nvidia-h100-sxm").resolve_precision(Precision.INT4) == Precision.INT8
    assert get_device("rebellions-rebel-quad").resolve_precision(Precision.INT8) == Precision.FP8


def test_a100_runs_fp8_work_at_a_float_precision() -> None:
    a100 = get_device("nvidia-a100-sxm-80gb")
    assert a100.resolve_precision(Precision.FP8) in (Precision.BF16, Precision.FP16)


# -- user files ------------------------------------------------------------------------------
def test_user_file_adds_a_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _user_dir(tmp_path, monkeypatch, {"my-npu.yaml": USER_DEVICE.format(id="my-npu", memory=32)})
    dev = get_device("my-npu")
    assert dev.peak(Precision.INT8) == 100e12
    assert dev.memory_bytes.value == 32 * GIB
    assert dev.memory_bw.value == 500e9
    assert dev.idle_power_w.estimated
    assert dev.memory_bw.source == "example datasheet"
    assert "my-npu" in {d.id for d in list_devices(include_host=False)}
    assert set(load_catalog(include_host=False)) >= BUILTIN_IDS


def test_user_file_overrides_a_builtin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = USER_DEVICE.format(id="furiosa-warboy", memory=64)
    _user_dir(tmp_path, monkeypatch, {"furiosa-warboy.yaml": text})
    assert get_device("furiosa-warboy").memory_bytes.value == 64 * GIB


GOOD = USER_DEVICE.format(id="bad", memory=16)


@pytest.mark.parametrize(("text", "field", "reason"), [
    (GOOD.replace("value: 500", "value: -5"), "memory_bw_gbps.value", "must be > 0"),
    (GOOD.replace("kind: npu", "kind: tpu"), "kind", "unknown kind 'tpu'"),
    (GOOD + "colour: blue\n", "colour", "unknown field"),
    (GOOD.replace("int8:", "fp64:"), "tflops.fp64", "unknown precision 'fp64'"),
    (GOOD.replace("memory_bw_gbps: {value: 500, source: sheet}\n", ""), "memory_bw_gbps",
     "required field is missing"),
    (GOOD.replace("int8: {value: 100, source: sheet}", "int8: {value: 100, source: shet}"),
     "tflops.int8.source", "unknown source key 'shet'"),
    (GOOD.replace("id: bad", "id: other"), "id", "does not match the file name"),
    (GOOD.replace("idle: {value: 10", "idle: {value: 100"), "power_w.idle.value",
     "idle power is above max power"),
    (GOOD + "partitions:\n  - {name: half, count: 2, memory_gb: 12, source: sheet}\n",
     "partitions.0.memory_gb", "more than the device's"),
    (GOOD.replace("domestic: true", "domestic: maybe"), "domestic", ""),
])
def test_malformed_file_names_file_and_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, field: str, reason: str
) -> None:
    _user_dir(tmp_path, monkeypatch, {"bad.yaml": text})
    with pytest.raises(CatalogError) as err:
        load_catalog(include_host=False)
    msg = err.value.message
    assert "bad.yaml" in msg
    assert f"field {field}:" in msg
    assert reason in msg
    assert "fix the file or remove it" in msg
    assert "\n" not in msg


def test_yaml_syntax_error_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _user_dir(tmp_path, monkeypatch, {"broken.yaml": "id: broken\nname: [unclosed\n"})
    with pytest.raises(CatalogError, match=r"broken\.yaml: not valid YAML") as err:
        load_catalog(include_host=False)
    assert "\n" not in err.value.message


def test_missing_catalog_path_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_CATALOG_PATH, str(tmp_path / "nowhere"))
    with pytest.raises(CatalogError, match=ENV_CATALOG_PATH):
        load_catalog(include_host=False)


# -- host CPU --------------------------------------------------------------------------------
def test_host_benchmark_is_cached_and_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KCLOUD_CACHE_DIR", str(tmp_path / "cache"))
    host.reset_host_cache()
    first = host.measure_host()
    files = list((tmp_path / "cache").glob("host-*.json"))
    assert files == [host.cache_file()]
    data = json.loads(files[0].read_text())
    assert data["fp32_flops"] == first.fp32_flops and data["cores"] == host.host_cores()
    assert first.seconds < 3.0  # budgeted to about 1.2 s; slack for a busy machine
    assert first.fp32_flops > 1e8 and first.memory_bw > 1e8

    def must_not_run() -> host.HostMeasurement:
        raise AssertionError("the cached measurement should have been used")

    monkeypatch.setattr(host, "_run_benchmark", must_not_run)
    host.reset_host_cache()  # forget the in-memory copy: read the file
    assert host.measure_host() == first

    calls: list[int] = []

    def fake() -> host.HostMeasurement:
        calls.append(1)
        return host.HostMeasurement(first.cpu_model, first.cores, first.torch_version,
                                    first.date, 1.0e9, 2.0e9)

    monkeypatch.setattr(host, "_run_benchmark", fake)
    forced = host.measure_host(force=True)
    assert calls == [1] and forced.fp32_flops == 1.0e9
    assert json.loads(files[0].read_text())["fp32_flops"] == 1.0e9


def test_host_device_and_its_cores() -> None:
    dev = get_device("host-cpu")
    assert dev.kind is DeviceKind.CPU and not dev.domestic
    fp32 = dev.peak_flops[Precision.FP32]
    assert not fp32.estimated
    assert fp32.source.startswith("measured on this host by kcloud micro-benchmark")
    assert dev.memory_bytes.value > 0 and dev.memory_bw.value > 0
    assert dev.max_power_w.estimated and dev.idle_power_w.estimated
    cores = host.host_cores()
    core = get_device("host-cpu:1core")
    assert core.peak(Precision.FP32) == pytest.approx(dev.peak(Precision.FP32) / cores)
    assert core.memory_bytes.value == pytest.approx(dev.memory_bytes.value / cores)
    assert host.host_core_device(1).id == "host-cpu:1core"
    with pytest.raises(CatalogError):
        host.host_core_device(cores + 1)
    assert "host-cpu" in load_catalog()


# -- CLI -------------------------------------------------------------------------------------
def _runner_app():
    from typer.testing import CliRunner

    import kcloud.cli.devices  # noqa: F401  (registers `devices` on the app)
    from kcloud.cli import app

    return CliRunner(), app


def test_cli_devices_json_is_one_object() -> None:
    runner, app = _runner_app()
    result = runner.invoke(app, ["devices", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    ids = [d["id"] for d in data["devices"]]
    assert set(ids) >= BUILTIN_IDS and "host-cpu" in ids
    rngd = next(d for d in data["devices"] if d["id"] == "furiosa-rngd")
    bf16 = rngd["figures"]["peak_bf16"]
    assert bf16["value"] == 256e12 and bf16["unit"] == "FLOP/s"
    assert bf16["estimated"] is False and bf16["source"]
    atom = next(d for d in data["devices"] if d["id"] == "rebellions-atom")
    assert atom["figures"]["memory_bw"]["estimated"] is True


def test_cli_devices_table_and_show() -> None:
    runner, app = _runner_app()
    table = runner.invoke(app, ["devices"])
    assert table.exit_code == 0, table.output
    assert "furiosa-rngd" in table.stdout and "estimated: no primary source" in table.stdout
    shown = runner.invoke(app, ["devices", "show", "furiosa-rngd:2core.12gb", "--json"])
    assert shown.exit_code == 0, shown.output
    obj = json.loads(shown.stdout)
    assert obj["id"] == "furiosa-rngd:2core.12gb"
    assert obj["figures"]["memory_bytes"]["value"] == 12 * GIB
    text = runner.invoke(app, ["devices", "show", "nvm-analog-pim"])
    assert text.exit_code == 0 and "PROJECTED" in text.stdout


def test_cli_unknown_device_is_one_line_exit_2(tmp_path: Path) -> None:
    script = textwrap.dedent("""
        import importlib, sys
        import kcloud.cli as cli
        cli._register = lambda: importlib.import_module("kcloud.cli.devices")
        cli.main(sys.argv[1:])
    """)
    env = {**os.environ, "KCLOUD_CACHE_DIR": str(tmp_path)}
    env.pop(ENV_CATALOG_PATH, None)
    proc = subprocess.run([sys.executable, "-c", script, "devices", "show", "nosuch"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("kcloud: error: unknown device 'nosuch'")
    assert "kcloud devices" in lines[0]
    assert "Traceback" not in proc.stderr


def test_device_to_dict_is_json_ready() -> None:
    for dev in list_devices(include_host=False):
        obj = json.loads(json.dumps(device_to_dict(dev)))
        assert obj["id"] == dev.id
        for fig in obj["figures"].values():
            assert set(fig) == {"value", "unit", "source", "estimated", "note"}
    assert catalog.figure_unit("peak_int8") == "OP/s"
    assert catalog.figure_unit("memory_bw") == "B/s"
