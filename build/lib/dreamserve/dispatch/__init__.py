"""Dispatchers hand admitted jobs to whatever runs them."""
