"""Training-loop utilities (checkpointing, ...)."""
