"""Regenerate a README results block from a demo's report.json.

    python tools/readme_results.py runs/demo/report.json synthetic
    python tools/readme_results.py runs/demo_movielens/report.json movielens

Rewrites the text between ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->`` in
README.md with the CI table, the paired differences and the verdict sentences.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from pgen_engine.eval.demo import KEY_METRICS, REPORT_METRICS
from pgen_engine.eval.report import replace_readme_block, results_markdown


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    report = json.loads(Path(argv[0]).read_text())
    metrics = [m for m in REPORT_METRICS if any(m in r for r in report["systems"].values())]
    key = [m for m in KEY_METRICS if m in metrics]
    replace_readme_block(Path(__file__).resolve().parents[1] / "README.md", argv[1],
                         results_markdown(report, metrics, key))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
