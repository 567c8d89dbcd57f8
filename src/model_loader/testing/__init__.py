"""Test helpers shipped in the wheel: an in-memory source and the conformance suite.

``model_loader.testing.conformance`` imports pytest; import it only from tests.
"""

from model_loader.testing.fake import InMemorySource

__all__ = ["InMemorySource"]
