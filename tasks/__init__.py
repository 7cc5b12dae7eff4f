"""lm-eval task YAMLs of RESP (package data) and their helpers in :mod:`resp_plugin.tasks.utils`.

Point lm-eval at this folder with ``--include_path`` (see
:func:`resp_plugin.integrations.lm_eval.tasks_path`).
"""
