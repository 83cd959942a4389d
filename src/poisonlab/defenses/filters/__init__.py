"""Data-filtering defences: score every training sample, drop the suspicious ones, retrain.

One module per filter, each registered in :data:`poisonlab.defenses.DEFENSES`
and each exposing a plain-array function (``*_scores``) that works without a
model or a :class:`~poisonlab.defenses.DefenseContext`, in the style of
cleanlab's ``find_label_issues``. Shared helpers live in ``_common``; those other packages use
are exported here.
"""

# the shared helpers other packages use (the audit), under their public home
from poisonlab.defenses.filters._common import (class_indices, other_class_whitened, per_class_pca,  # noqa: E402
                                                top_k_mask)

__all__ = ["class_indices", "other_class_whitened", "per_class_pca", "top_k_mask"]
