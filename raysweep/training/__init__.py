"""Training: the step every method shares (step.py), the trainer that runs a method's schedule
around it (trainer.py), and the Ray Train launcher that runs the same trainer in each worker (ray.py)."""
