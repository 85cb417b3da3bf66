"""User-style examples: a model and a data converter used through ``arch: examples.<module>:<Class>``
and ``dataset: npz`` (see configs/digits.yaml)."""
