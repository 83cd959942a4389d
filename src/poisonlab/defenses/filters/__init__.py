"""Data-filtering defences: score every training sample, drop the suspicious ones, retrain.

One module per filter, each registered in :data:`poisonlab.defenses.DEFENSES`
and each exposing a plain-array function (``*_scores``) that works without a
model or a :class:`~poisonlab.defenses.DefenseContext`, in the style of
cleanlab's ``find_label_issues``. Shared helpers live in ``_common``.
"""
