"""The lab: a whole farm in network namespaces on one machine, for tests and demos.

- `topology`: constants, names, addresses and the `ip` commands of DESIGN section 5 (pure).
- `buckets`: the lab's rules, even bucket split and release-before-acquire planning (pure).
- `testbed`: `up()`, `down()`, `status()` and the `Lab` object tests drive.
- `apps`, `app`: what a node serves (nginx or the built-in HTTP server, and UDP echo).
- `load`: many requests from one client process, each classified.
- `procs`: recorded processes, stopped for sure.

This package imports nothing itself, so `python -m vipfarm.lab.app` and `vipfarm.lab.load`
start fast inside namespaces; import from the submodules.
"""
