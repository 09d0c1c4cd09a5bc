"""Autograd functions and backend registries of gkcore's ops (one module per op)."""
