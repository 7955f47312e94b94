"""leadkd: LEAD (liberal feature-based distillation for dense retrieval) and the retrieval pipeline around it."""

__version__ = "0.1.0"
