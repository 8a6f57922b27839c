"""junit.xml: one testcase per gate (a <failure> when it failed), so CI systems show gates as tests.

A stage that failed at run time is added as a testcase with an <error>, so a crashed run is never
an empty, green test suite.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

from pipeline.report import fmt


def render_junit(report: dict[str, Any]) -> str:
    suite_name = f"fmap.{report.get('recipe_name') or 'run'}"
    suites = ET.Element("testsuites", name="fmap")
    suite = ET.SubElement(suites, "testsuite", name=suite_name)
    failures = errors = 0
    for g in report["gates"]:
        case = ET.SubElement(suite, "testcase", classname=f"{suite_name}.{g['stage']}",
                             name=f"{g['name']}[{g.get('artifact') or 'run'}]", time="0")
        text = (f"{g['name']}: value {fmt.gate_value(g)} {fmt.gate_op(g['name'])} {g['threshold']} required"
                f"{'; ' + g['detail'] if g.get('detail') else ''}")
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
