"""junit.xml: one testcase per gate (a <failure> when it failed), so CI systems show gates as tests.

A stage that failed at run time is added as a testcase with an <error>, so a crashed run is never
an empty, green test suite. The machine (CPU, cores, whether it was busy) is a <properties> block,
and on a busy machine every latency or speedup gate says so in its text: CI shows the caveat
next to the number.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from pipeline.report import fmt, report_format


@report_format("junit", "junit.xml")
def render_junit(report: dict[str, Any], run_dir: Path | None = None) -> str:
    suite_name = f"fmap.{report.get('recipe_name') or 'run'}"
    suites = ET.Element("testsuites", name="fmap")
    suite = ET.SubElement(suites, "testsuite", name=suite_name)
    machine = report.get("machine") or {}
    busy = bool((report.get("summary") or {}).get("busy_machine"))
    props = ET.SubElement(suite, "properties")
    for key, value in (("cpu_model", machine.get("cpu_model")), ("cores", machine.get("cores")),
                       ("cpu_flags", " ".join(machine.get("cpu_flags") or [])), ("busy_machine", str(busy).lower())):
        if value not in (None, ""):
            ET.SubElement(props, "property", name=key, value=str(value))
    failures = errors = 0
    for g in report["gates"]:
        case = ET.SubElement(suite, "testcase", classname=f"{suite_name}.{g['stage']}",
                             name=f"{g['name']}[{g.get('artifact') or 'run'}]", time="0")
        timed = "speedup" in g["name"] or "latency" in g["name"]
        text = (f"{g['name']}: value {fmt.gate_value(g)} {fmt.gate_op(g['name'])} {g['threshold']} required"
                f"{'; ' + g['detail'] if g.get('detail') else ''}"
                f"{'; measured on a busy machine (load above its cores): timings are inflated' if busy and timed else ''}")
        if g.get("passed"):
            ET.SubElement(case, "system-out").text = text
        else:
            failures += 1
            ET.SubElement(case, "failure", message=text, type="GateFailed").text = text
    for st in report["stages"]:
        if st["status"] == "failed":
            errors += 1
            case = ET.SubElement(suite, "testcase", classname=f"{suite_name}.stages", name=f"stage:{st['id']}",
                                 time=str(st.get("duration_s") or 0))
            ET.SubElement(case, "error", message=str(st.get("error") or "stage failed"), type="StageFailed")
    tests = len(suite.findall("testcase"))
    for el in (suite, suites):
        el.set("tests", str(tests))
        el.set("failures", str(failures))
        el.set("errors", str(errors))
    ET.indent(suites)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"
