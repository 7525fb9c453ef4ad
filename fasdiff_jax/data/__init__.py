"""Face data: FFHQ-style preparation (dlib), random-access sources and the Grain pipeline.

Entry points: ``python -m fasdiff_jax.data.prepare``, :func:`sources.open_source`,
:func:`sources.open_prepared`, :func:`embedded.embedded_dataset` and
:func:`pipeline.make_train_iterator`. Submodules are imported lazily (dlib / TFDS are heavy).
"""
