"""Training tasks for the engine: the attribute classifier and the re-ID embedding."""
