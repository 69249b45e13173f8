"""`vipfarm bench`: the farm measured side by side with its alternatives, in labs it builds itself.

- `core`: settings, the scenario registry (keyed by result name), the measuring context.
- `figures`: the data-path scenarios: throughput and latency vs HAProxy, overhead, drop cost.
- `wrk`, `haproxy`, `cpu`: the load generator, the baseline balancer, machine CPU time.
- `report`, `plots`: results.json, the markdown summary and the PNG plots.
- `run`: one whole bench run with its progress display.

Importing this package imports nothing else: `vipfarm.bench.run` pulls in the lab and rich.
"""
