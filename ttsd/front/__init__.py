"""Front ends: how requests arrive (HTTP on the Unix socket and TCP, Wyoming, the spool
directory) and what they share (request parsing, the synthesis pool). They import
``ttsd.serving.serving_map`` for leases and ``ttsd.options``, never the manager: the daemon hands
them a ``Backend`` of callbacks, so a new front end is one more module here.
"""
