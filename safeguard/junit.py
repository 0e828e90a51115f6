"""JUnit XML for CI systems: one test case per concept and probe."""
from __future__ import annotations

from xml.etree import ElementTree as ET


def junit_xml(decision, results: list[dict], run_id: str) -> str:
    suite = ET.Element("testsuite", name="safeguard", tests=str(len(results)),
                       failures=str(sum(r["status"] == "fail" for r in results)),
                       errors=str(sum(r["status"] not in ("pass", "fail") for r in results)))
    ET.SubElement(ET.SubElement(suite, "properties"), "property", name="run_id", value=run_id)
    for r in results:
        case = ET.SubElement(suite, "testcase", classname=f"safeguard.{r['concept']}", name=r["probe"])
        detail = f"rate={r['rate']} ci=({r['ci_low']}, {r['ci_high']}) n={r['n']} threshold={r['threshold']}"
        if r["status"] == "fail":
            ET.SubElement(case, "failure", message=detail).text = detail
        elif r["status"] != "pass":
            ET.SubElement(case, "error", message=str((r.get("details") or {}).get("error")))
    ET.SubElement(suite, "system-out").text = decision.line()
    return ET.tostring(suite, encoding="unicode", xml_declaration=True)
