"""SP-CAM maths, stages and on-disk formats."""
