"""Compare two JUnit XML reports of the same transformers tests (stock, and "aspd" forced as the default): counts
of each, and the tests that fail only with aspd (and only stock), as Markdown on stdout.

    python .ci/hf_model_tests_compare.py stock.xml aspd.xml
"""
from __future__ import annotations

import sys
import xml.etree.ElementTree as ET


def outcomes(path: str) -> dict[str, tuple[str, str]]:
    """``{test id: (outcome, first line of the message)}``; outcome is passed, failed, error or skipped."""
    out = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        state, msg = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                state = "failed" if tag == "failure" else tag
                msg = (el.get("message") or el.text or "").strip().splitlines()[0][:160] if (
                    el.get("message") or el.text) else ""
                break
        out[name] = (state, msg)
    return out


def counts(res: dict[str, tuple[str, str]]) -> dict[str, int]:
    c = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    for state, _ in res.values():
        c[state] += 1
    return c


def main(stock_path: str, aspd_path: str) -> None:
    stock, aspd = outcomes(stock_path), outcomes(aspd_path)
    bad = ("failed", "error")
    print("| run | passed | failed | error | skipped |\n|---|---|---|---|---|")
    for tag, res in (("stock", stock), ("aspd forced", aspd)):
        c = counts(res)
        print(f"| {tag} | {c['passed']} | {c['failed']} | {c['error']} | {c['skipped']} |")
    only_aspd = sorted(n for n, (s, _) in aspd.items() if s in bad and stock.get(n, ("passed",))[0] not in bad)
    only_stock = sorted(n for n, (s, _) in stock.items() if s in bad and aspd.get(n, ("passed",))[0] not in bad)
    print(f"\nFailing only with aspd ({len(only_aspd)}):\n")
    for n in only_aspd:
        print(f"- `{n}`: {aspd[n][1]}")
    print(f"\nFailing only stock ({len(only_stock)}):\n")
    for n in only_stock:
        print(f"- `{n}`: {stock[n][1]}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
