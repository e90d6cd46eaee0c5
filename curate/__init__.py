"""The data engine: public pathology corpora -> clean, tagged, difficulty-graded training data.

One module per stage, chained through folders (each reads the folder the stage before wrote):
`importer` (formats in `formats`), `dedup`, `decontaminate`, `tag`, `cluster`, then `generate` (the teacher),
`filter_stage` and `mcq`.  `stages` is the stage table (each stage's config, runner, inputs and subcommand flags,
those in `cli_args`); `pipeline` runs a stage from it with resume and manifests, `store` is the folder layout,
`engine` runs per-batch work in process or on Ray Data.
"""
