"""The Ray / DeepSpeed / MLflow / S3 layer of the Dragonfly training platform.

Its source lives in ``platform/dragonfly_platform`` and installs as ``dragonfly_platform``: a package
named ``platform`` would hide Python's standard ``platform`` module in every process, Ray workers
included.
"""
