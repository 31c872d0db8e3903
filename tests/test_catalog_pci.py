"""The catalog's PCI ids and Kubernetes resource names: every device has them, with a source;
partitions name their own resources; malformed blocks name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from kcloud.errors import CatalogError
from kcloud.hardware.catalog import (
    ENV_CATALOG_PATH,
    get_device,
    list_devices,
    load_catalog,
    reset_catalog,
)
from tests.test_catalog import USER_DEVICE
from tests.test_catalog import _fresh_catalog as _fresh_catalog  # the same fresh catalog per test


def test_every_builtin_device_has_pci_ids_and_a_resource() -> None:
    for dev in list_devices(include_host=False):
        assert dev.pci is not None, dev.id
        assert len(dev.pci.vendor) == 4 and len(dev.pci.device) == 4
        assert dev.pci.source, dev.id
        assert "/" in dev.k8s_resource, dev.id
        if dev.projected:
            assert dev.pci.estimated


def test_published_ids_are_not_estimated_and_placeholders_are() -> None:
    assert get_device("nvidia-h100-sxm").pci.selector == "10de:2330"
    assert not get_device("nvidia-h100-sxm").pci.estimated
    assert get_device("furiosa-warboy").pci.selector == "1ed2:0000"
    assert get_device("rebellions-atom").pci.estimated
    assert get_device("furiosa-rngd").pci.estimated


def test_partitions_have_their_own_resource_names() -> None:
    rngd = get_device("furiosa-rngd")
    assert rngd.k8s_resource == "furiosa.ai/rngd"
    assert get_device("furiosa-rngd:2core.12gb").k8s_resource == "furiosa.ai/rngd-2core.12gb"
    assert get_device("nvidia-a100-sxm-80gb:1g.10gb").k8s_resource == "nvidia.com/mig-1g.10gb"
    assert get_device("furiosa-rngd:2core.12gb").pci == rngd.pci


def test_a_user_file_without_k8s_gets_a_kcloud_resource(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "cat"
    folder.mkdir()
    (folder / "my-npu.yaml").write_text(USER_DEVICE.format(id="my-npu", memory=32))
    monkeypatch.setenv(ENV_CATALOG_PATH, str(folder))
    reset_catalog()
    dev = get_device("my-npu")
    assert dev.pci is None and dev.k8s_resource == "kcloud.io/my-npu"


GOOD = USER_DEVICE.format(id="bad", memory=16)


@pytest.mark.parametrize(("extra", "field"), [
    ('pci: {vendor: "1ed", device: "0001", source: sheet}\n', "pci.vendor"),
    ('pci: {vendor: "1ed2", device: "0001"}\n', "pci.source"),
    ("k8s: {resource: rngd}\n", "k8s.resource"),
    ('k8s: {resource: x.io/npu, partition_resource: "{resource}-{bad}"}\n',
     "k8s.partition_resource"),
])
def test_malformed_pci_and_k8s_blocks_name_the_field(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     extra: str, field: str) -> None:
    folder = tmp_path / "cat"
    folder.mkdir()
    (folder / "bad.yaml").write_text(GOOD + extra)
    monkeypatch.setenv(ENV_CATALOG_PATH, str(folder))
    reset_catalog()
    with pytest.raises(CatalogError) as err:
        load_catalog(include_host=False)
    assert f"field {field}" in err.value.message
