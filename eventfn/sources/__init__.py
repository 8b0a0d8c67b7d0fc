"""Sources: what publishes into the pipeline besides the app itself.

A source only publishes; its messages take the one delivery path every message takes
(``DESIGN.md`` section 1). Local buckets (directories) and their watcher, S3/MinIO
notification records, and schedules live here; ``eventfn.runtime.sources`` runs them inside a
runner.
"""
