"""The ``metarestore`` command-line application: the top layer, above the core and every upper package.

``metarestore_cli.app`` owns the Typer application and the one table of packages that contribute
commands; nothing below this package imports it.
"""
