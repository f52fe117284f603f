"""clmtl: continual multi-task learning for vision on Avalanche."""
import warnings

# Avalanche imports qpsolvers (for GEM-like strategies clmtl does not use), which warns on every import.
warnings.filterwarnings("ignore", message="no QP solver found", category=UserWarning)

__version__ = "0.1.0"
