"""T2A R@1 of an ablation's runs on two subsets of the test queries: captions with an order word ("then", "after",
"before", "followed", "finally": :data:`hci_atr.data.negatives.SEQUENCE_WORDS`) and captions without one, each
variant against a baseline with its paired 95 % bootstrap interval over those queries.

It reads what ``hci-atr ablate`` wrote (``OUT/runs/<variant>/seed<k>.json``: one 0/1 outcome per test caption) and
the test captions from ``OUT/features`` in the order the ablation evaluated them (checked against the runs' query
key), so nothing is retrained.

    python bench/query_subsets.py --out hci_atr_runs/ablation-compositional --base hci \\
        --variants hci_order,hci_order_text2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import numpy as np  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    from hci_atr.data.negatives import SEQUENCE_WORDS
    from hci_atr.data.shards import read_split_rows
    from hci_atr.data.text import words_of
    from hci_atr.metrics import paired_bootstrap
    from workflows.ablation_tasks import queries_key

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="the ablation's --out folder")
    p.add_argument("--base", required=True, help="the baseline variant")
    p.add_argument("--variants", required=True, help="comma-separated variants to compare with it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="test")
    a = p.parse_args(argv)
    out = Path(a.out)
    rows = read_split_rows(out / "features", a.split)
    ids = [r["audio_id"] for r in rows]
    caps = [c for r in rows for c in (r.get("captions") or [])]
    ordered = np.array([bool(SEQUENCE_WORDS & set(words_of(c))) for c in caps])

    def outcomes(variant: str) -> np.ndarray:
        doc = json.loads((out / "runs" / variant / f"seed{a.seed}.json").read_text())
        pq = doc["per_query"]
        if pq["queries"] != queries_key(ids, caps):
            raise SystemExit(f"{variant}: its test queries are not the captions of {out / 'features'}")
        return np.asarray(pq["t2a_R1"], np.float64) * 100

    base = outcomes(a.base)
    print(f"{len(caps)} {a.split} captions: {int(ordered.sum())} with an order word, {int((~ordered).sum())} without; "
          f"T2A R@1, seed {a.seed}, paired differences to {a.base} with 95 % bootstrap intervals")
    print(f"| variant | with order words | Δ vs {a.base} | without | Δ vs {a.base} |")
    print("|---|---|---|---|---|")
    print(f"| {a.base} | {base[ordered].mean():.2f} | baseline | {base[~ordered].mean():.2f} | baseline |")
    for v in [s.strip() for s in a.variants.split(",") if s.strip()]:
        b = outcomes(v)
        cells = []
        for m in (ordered, ~ordered):
            r = paired_bootstrap(base[m], b[m])
            cells += [f"{b[m].mean():.2f}", f"{r['diff']:+.2f} [{r['lo']:+.2f}, {r['hi']:+.2f}]"]
        print(f"| {v} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
