"""Model families behind one protocol: ``base.DiTAdapter``.

Modules: ``registry`` (which family serves a ``model.source``; imports no torch, so the Dagster
definitions can ask it), ``base`` (the protocol and its records), one module per family (``dit``: diffusers
class-conditional DiTs; ``digits``: the embedded default).
"""
