"""One module per pipeline stage, each with a plain ``run(settings, dataset) -> metrics``."""
