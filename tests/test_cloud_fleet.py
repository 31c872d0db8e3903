"""The fleet's partition trees and the placer: best-fit with node locality, all or nothing."""

from __future__ import annotations

from kcloud.cloud.fleet import Fleet, Group, partition_tree
from kcloud.hardware.catalog import get_device
from kcloud.hardware.cluster import cluster_from_dict


def fleet(nodes: list[dict]) -> Fleet:
    return Fleet([(cluster_from_dict({"name": "t", "nodes": nodes}, "t"), False)])


def test_partition_trees_follow_the_catalog() -> None:
    assert partition_tree(get_device("furiosa-rngd")) == (
        8, {"1core.6gb": 1, "2core.12gb": 2, "4core.24gb": 4})
    assert partition_tree(get_device("rebellions-atom-max")) == (4, {"1die.16gb": 1})
    units, mig = partition_tree(get_device("nvidia-a100-sxm-80gb"))
    assert units == 7 and mig["1g.10gb"] == 1 and mig["3g.40gb"] == 3 and mig["7g.80gb"] == 7
    assert partition_tree(get_device("rebellions-atom")) == (1, {})


def test_partitions_nest_aligned_and_never_overlap() -> None:
    f = fleet([{"name": "n", "devices": {"furiosa-rngd": 1}}])
    got = f.place([Group("furiosa-rngd:1core.6gb", 1)], "a")
    assert got and got[0][0].offset == 0
    # a 4-core instance cannot start at slice 0 any more: it takes the aligned half 4..7
    four = f.place([Group("furiosa-rngd:4core.24gb", 1)], "b")
    assert four and four[0][0].offset == 4
    two = f.place([Group("furiosa-rngd:2core.12gb", 1)], "c")
    assert two and two[0][0].offset == 2
    assert f.place([Group("furiosa-rngd:2core.12gb", 1)], "d") is None  # slices 0-1 are split
    assert f.place([Group("furiosa-rngd:1core.6gb", 1)], "e")[0][0].offset == 1
    assert f.devices["n/furiosa-rngd/0"].free_units == 0
    f.release("b")
    assert f.devices["n/furiosa-rngd/0"].free_units == 4
    assert f.place([Group("furiosa-rngd", 1)], "whole") is None  # not fully free


def test_best_fit_packs_partly_used_devices_and_keeps_whole_ones() -> None:
    f = fleet([{"name": "n", "devices": {"furiosa-rngd": 4}}])
    f.place([Group("furiosa-rngd:1core.6gb", 1)], "a")
    for holder in "bcdefg":
        got = f.place([Group("furiosa-rngd:1core.6gb", 1)], holder)
        assert got and got[0][0].device == "n/furiosa-rngd/0"  # the partly used card
    assert sum(d.free_units == d.units for d in f.devices.values()) == 3


def test_tensor_parallel_groups_stay_on_one_node_and_best_fit_keeps_big_nodes_whole() -> None:
    nodes = [{"name": "big", "devices": {"rebellions-atom": 8}},
             {"name": "small", "devices": {"rebellions-atom": 4}}]
    best, first = fleet(nodes), fleet(nodes)
    # a 4-way group: first-fit takes the first node that fits (splitting the big one),
    # best-fit the tightest (the small one, left empty)
    b4 = best.place([Group("rebellions-atom", 4)], "a", policy="best-fit")
    f4 = first.place([Group("rebellions-atom", 4)], "a", policy="first-fit")
    assert b4 and {a.device.split("/")[0] for a in b4[0]} == {"small"}
    assert f4 and {a.device.split("/")[0] for a in f4[0]} == {"big"}
    # an 8-way group needs one whole node: only best-fit still has one
    g8 = [Group("rebellions-atom", 8)]
    assert first.place(g8, "b", policy="first-fit") is None
    got = best.place(g8, "b", policy="best-fit")
    assert got and {best.devices[a.device].node for a in got[0]} == {"big"}
    # 12 devices free across two nodes would not do either: a group never spans nodes
    assert fleet(nodes).place([Group("rebellions-atom", 9)], "c") is None


def test_a_failed_placement_holds_nothing() -> None:
    f = fleet([{"name": "n", "devices": {"furiosa-rngd": 1}}])
    before = {k: dict(d.held) for k, d in f.devices.items()}
    assert f.place([Group("furiosa-rngd:4core.24gb", 1), Group("furiosa-rngd", 1)], "x") is None
    assert {k: dict(d.held) for k, d in f.devices.items()} == before


def test_free_cluster_counts_every_free_slice_once() -> None:
    f = fleet([{"name": "n", "devices": {"furiosa-rngd": 2}}])
    f.place([Group("furiosa-rngd:1core.6gb", 1)], "a")
    c = f.free_cluster()
    assert c is not None
    # card 0: slices 1..7 free = one 1-core, one 2-core, one 4-core; card 1 whole
    assert dict(c.counts) == {"furiosa-rngd:4core.24gb": 1, "furiosa-rngd:2core.12gb": 1,
                              "furiosa-rngd:1core.6gb": 1, "furiosa-rngd": 1}
    split = f.free_cluster(profile="furiosa-rngd:2core.12gb")
    assert split is not None and split.counts["furiosa-rngd:2core.12gb"] == 1 + 4
    quota = f.free_cluster(allow={"furiosa-rngd": 0.5})
    assert quota is not None and sum(quota.counts.values()) == 1  # the 4-core half only


def test_cordoned_devices_are_not_offered() -> None:
    f = fleet([{"name": "n", "devices": {"rebellions-atom": 2}}])
    f.devices["n/rebellions-atom/0"].cordoned = True
    c = f.free_cluster()
    assert c is not None and c.size == 1
    assert f.place([Group("rebellions-atom", 2)], "x") is None
