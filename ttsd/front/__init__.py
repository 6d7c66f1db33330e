"""Front ends: how requests arrive (HTTP on the Unix socket and TCP, the spool directory) and
what they share (request parsing, the synthesis pool). They import ``ttsd.serving.serving_map``
for leases and ``ttsd.options``, never the manager: the daemon hands them a ``Backend`` of
callbacks. A new front end (Wyoming, say) is one more module here.
"""
