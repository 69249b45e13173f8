"""Farm configuration: one TOML file per farm, identical on every node.

Theory of operation
-------------------
`vipfarm.config.loading.load_config(path)` reads the file with `tomllib` and validates it with
pydantic models that forbid unknown keys, so a misspelt key is an error rather than a silent
default. Validation runs in two rounds: first every section on its own (types, ranges), then,
once those all passed, the checks that need several sections at once (node addresses against
the declared networks, rule overlap, the per-node data path spec, macro substitution in the
module). Every problem found in a round is reported, each as
`key.path[index].field: bad value 'x': expected ...`, in one `ConfigError`; nothing is applied
by loading, so a bad file changes nothing. Whatever the input, loading returns a configuration
or raises `ConfigError`, quickly (see `loading`): the file comes over the API too.

Rules are converted to `vipfarm.datapath.spec.Rule` and the data path of each node is checked by
building its `vipfarm.datapath.spec.DatapathSpec`: the bounds and the overlap check live there
only, and their errors are mapped back onto the keys of this file (`port` -> `ports`,
`lease_s` -> `timing.lease_ms`).

The application module is a directory (`modules/<name>/`) holding `module.toml` (defaults:
scripts, checkers, restart policy, macros) and its scripts. The `[module]` section of the farm
file is merged over those defaults: tables merge key by key, everything else (including the list
of checkers) replaces. Then, for every node, `${name}` macros are substituted in script arguments
and checker fields, which yields the node's `vipfarm.supervisor.spec.AppSpec`, the input of
`vipfarm.supervisor`. Built-in macros: `${vip}` (first VIP), `${node}`, `${farm}`,
`${module_dir}`; macro values may use the built-ins only; `$$` is a literal `$`. Substituting for
every node at load time means an unknown macro or a checker field that is not valid after
substitution is reported by `vipfarm config check`, not at 3 a.m. when a node starts.

Modules, in the order they depend on each other (none imports this package's `__init__`, which
re-exports nothing: import from the module that defines a name):

- `problems`: `Problem`, `ConfigError`, and the rewording of pydantic's errors into
  `path: bad value 'x': expected ...`.
- `tomltext`: `parse_toml`, tomllib behind a screen for hostile text (nesting, dotted keys).
- `secrets`: reading the files the configuration names (`read_capped`) and secret ones
  (`read_secret`: regular file, owned by root, mode 0600 or stricter, size cap), `key_bytes`.
- `fields`: the value types the sections share (strict model base, addresses, names).
- `modules`: module lookup (`default_module_path`), `ModuleSection`, macros (`substitute`,
  `env_name`) and `resolve_app`, which builds a node's `AppSpec`.
- `schema`: the sections (`FarmSection`, `TimingSection`, `NetworkSection`, `NodeSection`,
  `RuleSection`, `DrainSection`, `ApiSection`) and the whole file, `FarmConfig`, with the
  checks across sections.
- `loading`: `parse_config` (text) and `load_config` (a file).

The supervisor's input types (`AppSpec`, the checkers, `RestartSpec`) are defined by the
supervisor, in `vipfarm.supervisor.spec`: the configuration builds them, and the supervisor
does not depend on the configuration. Which local addresses this host has (to find its node) is
a host read, `vipfarm.node.host.local_addresses`.
"""
