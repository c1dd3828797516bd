"""brainsex: an executable re-implementation of Dibaji et al. (2024).

Modules, in the order data flows through them; a module imports only modules listed before it, and
never another module's private (``_underscore``) names (``tests/test_architecture.py`` checks both):

``_docs`` (shared docstring text) -> ``io`` -> ``run`` -> ``cache`` -> ``profiles`` -> ``manifest`` -> ``privacy`` (infrastructure) -> ``templates``
-> ``synthetic`` -> ``cohorts`` (data) -> ``registration`` -> ``preprocess`` -> ``qc`` -> ``split`` -> ``model`` -> ``memory``
-> ``train`` -> ``evaluate`` -> ``stages`` -> ``tiv`` -> ``saliency`` -> ``atlas`` -> ``ranking`` -> ``morphometry``
-> ``reliance`` -> ``validity`` -> ``matched`` -> ``figures`` -> ``book`` -> ``cli``.
"""

__version__ = "0.1.0"


class BrainsexError(Exception):
    """An error caused by user input (a file, a parameter, a manifest entry), with a clear message."""
