"""ties: trim each task vector to its largest entries, elect a sign per coordinate, average the agreeing."""

from __future__ import annotations

from simmerge.operators.sparsify import keep_top_magnitude
from simmerge.operators.task_arithmetic import TaskVectorMerge, common_method_params


class Ties(TaskVectorMerge):
    name = "ties"
    description = "TIES: magnitude trim, sign election, mean of the agreeing entries"
    method_params = common_method_params(normalize=True, rescale=False)
    sign_election = True
    magnitude_trim = True

    def sparsifies(self, model_params):
        return model_params["density"] < 1

    def sparsify(self, delta, model_params, rescale, generator):
        return keep_top_magnitude(delta, model_params["density"], rescale)
