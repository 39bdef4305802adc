"""The ``ogt`` command line. Each command builds the same objects an API user would."""
