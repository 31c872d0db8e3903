"""Clusters: built-ins, YAML files, one-line errors, `kcloud clusters`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kcloud.errors import KCloudError
from kcloud.hardware.cluster import builtin_names, cluster_from_dict, load_cluster


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kcloud.cli", *args], capture_output=True,
                          text=True, timeout=300)


def test_builtins_load_with_their_device_counts():
    rack = load_cluster("k-cloud-rack")
    assert rack.counts == {"rebellions-atom": 16, "furiosa-rngd": 16, "furiosa-warboy": 8,
                           "skhynix-aimx": 8, "nvidia-a100-sxm-80gb": 8}
    assert rack.size == 56 and len(rack.nodes) == 7
    assert len({s.id for s in rack.slots}) == 56
    dgx = load_cluster("gpu-dgx")
    assert dgx.counts == {"nvidia-h100-sxm": 8}
    # H100s in one DGX talk over NVLink, nodes over the network
    a, b = dgx.slots[0].id, dgx.slots[1].id
    assert dgx.link_between(a, b).bandwidth > dgx.network.bandwidth
    assert set(builtin_names()) == {"local-cpu", "k-cloud-rack", "k-cloud-rack-2028", "gpu-dgx"}


def test_local_cpu_has_one_device_per_core():
    import os

    c = load_cluster("local-cpu")
    assert c.size == (os.cpu_count() or 1)
    dev = next(iter(c.device_types.values()))
    assert dev.kind.value == "cpu"


def test_yaml_cluster_round_trip(tmp_path: Path):
    f = tmp_path / "mine.yaml"
    f.write_text(
        "name: mine\n"
        "network: {bandwidth_gbps: 10, latency_us: 12}\n"
        "nodes:\n"
        "  - name: npu\n"
        "    count: 3\n"
        "    devices: {furiosa-rngd: 4, rebellions-atom: 2}\n"
        "    link: {bandwidth_gbps: 32, latency_us: 2}\n"
    )
    c = load_cluster(str(f))
    assert c.source == str(f)
    assert [n.name for n in c.nodes] == ["npu-0", "npu-1", "npu-2"]
    assert c.counts == {"furiosa-rngd": 12, "rebellions-atom": 6}
    assert c.network.bandwidth == pytest.approx(10e9)
    assert c.nodes[0].link.latency == pytest.approx(2e-6)
    assert c.to_dict()["size"] == 18


@pytest.mark.parametrize(("text", "pattern"), [
    ("name: x\nnodes:\n  - name: n\n    devices: {no-such-chip: 2}\n",
     r"field nodes\.0\.devices: unknown device 'no-such-chip'"),
    ("name: x\nnodes:\n  - name: n\n    devices: {furiosa-rngd: 2}\n    colour: red\n",
     r"field nodes\.0\.colour: Extra inputs are not permitted"),
    ("name: x\nnodes:\n  - name: n\n    devices: {furiosa-rngd: 0}\n",
     r"field nodes\.0\.devices\.furiosa-rngd: count must be >= 1"),
    ("name: x\nnetwork: {bandwidth_gbps: -1}\nnodes:\n  - name: n\n"
     "    devices: {furiosa-rngd: 1}\n",
     r"field network\.bandwidth_gbps: Input should be greater than 0"),
    ("name: x\nnodes: [\n", r"not valid YAML at line \d+"),
    ("name: x\nnodes:\n  - {name: n, devices: {furiosa-rngd: 1}}\n  - {name: n, devices: "
     "{furiosa-rngd: 1}}\n", r"node name 'n' is used twice"),
])
def test_bad_cluster_files_fail_with_one_line_naming_file_field_reason(tmp_path: Path, text: str,
                                                                        pattern: str):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(KCloudError, match=pattern) as info:
        load_cluster(str(f))
    msg = info.value.message
    assert str(f) in msg and "\n" not in msg


def test_unknown_cluster_name_lists_the_builtins():
    with pytest.raises(KCloudError, match=r"unknown cluster 'nope'.*k-cloud-rack"):
        load_cluster("nope")
    with pytest.raises(KCloudError, match="no cluster file"):
        load_cluster("missing.yaml")


def test_cluster_from_dict_names_its_source():
    with pytest.raises(KCloudError, match=r"cluster inline: field nodes: "):
        cluster_from_dict({"name": "x", "nodes": []}, "inline")


def test_cli_clusters_json_lists_builtins_with_counts():
    r = run_cli("clusters", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    by = {c["name"]: c for c in doc["clusters"]}
    assert by["k-cloud-rack"]["devices"]["furiosa-rngd"] == 16
    assert by["k-cloud-rack"]["domestic_share"] == pytest.approx(48 / 56)
    r = run_cli("clusters", "show", "gpu-dgx", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["size"] == 8 and doc["nodes"][0]["devices"] == {"nvidia-h100-sxm": 8}


def test_cli_clusters_show_bad_file_is_one_line_exit_2(tmp_path: Path):
    f = tmp_path / "bad.yaml"
    f.write_text("name: x\nnodes: [\n")
    r = run_cli("clusters", "show", str(f))
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    r = run_cli("clusters", "show", "k-cloud-rack")
    assert r.returncode == 0 and "atom-0" in r.stdout
