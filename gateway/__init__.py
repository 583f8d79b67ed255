"""retrofit-gateway: poll legacy machine tools and serve their values on open standards.

The public surface is what ``__all__`` names; everything else is internal and may change.
"""

from gateway.model import Quality, Reading, Reason

__version__ = "0.1.0"

__all__ = ["Quality", "Reading", "Reason", "__version__"]
