class RMM:  # placeholder, replaced by the model module
    pass
