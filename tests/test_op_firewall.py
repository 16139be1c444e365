"""The firewall op in network namespaces: the rules a client sees, an open session kept, idempotence."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.errors import OpFailed
from ops.base import execute
from ops.firewall import RULESET, CheckedRuleset
from ops.steps import step_from
from ops.target import Target
from tests.netns import Pair, namespace_pair
from tests.op_tree import tree_digest

pytestmark = [pytest.mark.root, pytest.mark.network]


@pytest.fixture
def pair() -> Iterator[Pair]:
    with namespace_pair() as made:
        yield made


def apply(pair: Pair, root: Path, params: dict[str, object]) -> list[str]:
    with pair.inside_host():
        target = Target(root, runtime=True)
        step = step_from(target, "firewall", params, "")
        execute(step.op.plan(target, step.params), target, lambda line: None)
        return step.op.verify(target, step.params)


def test_firewall_opens_what_it_names_and_drops_the_rest(op_root: Path, pair: Pair) -> None:
    with pair.serving(8080, 9090, 22):
        assert pair.can_connect(9090), "no firewall yet: everything is open"
        assert apply(pair, op_root, {"allow_tcp": ["8080"], "confirm_timeout": 0}) == []
        assert pair.can_connect(8080) and pair.can_connect(22)
        assert not pair.can_connect(9090), "a port not named is dropped"
        listing = pair.run(pair.host, "nft", "list", "table", "inet", "rastos", check=False)
        if listing.returncode != 0:  # no nft on the host: ask the tree's
            listing = pair.run(pair.host, "bwrap", "--bind", str(op_root), "/", "--proc", "/proc", "--dev", "/dev",
                               "nft", "list", "table", "inet", "rastos")  # fmt: skip
        assert "policy drop" in listing.stdout
        assert (op_root / "etc/systemd/system/sysinit.target.wants/nftables.service").is_symlink()
        with pair.inside_host():
            target = Target(op_root, runtime=True)
            step = step_from(target, "firewall", {"allow_tcp": ["8080"], "confirm_timeout": 0}, "")
            assert step.op.plan(target, step.params).actions == (), "applied again: nothing to do"


def test_an_open_session_survives_a_ruleset_that_closes_its_port(op_root: Path, pair: Pair) -> None:
    with pair.serving(8080):
        session = subprocess.Popen(
            ["ip", "netns", "exec", pair.client, sys.executable, "-c",
             f"import socket,sys\ns=socket.create_connection(('{pair.host_address}', 8080), timeout=20)\n"
             "f=s.makefile('rwb')\nfor line in sys.stdin.buffer:\n f.write(line); f.flush(); "
             "sys.stdout.buffer.write(f.readline()); sys.stdout.flush()\n"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )  # fmt: skip
        assert session.stdin is not None and session.stdout is not None
        session.stdin.write(b"before\n")
        session.stdin.flush()
        assert session.stdout.readline() == b"before\n"
        assert apply(pair, op_root, {"allow_tcp": [], "ssh_port": 0, "confirm_timeout": 0}) == []
        assert not pair.can_connect(8080), "new connections to the port are dropped"
        session.stdin.write(b"after\n")
        session.stdin.flush()
        assert session.stdout.readline() == b"after\n", "the established session keeps going"
        session.kill()
        session.wait()


def test_a_ruleset_nft_refuses_is_never_written(op_root: Path, pair: Pair) -> None:
    """The params leave little for nft to refuse, so the check is shown on the action itself."""
    before = tree_digest(op_root)
    broken = CheckedRuleset(RULESET, "table inet rastos {\n\tchain input { tcp dport 99999 accept }\n}\n", None)
    with pair.inside_host(), pytest.raises(OpFailed, match="nft -c refuses the ruleset, left unchanged"):
        broken.execute(Target(op_root, runtime=True), lambda line: None)
    assert tree_digest(op_root) == before, "neither the file nor the scratch copy is there"


def test_firewall_plan_on_a_scratch_root_writes_files_only(op_root: Path) -> None:
    target = Target(op_root)
    step = step_from(target, "firewall", {"allow_udp": ["53", "60000-61000"]}, "")
    plan = step.op.plan(target, step.params)
    assert [c.subject for c in plan.changes] == ["/etc/nftables.conf", "unit nftables.service"]
    assert "udp dport { 53, 60000-61000 } accept" in plan.actions[0].content  # type: ignore[attr-defined]
