"""File formats: Meta's checkpoint directories (``meta``), transformers' parameter names and rotary layout (``hf``),
and the one atomic writer every file of the project goes through (``atomic``)."""
