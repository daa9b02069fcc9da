"""Test and demo helpers, kept out of the product.

These modules fabricate devices and run the daemon as a child process so the
tests, the benchmarks and ``compatfs demo`` all exercise the same kind of
device; none of them is product code:

- :mod:`compatfs.testing.devicegen`: device-like legacy ``/persist`` trees
  (checkpoints, latch files, sparse volumes, container trees, downloads);
- :mod:`compatfs.testing.devicefs`: loop-mounted ext4 images with a real
  fscrypt vault;
- :mod:`compatfs.testing.daemonproc`: the daemon as a child process, waited
  for and torn down.

The product never imports this package, with one exception: :mod:`compatfs.demo`,
which builds a demo device with it. These helpers may import anything in the
product; nothing below them may import them.
"""
