"""Where a run's curves, images, hyper-parameters and final metrics are recorded.

base.py holds the one interface (`Logger`); tensorboard.py, mlflow.py and csv.py the backends;
fanout.py several at once; select.py turns the `logger` setting into them. Nothing is imported
here, so choosing a backend never costs the import of another.
"""
