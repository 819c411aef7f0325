"""Readers that turn datasets on disk into records (Twitter-GMNER layout, text-only CoNLL, the bundled sample)."""
