"""A profile's host settings as op steps: the host name, kernel tuning (sysctl) and the accounts are
what the hostname, sysctl and user ops set on a live host, so the image builder has them set by those
ops, with their params. A host built from a profile and `rastosctl plan` of the same settings agree
byte for byte; a profile key that is an op's param is checked by that op's schema (model.py).
"""

from __future__ import annotations

from typing import Any

from imagebuilder.profile.model import Profile


def host_steps(profile: Profile) -> list[dict[str, Any]]:
    """The steps, in the order the ops need them (an account before what may name it)."""
    steps: list[dict[str, Any]] = [{"op": "hostname", "params": {"hostname": profile.system.hostname}}]
    if profile.kernel.sysctl:
        steps.append({"op": "sysctl", "params": {"settings": dict(profile.kernel.sysctl)}})
    steps += [{"op": "user", "params": user.op_params()} for user in profile.users]
    return steps


def setting(step: dict[str, Any]) -> tuple[str, str]:
    """What a step sets, so two steps that set the same thing are seen: the host name, an account,
    a sysctl file."""
    params = step["params"]
    if step["op"] == "user":
        return "user", str(params.get("name"))
    if step["op"] == "sysctl":
        return "sysctl", str(params.get("name", "90-rastos"))
    return step["op"], ""


def overlaps(profile: Profile, declared: list[dict[str, Any]]) -> list[str]:
    """The settings the profile's keys and its desired state both set (the desired state is applied
    after the profile's settings, so it wins: said, not silent)."""
    ours = {setting(step) for step in host_steps(profile)}
    return sorted({" ".join(filter(None, setting(step))) for step in declared if setting(step) in ours})
