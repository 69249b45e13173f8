"""From a package to a running farm: what `vipfarm init` and `vipfarm service` write.

Theory of operation
-------------------
The operator-facing commands (`vipfarm.cli.init`, `vipfarm.cli.service`) only gather input and
print; everything they write is computed here, by pure functions that the unit tests check
without root or a network:

- `farm`: the farm plan (`FarmPlan`), parsed from flags or prompt answers one value at a time
  (each parser names the flag, the bad value and the fix), and the files of every node's
  configuration directory (`node_files`).
- `pki`: the farm's small certificate authority and one certificate per node, made with the
  `openssl` command (the venv has no `cryptography`; openssl is on every Debian server).
- `unit`: the systemd unit `vipfarm@.service`, with the real path of the installed executable.
- `man`: man pages generated from the CLI's own help.

Import from the submodules; this package imports nothing, so the CLI starts fast.
"""
