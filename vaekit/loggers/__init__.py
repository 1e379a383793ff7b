"""Where a run's curves, images and hyper-parameters are recorded (TensorBoard)."""
