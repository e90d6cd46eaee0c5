"""The data engine: public pathology corpora -> clean, tagged, difficulty-graded training data.

One module per stage, chained through folders (each reads the folder the stage before wrote):
`importer` (formats in `formats`), `dedup`, `decontaminate`, `tag`, `cluster`; `pipeline` runs them with resume and
manifests, `store` is the folder layout, `engine` runs per-batch work in process or on Ray Data.
"""
