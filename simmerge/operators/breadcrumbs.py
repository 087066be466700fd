"""breadcrumbs / breadcrumbs_ties: drop each task vector's largest outliers and its smallest entries."""

from __future__ import annotations

from simmerge.operators.base import Param
from simmerge.operators.sparsify import keep_between_outliers
from simmerge.operators.task_arithmetic import DENSITY, WEIGHT, TaskVectorMerge, common_method_params

GAMMA = Param(
    "gamma", float, 0.01, low=0.0, high=1.0, high_open=True, doc="fraction of largest entries dropped"
)


class Breadcrumbs(TaskVectorMerge):
    name = "breadcrumbs"
    description = "Model Breadcrumbs: drop outliers and small entries, then task arithmetic"
    method_params = common_method_params(normalize=False, rescale=False)
    model_params = (WEIGHT, DENSITY, GAMMA)
    magnitude_trim = True

    def sparsifies(self, model_params):
        return model_params["density"] < 1

    def sparsify(self, delta, model_params, rescale, generator):
        return keep_between_outliers(delta, model_params["density"], model_params["gamma"], rescale)


class BreadcrumbsTies(Breadcrumbs):
    name = "breadcrumbs_ties"
    description = "Model Breadcrumbs with TIES sign election"
    sign_election = True
