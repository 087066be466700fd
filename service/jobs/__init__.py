"""Background jobs: one interface (`JobBackend`), a local subprocess backend and a Ray backend."""
