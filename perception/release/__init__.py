"""Release: a trained run becomes a shipped model folder (measured card, README, int8 graph).

This stage sits above training and evaluation (it measures with :mod:`perception.eval` and reads runs
that :mod:`perception.train` wrote); ``perception-ship`` is its command.
"""
