"""compatfs: keep EVE-OS legacy /persist names working while the bytes move
into the new vault layout.

The modules, each owning one thing:

- :mod:`compatfs.layout`: every path of both layouts under a root;
- :mod:`compatfs.names`: the legacy and new name grammars (parse, format);
- :mod:`compatfs.checkpoint`: the checkpointed controller config;
- :mod:`compatfs.latch`: zedmanager's (app, image, purge) -> sha latch;
- :mod:`compatfs.resolver`: legacy name -> place in the new layout;
- :mod:`compatfs.scan`: finding legacy objects on disk;
- :mod:`compatfs.plan`: the migration plan and its report;
- :mod:`compatfs.config`: the YAML configuration and its schema;
- :mod:`compatfs.untrusted`: reading files compatfs does not own, never blocking;
- :mod:`compatfs.fscrypt`: the kernel's fscrypt ioctls;
- :mod:`compatfs.cli`: the ``compatfs`` command;
- :mod:`compatfs.testing`: test and demo helpers (device trees, device images,
  the daemon as a child process), not product code.
"""

__version__ = "0.1.0"
