"""Deterministic simulation of several replicas on one virtual clock (issue 9)."""
