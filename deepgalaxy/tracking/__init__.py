"""MLflow tracking: the store a command writes to (:mod:`~deepgalaxy.tracking.store`), where it is and how to open
it (:mod:`~deepgalaxy.tracking.uris`), and the runs themselves (:mod:`~deepgalaxy.tracking.runs`: the one place
an MLflow run is created, for train, tune, scale, the latent-space commands and the registry).

Layer: above core, below registry, runs and cli. mlflow is imported inside the functions, so importing this
package stays cheap.
"""

from deepgalaxy.tracking.runs import Tracker, active_run, git_commit, new_run, run_params, run_tags
from deepgalaxy.tracking.store import prepare_store
from deepgalaxy.tracking.uris import resolve_tracking_uri, ui_hint

__all__ = [
    "Tracker",
    "active_run",
    "git_commit",
    "new_run",
    "prepare_store",
    "resolve_tracking_uri",
    "run_params",
    "run_tags",
    "ui_hint",
]
