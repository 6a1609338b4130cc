"""Compare an access record with infra/'s grants; print what no grant allows and what no use needed, and write
docs/identities.md from the same data.

    python -m devstack.access.report --record .stack/access.jsonl [--write-docs]

Exits 1 when the comparison finds anything (the page is written either way: it shows the findings too). Until a
stack run's record is kept (docs/identities.record.jsonl), the page shows the grants alone.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from devstack.access.grants import DOCS_PAGE, DOCS_RECORD, NOT_EXERCISED, compare, docs_page, in_infra, parse_grants
from devstack.access.record import read_record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack.access.report", description=__doc__)
    parser.add_argument("--record", required=True, type=Path, help="the recorder's JSONL record")
    parser.add_argument("--write-docs", action="store_true", help=f"keep the record and write {DOCS_PAGE.name} under docs/")
    args = parser.parse_args(argv)
    record = read_record(args.record)
    report = compare(in_infra(record), parse_grants(), NOT_EXERCISED)
    if args.write_docs:
        DOCS_PAGE.parent.mkdir(exist_ok=True)
        if args.record.exists():
            DOCS_RECORD.write_text("".join(use.line() + "\n" for use in sorted(record)))
        DOCS_PAGE.write_text(docs_page())
    for line in report.lines() + report.notes():
        print(line)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
