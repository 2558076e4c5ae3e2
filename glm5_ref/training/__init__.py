"""The training engine and what runs on it: data (data.py), optimizers (optim.py), the step and the schedule
(engine.py), a run's files (checkpoint.py) and the classroom run with its budgets and DSA stages (run.py)."""
