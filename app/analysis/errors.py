class ModelError(ValueError):
    """The data cannot support the model; the message says why, for the PI."""
