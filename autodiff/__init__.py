"""pcpc.autodiff: losses, functional optimizers, and derived grad / train-step functions."""
