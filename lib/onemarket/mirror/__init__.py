"""``one-market mirror``: copy a public marketplace (``one`` or ``linuxcontainers``) into a
folder that a plain web server serves as the original catalog, for clouds without Internet.

One module per concern: ``model`` (the typed plan, entries, files and catalog formats),
``plan`` with ``one`` and ``simplestreams`` (what to fetch, decided with the catalog readers'
own code, so the mirror lists what the driver would publish), ``fetch`` (verified downloads in
bounded threads), ``store`` (the tree: verified files staged, then published with the catalog
at once), ``report`` (progress and summary) and ``command`` (the subcommand and the run).
"""
