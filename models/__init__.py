"""Test subjects for ogt.

``models.recipes`` builds real models from pip-shipped weights into a local cache
(never committed); ``models/demo/tiny_cnn.onnx`` is a tiny bundled model for the
README demo, regenerated deterministically by ``models.make_demo``.
"""
