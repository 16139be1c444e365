"""Compliance: verify-only checks after the CIS Debian benchmark, each remediated by an op where one can.

A scan reads the target (never changes it) and gives each check pass, fail or not-applicable with a
one-line finding. Checks have stable ids, a title, why they matter and a severity; those an op can fix
name the op and its params, the others say what to do by hand. The failed checks' remediations become
one pipeline (remediate.py) that RunPipeline runs as a job like any other: pre/post snapshots, `&&`
semantics, confirm-or-revert for the firewall and ssh steps. Scanning again shows what it fixed.

Checks are grouped by what they read: kernel parameters, sshd, file modes, accounts, the rest of the
host. Why a check is as strict as it is, and where it departs from the benchmark, is said beside it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from daemon.compliance.checks_accounts import ACCOUNT_CHECKS
from daemon.compliance.checks_files import FILE_CHECKS
from daemon.compliance.checks_host import HOST_CHECKS
from daemon.compliance.checks_kernel import KERNEL_CHECKS
from daemon.compliance.checks_ssh import SSH_CHECKS
from daemon.compliance.facts import Facts
from daemon.compliance.model import Check, CheckResult, Outcome, Report, failed
from ops import OPS
from ops.target import Target
from rastos.errors import RastosError

CHECKS: tuple[Check, ...] = (*KERNEL_CHECKS, *SSH_CHECKS, *FILE_CHECKS, *ACCOUNT_CHECKS, *HOST_CHECKS)


def scan(target: Target, checks: Sequence[Check] = CHECKS) -> Report:
    facts = Facts(target)
    results = tuple(result_of(check, facts) for check in checks)
    context = {"sysctl": facts.sysctl_context, "ssh": facts.ssh_context, "firewall": facts.firewall_context,
               "certs": facts.certs_context}  # fmt: skip
    return Report(str(target.root), target.live, time.time(), results, context)


def result_of(check: Check, facts: Facts) -> CheckResult:
    try:
        outcome = check.evaluate(facts)
    except (OSError, ValueError, RastosError) as error:  # a file unreadable or malformed: say so, go on
        outcome = failed(f"cannot be checked: {error}", remediable=False)
    remediation = check.remediation if outcome.remediable and is_offered(check) else None
    return CheckResult(check.id, check.title, check.rationale, check.severity, outcome.status, outcome.finding,
                       remediation, check.manual)  # fmt: skip


def is_offered(check: Check) -> bool:
    return check.remediation is not None and check.remediation.op in OPS


__all__ = ["CHECKS", "Outcome", "Report", "scan"]
