"""A trained run's checkpoint put to use: scored and exported (``clmtl eval``, ``clmtl export``)."""
