"""Training: losses, dynamic refresh, distillation, the jitted update, the run loop."""
