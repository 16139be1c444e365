"""The polkit files rastOS ships agree with the daemon: every method the D-Bus contract does not mark
read-only has an action, every action is declared once, with the defaults an administrator expects,
the shipped rule names the admin group's default, and the builder installs both where polkitd reads."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

from daemon.bus.polkit import ACTIONS
from daemon.config import DaemonConfig
from imagebuilder.stages.rastos import install_units

CHECKOUT = Path(__file__).resolve().parents[1]
CONTRACT = CHECKOUT / "daemon" / "bus" / "org.rastos.Daemon1.xml"
POLICY = CHECKOUT / "units" / "org.rastos.Daemon1.policy"
RULES = CHECKOUT / "units" / "60-rastos.rules"


def methods_of_contract() -> dict[str, bool]:
    """Interface.Member -> whether its comment in the contract marks it read-only."""
    found: dict[str, bool] = {}
    for interface in re.split(r"<interface ", CONTRACT.read_text())[1:]:
        name = interface.split('"')[1].rsplit(".", 1)[1]
        for comment, member in re.findall(r'(?:<!--((?:(?!-->).)*?)-->\s*)?<method name="(\w+)"', interface, re.S):
            found[f"{name}.{member}"] = comment.strip().startswith("read-only")
    return found


def test_every_method_that_is_not_read_only_has_an_action() -> None:
    methods = methods_of_contract()
    assert len(methods) == 22, methods  # a new method: decide whether it reads only, or which action it needs
    assert {method for method, read_only in methods.items() if not read_only} == set(ACTIONS)


def test_every_action_is_declared_once_with_the_defaults() -> None:
    actions = ET.parse(POLICY).getroot().findall("action")
    ids = [action.get("id", "") for action in actions]
    assert sorted(ids) == sorted(set(ACTIONS.values())), "declared once each, and each one used"
    for action in actions:
        defaults = {child.tag: child.text for child in action.find("defaults") or []}
        assert defaults == {"allow_any": "auth_admin", "allow_inactive": "auth_admin",
                            "allow_active": "auth_admin_keep"}, action.get("id")  # fmt: skip
        assert (action.findtext("description") or "").strip(), action.get("id")
        assert (action.findtext("message") or "").startswith("Authentication is required to "), action.get("id")


def test_the_shipped_rule_names_the_default_admin_group() -> None:
    groups = re.findall(r'subject\.isInGroup\("([^"]+)"\)', RULES.read_text())
    assert groups == [DaemonConfig.admin_group], "the rule keeps the admin group's default"
    assert 'action.id.indexOf("org.rastos.Daemon1.") == 0' in RULES.read_text()


def test_the_builder_installs_them_where_polkitd_reads(tmp_path: Path) -> None:
    units = tmp_path / "units"
    units.mkdir()
    for source in (POLICY, RULES):
        (units / source.name).write_text(source.read_text())
    assert install_units(tmp_path / "root", units) == [], "nothing to enable"
    assert (tmp_path / "root/usr/share/polkit-1/actions/org.rastos.Daemon1.policy").read_text() == POLICY.read_text()
    assert (tmp_path / "root/usr/share/polkit-1/rules.d/60-rastos.rules").read_text() == RULES.read_text()
