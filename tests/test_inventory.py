"""The inventory's format (daemon/inventory.py): what it reads, and each error naming the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.ctl_target import Target, Via
from daemon.inventory import Inventory, load_inventory
from rastos.errors import RastosError

VARIABLES = {"ssh_port", "allow_tcp"}
NAMED = "letters, digits, '.', '_' and '-'"
A = '[[host]]\nname = "a"\n'  # one host, to which a test adds the key it is about
GOOD = """
[[host]]
name = "web-1"
address = "192.0.2.11"
user = "admin"
port = 2222

[[host]]
name = "web-2"
vars = { ssh_port = 2200 }

[[host]]
name = "db-1"
address = "2001:db8::1"

[group.web]
hosts = ["web-1", "web-2"]
vars = { ssh_port = 2222, allow_tcp = ["80", "443"] }

[group.db]
hosts = ["db-1"]
"""


def load(tmp_path: Path, text: str, variables: set[str] | None = VARIABLES) -> Inventory:
    path = tmp_path / "fleet.toml"
    path.write_text(text)
    return load_inventory(path, variables)


def error_of(tmp_path: Path, text: str, limits: tuple[str, ...] = ()) -> RastosError:
    with pytest.raises(RastosError) as raised:
        load(tmp_path, text).select(limits)
    return raised.value


def test_hosts_groups_and_their_variables(tmp_path: Path) -> None:
    inventory = load(tmp_path, GOOD)
    web1, web2, db1 = inventory.hosts
    assert web1.target == Target(Via.SSH, "192.0.2.11", "admin", 2222)
    assert web1.target.destination == "admin@192.0.2.11:2222"
    assert web2.target == Target(Via.SSH, "web-2") and web2.target.destination == "web-2"
    assert db1.target.destination == "[2001:db8::1]", "an IPv6 address in brackets, so sd-bus takes no port"
    assert web1.groups == ("web",) and db1.groups == ("db",)
    assert web1.variables == {"ssh_port": 2222, "allow_tcp": ["80", "443"]}
    assert web2.variables == {"ssh_port": 2200, "allow_tcp": ["80", "443"]}, "the host's own value wins"
    assert db1.variables == {}


def test_limit_selects_hosts_and_groups_in_the_inventorys_order(tmp_path: Path) -> None:
    inventory = load(tmp_path, GOOD)
    assert [h.name for h in inventory.select([])] == ["web-1", "web-2", "db-1"]
    assert [h.name for h in inventory.select(["db", "web-2"])] == ["web-2", "db-1"]
    assert [h.name for h in inventory.select(["db,web-1"])] == ["web-1", "db-1"]
    assert [h.name for h in inventory.select(["all"])] == ["web-1", "web-2", "db-1"]


def test_an_unknown_group_in_limit_names_the_file(tmp_path: Path) -> None:
    error = error_of(tmp_path, GOOD, ("web", "dbs"))
    assert error.message == f"{tmp_path / 'fleet.toml'}: --limit 'dbs': no host or group of that name"
    assert error.hint == "its groups: all, web, db"


@pytest.mark.parametrize(
    ("text", "message", "hint"),
    [
        (A + "prot = 22\n", "host[0].prot: unknown key", "known keys: name, address, user, port, vars"),
        (A + '[group.g]\nhosts = ["a"]\nvar = {}\n', "group.g.var: unknown key",
         "known keys: hosts, vars"),
        ('[[hosts]]\nname = "a"\n', "hosts: unknown key", "an inventory has [[host]] tables and [group.NAME] tables"),
    ],
)  # fmt: skip
def test_an_unknown_key_is_an_error_naming_it(tmp_path: Path, text: str, message: str, hint: str) -> None:
    error = error_of(tmp_path, text)
    assert error.message == f"{tmp_path / 'fleet.toml'}: {message}"
    assert error.hint == hint


def test_a_duplicate_host_is_an_error(tmp_path: Path) -> None:
    by_name = error_of(tmp_path, A + '[[host]]\nname = "b"\n[[host]]\nname = "a"\n')
    assert by_name.message == f"{tmp_path / 'fleet.toml'}: host[2].name: duplicate host 'a' (also host[0])"
    by_destination = error_of(tmp_path, A + 'address = "h"\n[[host]]\nname = "b"\naddress = "h"\n')
    assert by_destination.message == (
        f"{tmp_path / 'fleet.toml'}: host[1]: duplicate host: 'b' is h, as 'a' (host[0]) is"
    )
    twice_in_a_group = error_of(tmp_path, A + '[group.g]\nhosts = ["a", "a"]\n')
    assert twice_in_a_group.message == f"{tmp_path / 'fleet.toml'}: group.g.hosts: duplicate host 'a'"
    # The same address on another port or as another user is another host (containers behind one address).
    assert len(load(tmp_path, A + 'address = "h"\n[[host]]\nname = "b"\naddress = "h"\nport = 2\n')
               .hosts) == 2  # fmt: skip


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (A + '[group.g]\nhosts = ["b"]\n', "group.g.hosts: unknown host 'b'"),
        (A + '[group.a]\nhosts = ["a"]\n', "group.a: 'a' is a host's name too: --limit a would mean either"),
        (A + '[group.all]\nhosts = ["a"]\n', f"group.all: a group's name is {NAMED}, and not 'all'"),
        (A + 'port = 0\n', "host[0].port: must be a number from 1 to 65535, got 0"),
        (A + 'port = "22"\n', "host[0].port: must be a number from 1 to 65535, got '22'"),
        (A + 'address = "h:22"\n', "host[0].address: must be a host name or an IP address, got 'h:22'"),
        (A + 'user = "no one"\n', "host[0].user: must be a user name, got 'no one'"),
        (A + 'address = "h/c"\n', "host[0].address: must be a host name or an IP address, got 'h/c'"),
        (A + 'address = "a b"\n', "host[0].address: must be a host name or an IP address, got 'a b'"),
        ('[[host]]\naddress = "h"\n', f"host[0].name: a host needs a name of {NAMED}, got None"),
        (A + 'vars = { ssh_prot = 1 }\n', "host[0].vars.ssh_prot: no workflow has this variable"),
        ('host = "a"\n', "host: write each host as a [[host]] table"),
    ],
)  # fmt: skip
def test_a_wrong_value_is_an_error_naming_its_key(tmp_path: Path, text: str, message: str) -> None:
    assert error_of(tmp_path, text).message == f"{tmp_path / 'fleet.toml'}: {message}"


def test_two_groups_that_disagree_on_a_hosts_variable(tmp_path: Path) -> None:
    groups = '[group.g1]\nhosts = ["a"]\nvars = { ssh_port = 1 }\n[group.g2]\nhosts = ["a"]\nvars = { ssh_port = 2 }\n'
    error = error_of(tmp_path, A + "" + groups)
    assert error.message == (
        f"{tmp_path / 'fleet.toml'}: group.g2.vars.ssh_port: host 'a' is also in group 'g1', which sets it otherwise"
    )
    settled = load(tmp_path, A + "vars = { ssh_port = 3 }\n" + groups)
    assert settled.hosts[0].variables == {"ssh_port": 3}


def test_not_toml_and_no_file_name_the_file(tmp_path: Path) -> None:
    assert error_of(tmp_path, "[[host]\n").message.startswith(f"{tmp_path / 'fleet.toml'}: not valid TOML: ")
    with pytest.raises(RastosError, match=r"fleet-missing\.toml: No such file or directory"):
        load_inventory(tmp_path / "fleet-missing.toml", VARIABLES)


def test_the_variables_are_those_of_the_shipped_workflows(tmp_path: Path) -> None:
    inventory = load(tmp_path, A + 'vars = { ssh_port = 2222, listen_address = "::" }\n', None)
    assert inventory.hosts[0].variables == {"ssh_port": 2222, "listen_address": "::"}
