"""The one transfer layer: sources, stages and sinks, each written once.

- **Source** (:class:`sources.Source`): ``read(n) -> bytes`` (``b""`` at the end), with
  ``description`` and ``size_bytes``. A local file, ssh, http, the stock downloader
  (:func:`sources.open_source`), a ranged GET resumed after a dropped connection
  (:class:`sources.ResumingReader` over :meth:`sources.HttpSource.open_at` or
  :class:`sources.S3Range`).
- **Stage**: a step the bytes pass through on the way. Checksums (:class:`hashing.Digests`
  for imports, :class:`hashing.Verifier` against announced values), decompression, rate limit
  and format sniffing (:mod:`stages`).
- **Sink** (:class:`sinks.Sink`): ``write(data)``, ``commit()``, ``abort()``, like
  simplestreams' three-method object store. :class:`local.AtomicFile` is the local atomic sink,
  and the only writer of a published file (:func:`local.atomic_file` for a block);
  :class:`remote.RemoteAtomicFile` is its ssh twin (a bridge host); :mod:`sinks` adds stdout
  and the downloader's path rules; the s3 backend uploads multipart.
- **Copies**: :func:`streamcopy.copy_stream` (imports: parallel hashing, holes kept, its sinks
  also ``skip`` a hole) and :func:`stages.pump` (the downloader's options, one chunk at a time).
  :mod:`interrupt` turns stop signals into an exception, so every abort runs.
"""
