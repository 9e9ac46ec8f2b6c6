"""Reproducible studies of the paper: data, models, the runner, the results store, reports.

Command line: ``anact reproduce table1`` then (automatically) ``anact report results``.
From Python::

    from anact.experiments import get_study, reproduce, write_report
    study = get_study("table1")
    reproduce(study, study.config({"epochs": 2}), ["relu", "nrelu"], out_dir="results")
    write_report("results")

Layout: ``data/`` (data sets as device tensors), ``models/`` (networks and the
paper's activation/init pairs), ``studies/`` (the study registry, one file per
study), ``runner`` (training loop driver, checkpoints, resume), ``store``
(SQLite), ``report`` (tables and figures), ``paper`` (published numbers), ``cli``.
"""

from anact.experiments.report import write_report
from anact.experiments.runner import reproduce, run_one
from anact.experiments.store import Store
from anact.experiments.studies import STUDIES, Study, Trial, get_study, register

__all__ = [
    "STUDIES",
    "Store",
    "Study",
    "Trial",
    "get_study",
    "register",
    "reproduce",
    "run_one",
    "write_report",
]
