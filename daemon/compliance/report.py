"""A scan as a table for the terminal, JSON for programs, and one self-contained HTML page (inline CSS,
nothing fetched, every text escaped: findings quote the target's own files, which anyone may have
written to)."""

from __future__ import annotations

import html
import json
import time
from typing import Any

from daemon.compliance.model import CheckResult, Report, Status
from daemon.compliance.remediate import pipeline

FORMATS = ("table", "json", "html")


def to_json(report: Report) -> dict[str, Any]:
    return {**report.as_json(), "pipeline": pipeline(report.results, report.context)}


def render(report: Report, form: str) -> str:
    if form == "json":
        return json.dumps(to_json(report), indent=2)
    if form == "html":
        return render_html(report)
    return render_table(report)


def summary(report: Report) -> str:
    where = f"{report.target}{' (running kernel read too)' if report.live else ''}"
    return (f"{len(report.results)} checks of {where}: {report.count(Status.PASS)} pass, "
            f"{report.count(Status.FAIL)} fail, {report.count(Status.NOT_APPLICABLE)} not applicable")  # fmt: skip


def render_table(report: Report) -> str:
    rows = [[str(r.status), str(r.severity), r.id, r.finding] for r in report.results]
    widths = [max(len(row[i]) for row in [["STATUS", "SEVERITY", "CHECK", ""], *rows]) for i in range(3)]
    lines = [f"{'STATUS':<{widths[0]}}  {'SEVERITY':<{widths[1]}}  {'CHECK':<{widths[2]}}  FINDING"]
    lines += [f"{s:<{widths[0]}}  {v:<{widths[1]}}  {i:<{widths[2]}}  {f}" for s, v, i, f in rows]
    lines += ["", summary(report)]
    steps = pipeline(report.results, report.context)
    if steps:
        fixed = [r.id for r in report.failed if r.remediation is not None]
        lines.append(f"rastosctl compliance remediate fixes {len(fixed)} with ops: {', '.join(s['op'] for s in steps)}")
    by_hand = [r for r in report.failed if r.remediation is None]
    if by_hand:
        lines.append(f"By hand ({len(by_hand)}):")
        lines += [f"  {r.id}: {r.manual or r.finding}" for r in by_hand]
    return "\n".join(lines)


STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; }
h1 { font-size: 1.4em; margin-bottom: .2em; }
table { border-collapse: collapse; width: 100%; margin: 1em 0; }
th, td { text-align: left; padding: .35em .6em; border-bottom: 1px solid #ddd; vertical-align: top; }
th { background: #f4f4f4; }
.status { font-weight: bold; white-space: nowrap; }
.pass .status { color: #1a7f37; }
.fail .status { color: #cf222e; }
.not-applicable .status { color: #6e7781; }
.severity-high { font-weight: bold; }
.summary span { margin-right: 1.2em; }
code, pre { font: 12px ui-monospace, monospace; background: #f6f8fa; }
pre { padding: .8em; overflow-x: auto; }
small { color: #57606a; }
"""


def render_html(report: Report) -> str:
    e = html.escape
    when = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(report.time))
    counts = "".join(f"<span>{e(str(status))}: {report.count(status)}</span>" for status in Status)
    rows = "\n".join(html_row(result) for result in report.results)
    steps = json.dumps(pipeline(report.results, report.context), indent=2)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'">
<title>rastOS compliance report: {e(report.target)}</title>
<style>{STYLE}</style>
</head>
<body>
<h1>rastOS compliance report</h1>
<p><small>{e(summary(report))}; scanned {e(when)}</small></p>
<p class="summary">{counts}</p>
<table>
<thead><tr><th>Status</th><th>Severity</th><th>Check</th><th>Finding</th><th>Remediation</th></tr></thead>
<tbody>
{rows}
</tbody>
</table>
<h2>Remediation pipeline</h2>
<p><small>What <code>rastosctl compliance remediate</code> runs as one job (with its snapshots):</small></p>
<pre>{e(steps)}</pre>
</body>
</html>
"""


def html_row(result: CheckResult) -> str:
    e = html.escape
    if result.remediation is not None:
        fix = f"op <code>{e(result.remediation.op)}</code> <code>{e(json.dumps(result.remediation.params))}</code>"
    else:
        fix = e(result.manual)
    return (
        f'<tr class="{e(str(result.status))}"><td class="status">{e(str(result.status))}</td>'
        f'<td class="severity-{e(str(result.severity))}">{e(str(result.severity))}</td>'
        f"<td><code>{e(result.id)}</code><br>{e(result.title)}<br><small>{e(result.rationale)}</small></td>"
        f"<td>{e(result.finding)}</td><td>{fix}</td></tr>"
    )
