"""Reinforcement-learning environments and tools for the RMC experiments."""
