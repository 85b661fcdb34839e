"""tuneforge's core: the contracts every stage shares (params, paths, records, output kinds, chat rendering,
batching and loss, model loading, GGUF running, the traffic log, environment versions).

The core imports nothing from `tuneforge.stages` or `tuneforge.report`, so a stage's DVC dependencies are
complete when they list the core folder, the report folder and the stage's own module.
"""
