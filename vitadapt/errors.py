"""The base of every error vitadapt raises for bad input: tools print its message and exit with code 2."""


class VitadaptError(Exception):
    """A problem with the user's config, data, checkpoint or run, with a message that names it."""
