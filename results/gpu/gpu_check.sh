#!/bin/bash
# One prepared GPU check: CUDA tests, a multi-fidelity search on cuda, CUDA benchmarks.
set -x
export PYTHONUNBUFFERED=1
mkdir -p /tmp/site && tar xJf .whl/site.tar.xz -C /tmp/site && chmod -R +x /tmp/site/ray/core || exit 1
export PYTHONPATH=/tmp/site:$PWD CELLSEARCH_PTB_DIR=$PWD/.whl/ptb
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, ray, optuna, pandas; print(torch.__version__, torch.version.cuda, ray.__version__, optuna.__version__, pandas.__version__, torch.cuda.get_device_name())"
CS="python3 -c 'import sys; from cellsearch.cli import main; sys.exit(main(sys.argv[1:]))'"
# 1. every CUDA test
timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/ -rs 2>&1 | tee $OUT/gpu-tests.txt
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_retrain.py -k cuda 2>&1 | tee -a $OUT/gpu-tests.txt
# 2. the multi-fidelity search on cuda: 8 units share the GPU (num_gpus 0.125), 150 s of steps
(timeout 240 bash -c "$CS search .whl/gpu-mf.yaml --run-dir /tmp/gpurun --workers 8 --no-progress" 2>&1 | tail -40) > $OUT/gpu-search.txt 2>&1
echo "rc=$?" >> $OUT/gpu-search.txt
bash -c "$CS top -n 15 /tmp/gpurun" >> $OUT/gpu-search.txt 2>&1
bash -c "$CS export /tmp/gpurun /tmp/gpuexport" >> $OUT/gpu-search.txt 2>&1
python3 - >> $OUT/gpu-search.txt 2>&1 <<'PY'
import cellsearch
run = cellsearch.load_run("/tmp/gpurun")
c = run.cells()
print(len(c), "cells;", c.columns.tolist())
for col in ("reached", "stop_reason", "rejected_by"):
    if col in c: print(c[col].value_counts(dropna=False).to_string())
e = run.evaluations()
print(len(e), "evaluations;", e["status"].value_counts().to_string() if "status" in e else "")
u = run.units()
print(u.columns.tolist()); print(u.describe().to_string())
import sys
from pathlib import Path
sys.path.insert(0, "tests")
from searchchecks import assert_search_consistent
steps = run.steps()
run.close()
n = int((~steps["kind"].isin(["seed", "confirm"])).sum())
assert_search_consistent(Path("/tmp/gpurun"), Path("/tmp/gpurun"), n)
print("CONSISTENT: storage, Optuna, population and dedup agree over", n, "steps")
PY
tar czf $OUT/gpurun.tar.gz -C /tmp gpurun 2>/dev/null
# 3. benchmarks on cuda, each capped
timeout 75 python3 benchmarks/batched.py --device cuda --no-compile --members 1 4 8 --hidden 128 512 --steps 64 --repeats 3 2>&1 | tail -30 > $OUT/gpu-bench-batched.txt
echo ALL DONE
