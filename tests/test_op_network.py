"""The network op in network namespaces: the link as netlink shows it, the networkd file, a client that
reaches the addresses, and a change that cuts the client off reverted by the daemon on its own."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.errors import InvalidParams, OpFailed
from ops.base import execute
from ops.network import LinkConfig, read_link
from ops.params import validate
from ops.steps import step_from
from ops.target import Target
from tests.daemon_fixtures import MANAGER, STRICT_POLICY, Rastosd, private_bus
from tests.netns import Pair, namespace_pair
from tests.op_tree import op_scratch_root

pytestmark = [pytest.mark.root, pytest.mark.network]


@pytest.fixture
def pair() -> Iterator[Pair]:
    with namespace_pair() as made:
        yield made


def apply(pair: Pair, root: Path, params: dict[str, Any]) -> list[str]:
    with pair.inside_host():
        target = Target(root, runtime=True)
        step = step_from(target, "network", params, "")
        execute(step.op.plan(target, step.params), target, lambda line: None)
        return step.op.verify(target, step.params)


def route_to_second_subnet(pair: Pair) -> None:
    pair.run(pair.client, "ip", "route", "add", "10.199.5.0/24", "via", pair.host_address)


def test_network_sets_addresses_mtu_routes_and_writes_the_networkd_file(op_root: Path, pair: Pair) -> None:
    params = {"interface": pair.host_link, "addresses": ["10.199.0.1/24", "10.199.5.1/24"], "gateway": "10.199.0.2",
              "routes": ["198.51.100.0/24 via 10.199.0.2"], "dns": ["10.199.0.53"], "mtu": 1400,
              "confirm_timeout": 0}  # fmt: skip
    with pair.serving(8080):
        assert apply(pair, op_root, params) == []
        with pair.inside_host():
            link = read_link(pair.host_link)
        assert link["mtu"] == 1400 and link["addresses"] == {"10.199.0.1/24", "10.199.5.1/24"}
        assert ("default", "10.199.0.2") in link["routes"] and ("198.51.100.0/24", "10.199.0.2") in link["routes"]
        route_to_second_subnet(pair)
        assert pair.can_connect(8080, address="10.199.5.1"), "the new address answers"
        text = (op_root / f"etc/systemd/network/50-rastos-{pair.host_link}.network").read_text()
        assert "Address=10.199.5.1/24\n" in text and "DNS=10.199.0.53\n" in text and "MTUBytes=1400\n" in text
        with pair.inside_host():
            target = Target(op_root, runtime=True)
            step = step_from(target, "network", params, "")
            assert step.op.plan(target, step.params).actions == (), "applied again: nothing to do"


def test_a_static_address_moves_without_a_moment_with_none(op_root: Path, pair: Pair) -> None:
    with pair.serving(8080):
        assert apply(pair, op_root, {"interface": pair.host_link, "addresses": ["10.199.0.7/24"],
                                     "confirm_timeout": 0}) == []  # fmt: skip
        assert pair.can_connect(8080, address="10.199.0.7")
        assert not pair.can_connect(8080), "the old address is gone"


def test_the_file_reads_back_as_what_was_written() -> None:
    op_params = {"interface": "eth0", "addresses": ["192.0.2.10/24", "2001:db8::10/64"], "gateway": "192.0.2.1",
                 "routes": ["198.51.100.0/24 via 192.0.2.254"], "dns": ["192.0.2.53"], "mtu": 9000}  # fmt: skip
    from ops import get_op

    config = LinkConfig.from_params(validate(get_op("network").schema, op_params))
    assert LinkConfig.from_file("eth0", config.render()) == config


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"interface": "eth0", "addresses": ["192.0.2.300/24"]}, "params.addresses: '192.0.2.300/24' is not"),
        ({"interface": "eth0", "addresses": ["192.0.2.3"]}, "params.addresses: '192.0.2.3' needs its prefix"),
        ({"interface": "eth0", "dhcp": "ipv4", "routes": ["10.0.0.0/8 to x"]}, "params.routes: '10.0.0.0/8 to x'"),
        ({"interface": "eth0"}, "params.addresses: a link without DHCP needs at least one address"),
        ({"interface": "eth0; reboot", "dhcp": "yes"}, "params.interface: 'eth0; reboot' is not valid"),
    ],
)
def test_bad_network_params_are_refused_by_field(tmp_path: Path, params: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidParams) as refused:
        step_from(Target(tmp_path), "network", params, "")
    assert str(refused.value).startswith(message), str(refused.value)


def test_a_link_that_does_not_exist_and_a_file_not_ours_are_refused(op_root: Path, pair: Pair) -> None:
    with pair.inside_host(), pytest.raises(InvalidParams, match=r"params.interface: no link 'eth9'; links: .*lo"):
        step_from(Target(op_root, runtime=True), "network", {"interface": "eth9", "dhcp": "yes"}, "")
    foreign = op_root / "etc/systemd/network/50-rastos-eth0.network"
    foreign.parent.mkdir(parents=True, exist_ok=True)
    foreign.write_text("[Match]\nName=eth0\n")
    step = step_from(Target(op_root), "network", {"interface": "eth0", "dhcp": "yes"}, "")
    with pytest.raises(OpFailed, match="was not written by rastosd"):
        step.op.plan(Target(op_root), step.params)


def test_a_network_change_that_cuts_the_client_off_is_reverted_by_the_daemon(
    op_tree_base: Path, tmp_path: Path, pair: Pair
) -> None:
    with private_bus(STRICT_POLICY) as bus, op_scratch_root(op_tree_base, f"net-{tmp_path.name}") as scratch:
        wrapper = ["ip", "netns", "exec", pair.host, "unshare", "--uts", "--"]
        daemon = Rastosd(bus, scratch, tmp_path / "state", extra=["--root-runtime"], wrapper=wrapper)
        daemon.start()
        try:
            with pair.serving(8080):
                steps = [{"op": "network", "params": {"interface": pair.host_link, "addresses": ["10.199.0.1/24"],
                                                       "confirm_timeout": 0}}]  # fmt: skip
                path = daemon.call(MANAGER, "RunPipeline", "st", json.dumps(steps), "2")[0]
                assert daemon.wait_job(path) == "done", daemon.log_text()
                moved = {"interface": pair.host_link, "addresses": ["10.199.0.7/24"], "confirm_timeout": 3}
                path = daemon.call(MANAGER, "Apply", "sst", "network", json.dumps(moved), "2")[0]
                assert daemon.wait_job(path) == "done", daemon.log_text()
                job_id = int(path.rsplit("/", 1)[1])
                assert not pair.can_connect(8080), "the client lost the address it used"
                deadline = time.monotonic() + 30
                while daemon.job(job_id)["confirmation"]["state"] != "reverted":
                    assert time.monotonic() < deadline, daemon.log_text()
                    time.sleep(0.2)
                assert pair.can_connect(8080), "the old address is back, by the daemon alone"
                assert not pair.can_connect(8080, address="10.199.0.7"), "and the new one is gone"
                result = daemon.job(job_id)["result"]
                outputs = [line for step in result["steps"] for line in step.get("output", [])]
                assert any("systemd-networkd.service: skipped" in line for line in outputs), outputs
        finally:
            daemon.stop()
