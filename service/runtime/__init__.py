"""Services of the online path: model engine, micro-batchers, ingest and ask orchestration."""
