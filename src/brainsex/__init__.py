"""brainsex: an executable re-implementation of Dibaji et al. (2024).

Stages, in the order data flows through them (no module imports a later stage):
``manifest``/``templates``/``synthetic``/``cohorts`` (data) -> ``preprocess`` -> ``split`` ->
``model`` -> ``train`` -> ``evaluate`` -> ``tiv`` -> ``saliency`` -> ``atlas`` -> ``figures`` -> ``book``.
"""

__version__ = "0.1.0"


class BrainsexError(Exception):
    """An error caused by user input (a file, a parameter, a manifest entry), with a clear message."""
