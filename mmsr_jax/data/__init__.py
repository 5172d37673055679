"""Input pipelines, demo data, degradations and modality extraction."""
