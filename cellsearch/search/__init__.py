"""Distributed, resumable evolutionary search over recurrent cells.

- :mod:`~cellsearch.search.config`: the typed search config (``search_configs/*.yaml``);
- :mod:`~cellsearch.search.driver`: the asynchronous evolutionary loop;
- :mod:`~cellsearch.search.units`: the unit of work and :func:`run_unit`;
- :mod:`~cellsearch.search.executors`: Ray and serial executors;
- :mod:`~cellsearch.search.storage`: the run database;
- :mod:`~cellsearch.search.seeds`: random streams derived from the run seed;
- :mod:`~cellsearch.search.run`: run directories, executors and signal handling.

Results are read with :func:`cellsearch.load_run`.

Running on a cluster: start Ray on every node (``ray start --head`` on one,
``ray start --address HEAD:6379`` on the others, or ``ray up cluster.yaml``),
then run the driver on the head node with ``cellsearch search CONFIG --address
auto --storage postgresql://...`` (or submit it: ``ray job submit --working-dir
. -- cellsearch search CONFIG --address auto``). Units ask for
``resources.num_cpus``/``num_gpus`` each; data sets go to the object store once
per task. The driver is the only writer of the database, so SQLite in the run
directory also works when the driver's disk is local; PostgreSQL lets
``optuna-dashboard`` and ``load_run`` read it from elsewhere.
"""

from __future__ import annotations

from cellsearch.search.config import ResourcesConfig, SearchConfig, load_search_config
from cellsearch.search.units import SettingSpec, UnitSpec, run_unit

__all__ = ["ResourcesConfig", "SearchConfig", "load_search_config", "SettingSpec", "UnitSpec", "run_unit"]
