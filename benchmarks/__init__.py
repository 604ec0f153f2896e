import cdp  # noqa: F401 - first: it sets up the environment numpy is loaded in (cdp/__init__.py)
