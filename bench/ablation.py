"""Ablation benchmark of HCI levels and AC uses: the same as ``hci-atr ablate`` (see workflows/ablation.py).

    python bench/ablation.py --out hci_atr_runs/ablation --size 240 --epochs 12 --audio-width 8 --lr 0.001 \
      --temperature 0.1 --set model.level_weights=1,0.5,0.5 --set model.segment_size=4 \
      --set model.segment_stride=2 --seeds 0,1,2 --publish bench/results

Every variant x seed is a Ray task (one CPU each); results go to --out (resumable), the table (mean ± std) and the
bar plot to --out and, with --publish, to bench/results/. Figures and the exact command are in BENCHMARKS.md.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from workflows.cli import main  # noqa: E402

if __name__ == "__main__":
    main(["ablate", *sys.argv[1:]])
