"""Models: the unified model's parts (backbone, FPN, unified head, anchors, routing), the heads every model shares,
the papers' classifiers, a user's own module, and decoding, BatchNorm folding."""
