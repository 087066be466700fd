"""dare_linear / dare_ties: drop task-vector entries at random (keep probability ``density``)."""

from __future__ import annotations

from simmerge.operators.sparsify import keep_random
from simmerge.operators.task_arithmetic import TaskVectorMerge, common_method_params


class DareLinear(TaskVectorMerge):
    name = "dare_linear"
    description = "DARE: random drop with rescale, then task arithmetic"
    method_params = common_method_params(normalize=False, rescale=True)
    random = True

    def sparsifies(self, model_params):
        return model_params["density"] < 1

    def sparsify(self, delta, model_params, rescale, generator):
        return keep_random(delta, model_params["density"], rescale, generator)


class DareTies(DareLinear):
    name = "dare_ties"
    description = "DARE: random drop with rescale, then TIES sign election"
    sign_election = True
