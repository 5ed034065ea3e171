"""Formal statecharts (python-statemachine): pure, synchronous, no I/O, no clock.

Drivers in `chatd_trio` feed them events and read their decisions.
"""

from statecharts.base import Step, TracedChart, transitions_of
from statecharts.dial import ACTIVITIES, Activity, DialChart
from statecharts.lifecycle import (
    ChatLifecycleChart,
    InvalidStatusPath,
    check_status_path,
    is_valid_status_path,
    replay_events,
)
from statecharts.registry import CHARTS, ChartEntry

__all__ = [
    "ACTIVITIES",
    "CHARTS",
    "Activity",
    "ChartEntry",
    "ChatLifecycleChart",
    "DialChart",
    "InvalidStatusPath",
    "Step",
    "TracedChart",
    "check_status_path",
    "is_valid_status_path",
    "replay_events",
    "transitions_of",
]
