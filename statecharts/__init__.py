"""Formal statecharts (python-statemachine): pure, synchronous, no I/O, no clock.

Drivers in `chatd_trio` feed them events and read their decisions.
"""
