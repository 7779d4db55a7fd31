"""sparsight: prune vision networks and measure how interpretable their units stay."""
__version__ = "0.1.0"
