"""The one place that orders the steps of a dump and a restore: plan(), then execute().

dump.py and restore.py are the entry points (requests and plans in plans.py); what
differs between a process tree and a container is the strategy of its kind
(strategies/process.py, strategies/container.py).
"""
