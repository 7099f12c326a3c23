"""Typed stage configs: frozen dataclasses, a YAML file, CLI flags that win over it.

- `engine`: the generic part (coerce by annotation, build from a mapping, argparse with grouped help and
  a did-you-mean error, YAML, Markdown tables); it imports no option class.
- `options`: the shared fields (`Common`), the --help groups, precompute, train, eval and sweep.
- `online`: generate and judge, and the sampling settings iterate shares.
- `chain`: the chain commands run and iterate, and `Chain`, how both build their stages' configs.
- `commands`: every command's class by name; docs/options.md (`python -m stages.core.config`).

Imported by module (`from stages.core.config.options import TrainConfig`): nothing is re-exported here.
The package is the bottom of the import graph: it imports no project module but `stages.core.errors`.
"""
