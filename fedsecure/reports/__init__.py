"""Documents for people: the privacy summary and the run summary (one renderer per document)."""
