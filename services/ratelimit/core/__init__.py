"""The pure core of the rate limit service: descriptor matching, algorithms, decisions.

No sockets and no protobuf here; the transport (``grpc.py``) converts requests to
:class:`~services.ratelimit.core.limiter.Descriptor` tuples and statuses back.
"""
