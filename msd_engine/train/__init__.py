"""Two-stage MSD draft training: a differentiable draft head, its loss, the curriculum, the loop."""
