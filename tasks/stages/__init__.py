"""The Prefect tasks of a run: prepare, then load / explain / evaluate one shard each, then report.

Tasks exchange references only (the config JSON, the run directory, a shard range) and
return small JSON receipts. The run store is the source of truth: a task first compares
the stored completion record of its (stage, explainer, shard) with the provenance digest
it would write, and returns at once when they are equal. Prefect's result cache is not
used (``NO_CACHE``): it cannot see library code and would only duplicate the records.

One module per stage (``prepare``, ``load``, ``explain``, ``evaluate``, ``neurons``,
``sanity``, ``report``; shared pieces in ``common``); this package exports the tasks the
flow submits and the report functions the CLI calls.
"""

from attriflow.tasks.stages.common import STORE_POINTER, shard_task, store_path
from attriflow.tasks.stages.evaluate import evaluate_shard
from attriflow.tasks.stages.explain import explain_shard
from attriflow.tasks.stages.load import load_shard
from attriflow.tasks.stages.neurons import select_neurons
from attriflow.tasks.stages.prepare import prepare_run
from attriflow.tasks.stages.report import artifact_key, render_comparison, render_report, write_report
from attriflow.tasks.stages.sanity import sanity_check

__all__ = [
    "STORE_POINTER", "artifact_key", "evaluate_shard", "explain_shard", "load_shard", "prepare_run",
    "render_comparison", "render_report", "sanity_check", "select_neurons", "shard_task", "store_path",
    "write_report",
]
