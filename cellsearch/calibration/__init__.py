"""Fidelity studies: how well a training budget ranks cells compared with a longer one.

``cellsearch calibrate`` (and :func:`run_study` here) trains the reference cells plus mutated cells
under several budgets of one task, with the same settings and seeds, on the search's executors
(embedded Ray, a cluster, or in-process), resumable after a kill. :func:`analyse` turns the stored
runs into per-cell intervals over seeds, Kendall tau / Spearman rho against the reference budget,
the paper's orderings with effect sizes, filter pass rates and costs.
"""

from cellsearch.calibration.analysis import StudyTables, analyse, summary_text, write_outputs
from cellsearch.calibration.config import BudgetSpec, StudyConfig, parse_budget
from cellsearch.calibration.study import StudyPlan, StudyStore, plan_study, run_study, study_cells, truncate_result

__all__ = ["BudgetSpec", "StudyConfig", "parse_budget", "StudyPlan", "StudyStore", "plan_study", "run_study",
           "study_cells", "truncate_result", "StudyTables", "analyse", "summary_text", "write_outputs"]
