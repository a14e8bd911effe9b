"""``one-market mirror``: copy a public marketplace (``one`` or ``linuxcontainers``) into a
folder that a plain web server serves as the original catalog, for clouds without Internet.

``plan`` decides what to fetch, with the catalog readers' own code (the mirror lists exactly
what the driver would publish); ``fetch`` downloads and verifies each file; ``store`` keeps the
tree (verified files staged, then published with the catalog in one commit); ``command`` is the
``one-market mirror`` subcommand.
"""
