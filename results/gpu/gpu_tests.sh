#!/bin/bash
export PYTHONUNBUFFERED=1
mkdir -p /tmp/site && tar xJf .whl/site.tar.xz -C /tmp/site && chmod -R +x /tmp/site/ray/core || exit 1
export PYTHONPATH=/tmp/site:$PWD CELLSEARCH_PTB_DIR=$PWD/.whl/ptb
timeout 100 python3 -m pytest -q -p no:cacheprovider -m gpu tests/ -rs 2>&1 | tee $OUT/gpu-tests.txt
timeout 40 python3 -m pytest -q -p no:cacheprovider tests/test_retrain.py -k cuda 2>&1 | tee -a $OUT/gpu-tests.txt
