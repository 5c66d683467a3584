"""Paired test-perplexity ratios of a retrain's cells (the same seed index = the same training seed), with
Fieller's 95% interval (cellsearch.stats.paired_ratio_interval), against each named reference.

    python results/small-mf/paired.py results/small-mf/retrain top01-gru lstm_b
"""

import sys
from pathlib import Path

import pandas as pd

from cellsearch.stats import paired_ratio_interval

folder, references = Path(sys.argv[1]), sys.argv[2:]
runs = pd.read_csv(folder / "results.csv")
table = runs.pivot_table(index="seed_index", columns="cell", values="test_perplexity")
rows = []
for reference in references:
    for cell in table.columns.drop(reference):
        interval = paired_ratio_interval(list(table[cell]), list(table[reference]))
        rows.append({"cell": cell, "against": reference, "seeds": len(table),
                     "perplexity_ratio": round(interval.estimate, 3), "low": round(interval.low, 3),
                     "high": round(interval.high, 3)})
result = pd.DataFrame(rows)
print(result.to_string(index=False))
result.to_csv(folder / "paired_ratios.csv", index=False)
