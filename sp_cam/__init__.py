"""SP-CAM maths, stages and on-disk formats."""

import os

# OpenMP threads that spin while waiting slow every op down 10-30x as soon as another process (a DataLoader worker,
# a second rank) shares the cores; passive waiting costs nothing measurable when the cores are free. It must be set
# before torch loads its OpenMP runtime, hence here, in the package every entry point imports first.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
