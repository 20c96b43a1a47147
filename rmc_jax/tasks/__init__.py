"""Data generators and task definitions for RMC experiments."""
