"""cdft's built-in plugins (installed as ``cdft_plugins``): one module per plugin.

They use exactly the public API a third-party package uses: ``cdft_core.hookimpl`` and
the ``register`` callable each hook receives.
"""
