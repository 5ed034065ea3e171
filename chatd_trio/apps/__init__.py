"""The applications built on the library: the `chatd-trio` command and what it runs.

`cli` is the console script; `demo` (with `demo_provider`) and `scaletest` are its
commands, and both start replica processes over one worker channel (`channel`).
Nothing in the runtime package imports from here: the library works without them.
"""
