"""Code that runs inside containers: the runner (``python -m flare._runtime``), the
per-input context, and the worker side of the protocol for tests.

Standard library and cloudpickle only, and on the cold-start path: this package and
its modules never import the client SDK (``flare.app``, ``flare.function``, the
transport, ...). ``python/tests/test_structure.py`` checks it.
"""
